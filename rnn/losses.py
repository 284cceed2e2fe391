"""Binary cross-entropy computed from logits."""
from __future__ import annotations

import numpy as np


def bce_with_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean binary cross-entropy of sigmoid(logits) against labels in {0, 1}.

    logits, labels: (B,). Returns (loss, dlogits (B,)). Written as
    max(z, 0) - z*y + log(1 + exp(-|z|)), which never overflows, instead of -log(sigmoid(z)).
    """
    z = logits.astype(np.float64)
    y = labels.astype(np.float64)
    loss = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    dlogits = (sigmoid(z) - y) / len(z)
    return float(loss), dlogits.astype(logits.dtype)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function, stable for large |z|."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))
