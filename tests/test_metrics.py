"""Detection metrics: the operating points composed on scikit-learn's curves, against counts
made by hand, on random scores with many ties."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, recall_score, roc_auc_score

from anchorscan.anchors.metrics import accuracy_at_threshold, detection_metrics, tpr_at_fpr

SEEDS = [0, 1, 2]
FPRS = [0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 1.0]


def tied_scores(seed, n=300):
    """Labels and integer-valued scores (ties within and across classes), fakes shifted up."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    scores = rng.integers(0, 12, n) + 3 * labels
    return labels.astype(int), scores.astype(float)


def counted_tpr_at_fpr(labels, scores, fpr):
    """The oracle: try every threshold; keep those whose share of negatives above it is within
    ``fpr``, and report the best share of positives above one of them."""
    labels = np.asarray(labels).astype(bool)
    best = 0.0
    for threshold in np.r_[np.unique(scores), -np.inf]:
        above = scores >= threshold if np.isfinite(threshold) else np.ones_like(labels)
        if np.mean(above[~labels]) <= fpr + 1e-12:
            best = max(best, np.mean(above[labels]))
    return best


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fpr", FPRS)
def test_tpr_at_fpr_is_the_best_operating_point_within_the_fpr(seed, fpr):
    labels, scores = tied_scores(seed)
    assert tpr_at_fpr(labels, scores, fpr) == pytest.approx(counted_tpr_at_fpr(labels, scores, fpr))


@pytest.mark.parametrize("fpr", [0.05, 0.29])  # 0.29 * 100 rounds to 28.999...
def test_tpr_at_fpr_without_ties_lets_exactly_the_allowed_negatives_through(fpr):
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(100), np.ones(2000)]  # many positives: some between any two negatives
    scores = rng.normal(size=len(labels)) + labels
    negatives = np.sort(scores[labels == 0])[::-1]
    allowed = round(fpr * 100)
    expected = np.mean(scores[labels == 1] > negatives[allowed])
    assert tpr_at_fpr(labels, scores, fpr) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_at_threshold_matches_sklearn_recalls(seed):
    labels, scores = tied_scores(seed)
    threshold = float(np.median(scores))  # a tied value: scores equal to it count as real
    predicted = (scores > threshold).astype(int)
    acc, real_acc, fake_acc = accuracy_at_threshold(labels, scores, threshold)
    assert acc == pytest.approx(np.mean(predicted == labels))
    assert real_acc == pytest.approx(recall_score(labels, predicted, pos_label=0))
    assert fake_acc == pytest.approx(recall_score(labels, predicted, pos_label=1))


@pytest.mark.parametrize("seed", SEEDS)
def test_detection_metrics_gathers_the_metrics(seed):
    labels, scores = tied_scores(seed)
    metrics = detection_metrics(labels, scores, threshold=5.0, second_threshold=3.0)
    acc, real_acc, fake_acc = accuracy_at_threshold(labels, scores, 5.0)
    _, real_p05, fake_p05 = accuracy_at_threshold(labels, scores, 3.0)
    assert metrics == {
        "n_real": int(np.sum(labels == 0)),
        "n_fake": int(np.sum(labels == 1)),
        "ap": pytest.approx(average_precision_score(labels, scores), rel=1e-12),
        "auroc": pytest.approx(roc_auc_score(labels, scores), rel=1e-12),
        "acc": acc,
        "real_acc": real_acc,
        "fake_acc": fake_acc,
        "tpr_at_fpr1": pytest.approx(counted_tpr_at_fpr(labels, scores, 0.01)),
        "tpr_at_fpr5": pytest.approx(counted_tpr_at_fpr(labels, scores, 0.05)),
        "real_acc_p05": real_p05,
        "fake_acc_p05": fake_p05,
    }


def test_a_detector_without_a_second_threshold_has_no_p05_accuracies():
    metrics = detection_metrics(np.r_[np.zeros(3), np.ones(3)], np.arange(6.0), threshold=2.0)
    assert np.isnan(metrics["real_acc_p05"]) and np.isnan(metrics["fake_acc_p05"])


def test_one_class_gives_nan_where_a_metric_needs_both():
    metrics = detection_metrics(np.zeros(5), np.arange(5.0), threshold=2.0)
    assert (metrics["n_real"], metrics["n_fake"]) == (5, 0)
    assert metrics["real_acc"] == metrics["acc"] == np.mean(np.arange(5.0) <= 2.0)
    for key in ("ap", "auroc", "fake_acc", "tpr_at_fpr1", "tpr_at_fpr5"):
        assert np.isnan(metrics[key]), key


@pytest.mark.parametrize("fpr", [-0.1, 1.5])
def test_fpr_outside_unit_interval_is_refused(fpr):
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr([0, 1], [0.0, 1.0], fpr)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="matching"):
        detection_metrics([0, 1, 1], [0.1, 0.2], threshold=0.0)
