"""Detection metrics of one evaluation set (labels 1 = generated), from scikit-learn's; only the
papers' operating points (TPR at a false-positive rate, accuracy at the detector's own
threshold) are composed here."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be matching 1-d arrays")
    return labels, scores


def _both_classes(labels: np.ndarray) -> bool:
    return bool(labels.any() and not labels.all())


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def tpr_at_fpr(labels, scores, fpr: float) -> float:
    """The best true-positive rate of an operating point whose false-positive rate is at most
    ``fpr`` (tied images are accepted or refused together)."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    labels, scores = _labels_and_scores(labels, scores)
    if not _both_classes(labels):
        return float("nan")
    false_positive_rates, true_positive_rates, _ = roc_curve(labels, scores, drop_intermediate=False)
    # 1e-12: 0.29 * 100 negatives is 28.999...
    return float(true_positive_rates[false_positive_rates <= fpr + 1e-12].max())


def accuracy_at_threshold(labels, scores, threshold: float) -> tuple[float, float, float]:
    """(accuracy, accuracy on reals, accuracy on fakes), calling fake what scores above ``threshold``."""
    labels, scores = _labels_and_scores(labels, scores)
    correct = (scores > threshold) == labels
    return _mean_or_nan(correct), _mean_or_nan(correct[~labels]), _mean_or_nan(correct[labels])


def detection_metrics(labels, scores, threshold: float, second_threshold: float = math.nan) -> dict:
    """The metrics of one evaluation set; NaN where a metric needs both classes (or, for the
    ``_p05`` accuracies, where the detector has no ``second_threshold``: a head's)."""
    labels, scores = _labels_and_scores(labels, scores)
    both = _both_classes(labels)
    acc, real_acc, fake_acc = accuracy_at_threshold(labels, scores, threshold)
    _, real_p05, fake_p05 = (
        accuracy_at_threshold(labels, scores, second_threshold)
        if not math.isnan(second_threshold)
        else (math.nan,) * 3
    )
    return {
        "n_real": int((~labels).sum()),
        "n_fake": int(labels.sum()),
        "ap": float(average_precision_score(labels, scores)) if both else float("nan"),
        "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "acc": acc,
        "real_acc": real_acc,
        "fake_acc": fake_acc,
        "tpr_at_fpr1": tpr_at_fpr(labels, scores, 0.01),
        "tpr_at_fpr5": tpr_at_fpr(labels, scores, 0.05),
        "real_acc_p05": real_p05,
        "fake_acc_p05": fake_p05,
    }
