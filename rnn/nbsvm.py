"""The arithmetic of NBSVM (Wang & Manning, 2012), the bag-of-n-grams baseline (stages/baseline.py):
binary n-gram features x are scaled by their naive-Bayes log-count ratios r, a linear classifier is fit
on r * x, and its weights move towards their mean magnitude. The feature counting and the classifier
are scikit-learn's, in the stage."""
from __future__ import annotations

import numpy as np


def nb_ratio(features, labels: np.ndarray, alpha: float) -> np.ndarray:
    """Naive-Bayes log-count ratio r (F,) float32 of binary features (N, F) (an array or a SciPy sparse
    matrix), labels (N,) 0/1: log of how much more often each feature occurs in positive than in
    negative reviews, with `alpha` added to every count."""
    counts = [alpha + np.asarray(features[labels == c].sum(axis=0)).ravel() for c in (1, 0)]
    p, q = (c / c.sum() for c in counts)
    return np.log(p / q).astype(np.float32)


def interpolate_weights(w: np.ndarray, beta: float) -> np.ndarray:
    """w' = (1 - beta) * mean|w| + beta * w (F,) float32 of the classifier's weights w (F,): beta 1 keeps
    them, beta 0 gives every feature the same weight (naive Bayes, scaled by r alone)."""
    return ((1 - beta) * np.abs(w).mean() + beta * w).astype(np.float32)
