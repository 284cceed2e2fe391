"""Binary classification metrics in NumPy: accuracy, precision, recall, F1, ROC AUC, log loss,
confusion matrix, the ROC curve and accuracy by review length. Shared by `rnn evaluate` and the pipeline's evaluate stage."""
from __future__ import annotations

import numpy as np


def _check(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """labels (N,) of 0/1 and probs (N,) in [0, 1] as int64 and float64 arrays."""
    y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels and probabilities must be 1-D of equal length, got {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("no examples to score")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {np.unique(y)[:5].tolist()}")
    if not (np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1):
        raise ValueError("probabilities must be finite and lie in [0, 1]")
    return y.astype(np.int64), p


def roc_auc(labels, probs) -> float | None:
    """Area under the ROC curve as the Mann-Whitney statistic: the chance that a random positive
    scores above a random negative, ties counting one half. None when only one class is present."""
    y, p = _check(labels, probs)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    # Tied scores share the mean of the ranks they occupy.
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = mean_rank[inverse][y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(labels, probs, threshold: float = 0.5) -> dict:
    """Metrics of predictions `probs >= threshold` against `labels` (both (N,)).

    Returns {n, accuracy, precision, recall, f1, roc_auc, log_loss, confusion}, where confusion is
    [[tn, fp], [fn, tp]]; precision, recall and F1 are 0 when undefined (no predicted or actual
    positives) and roc_auc is None when only one class is present."""
    y, p = _check(labels, probs)
    pred = (p >= threshold).astype(np.int64)
    tp = int(np.sum((pred == 1) & (y == 1)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    tn = y.size - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # Clipped so that one confident mistake costs a large finite amount instead of infinity.
    q = np.clip(p, 1e-15, 1 - 1e-15)
    log_loss = -np.mean(y * np.log(q) + (1 - y) * np.log1p(-q))
    return {"n": int(y.size), "accuracy": (tp + tn) / y.size, "precision": precision, "recall": recall,
            "f1": f1, "roc_auc": roc_auc(y, p), "log_loss": float(log_loss),
            "confusion": [[tn, fp], [fn, tp]]}


def roc_curve(labels, probs, max_points: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: (fpr, tpr, thresholds), each (K,) with K <= max_points, thresholds descending.

    Point i classifies `probs >= thresholds[i]` as positive; the first point (threshold inf) is
    (0, 0) and the last (the lowest score) is (1, 1). Long curves are thinned to `max_points`
    evenly spaced points, always keeping both ends. A class that is absent gives a rate of 0."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    y, p = _check(labels, probs)
    order = np.argsort(-p, kind="stable")
    y, p = y[order], p[order]
    last_of_score = np.r_[np.flatnonzero(np.diff(p)), y.size - 1]     # end of each run of ties
    tps = np.r_[0, np.cumsum(y)[last_of_score]]
    fps = np.r_[0, (last_of_score + 1) - tps[1:]]
    thresholds = np.r_[np.inf, p[last_of_score]]
    if tps.size > max_points:
        keep = np.unique(np.linspace(0, tps.size - 1, max_points).round().astype(int))
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    return fps / max(fps[-1], 1), tps / max(tps[-1], 1), thresholds


def length_buckets(lengths: np.ndarray, correct: np.ndarray, edges: list[int]) -> list[dict]:
    """Accuracy by review length: buckets [0, e0), [e0, e1), ..., [e_last, inf); empty ones left out.

    lengths, correct: (N,). Returns rows {bucket, min_length, max_length (exclusive, None = open),
    count, accuracy}.
    """
    bounds = [0, *edges, None]
    rows = []
    for lo, hi in zip(bounds, bounds[1:]):
        inside = (lengths >= lo) & (lengths < hi if hi is not None else True)
        if inside.any():
            label = f"<{hi}" if lo == 0 else (f">={lo}" if hi is None else f"{lo}-{hi}")
            rows.append({"bucket": label, "min_length": lo, "max_length": hi, "count": int(inside.sum()),
                         "accuracy": float(correct[inside].mean())})
    return rows
