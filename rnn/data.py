"""Mini-batches bucketed by length, so a batch wastes little on padding."""
from __future__ import annotations

import numpy as np


def batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None = None,
            bucket_batches: int = 50) -> list[np.ndarray]:
    """Split example indices into batches of similar length.

    With `rng`, shuffle the examples, sort each chunk of `bucket_batches` batches by length, cut it
    into batches and shuffle the batch order: batches are random yet nearly free of padding.
    Without `rng`, the whole set sorted by length (evaluation). lengths: (N,). Returns index arrays.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = rng.permutation(len(lengths))
    chunk = batch_size * bucket_batches
    out = []
    for start in range(0, len(perm), chunk):
        idx = perm[start:start + chunk]
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        out.extend(idx[i:i + batch_size] for i in range(0, len(idx), batch_size))
    return [out[i] for i in rng.permutation(len(out))]
