"""Detection metrics with numpy alone (scikit-learn is a test oracle, not a dependency)."""
from __future__ import annotations

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with midranks for ties); labels 1 = positive."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # midranks: equal scores share the mean of their positions
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _labels_and_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be matching 1-d arrays")
    return labels, scores


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall steps, sum of (R_n - R_{n-1}) P_n over the distinct scores
    (scikit-learn's definition: tied images are accepted together)."""
    labels, scores = _labels_and_scores(labels, scores)
    positives = labels.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    true_positives = np.cumsum(labels[order])[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    return float(np.diff(true_positives, prepend=0) @ precision / positives)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Share of positives scoring above the lowest threshold that at most ``fpr`` of the
    negatives score above."""
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    labels, scores = _labels_and_scores(labels, scores)
    negatives = np.sort(scores[~labels])[::-1]
    if negatives.size == 0 or labels.sum() == 0:
        return float("nan")
    allowed = int(np.floor(fpr * negatives.size + 1e-9))  # 1e-9: 0.29 * 100 is 28.999...
    # the (allowed+1)-th highest negative: only the `allowed` above it pass
    threshold = np.r_[negatives, -np.inf][allowed]
    return float(np.mean(scores[labels] > threshold))


def accuracy_at_threshold(labels: np.ndarray, scores: np.ndarray,
                          threshold: float) -> tuple[float, float, float]:
    """(accuracy, accuracy on reals, accuracy on fakes), calling fake what scores above ``threshold``."""
    labels, scores = _labels_and_scores(labels, scores)
    correct = (scores > threshold) == labels
    return _mean_or_nan(correct), _mean_or_nan(correct[~labels]), _mean_or_nan(correct[labels])


def detection_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """The detection metrics of one evaluation set, labels 1 = fake."""
    labels, scores = _labels_and_scores(labels, scores)
    acc, real_acc, fake_acc = accuracy_at_threshold(labels, scores, threshold)
    return {
        "n_real": int((~labels).sum()), "n_fake": int(labels.sum()),
        "ap": average_precision(labels, scores), "auroc": auroc(labels, scores),
        "acc": acc, "real_acc": real_acc, "fake_acc": fake_acc,
        "tpr_at_fpr1": tpr_at_fpr(labels, scores, 0.01),
        "tpr_at_fpr5": tpr_at_fpr(labels, scores, 0.05),
    }
