"""Embedding, dense and dropout layers: forward and backward pairs."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class SparseRows(NamedTuple):
    """Gradient of an embedding matrix that names only the rows a batch used.

    rows: (K,) distinct row indices; values: (K, E) their gradients; shape: the full matrix's shape.
    Optimizers update just these rows, so a 20,000-word vocabulary costs what the batch uses.
    """
    rows: np.ndarray
    values: np.ndarray
    shape: tuple

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, self.values.dtype)
        dense[self.rows] = self.values
        return dense


def embedding_forward(weight: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """weight: (V, E); ids: any integer shape S. Returns (*S, E)."""
    return weight[ids]


FEW_USES = 8      # rows used up to this often in a batch are summed rank by rank, the others by reduceat


def embedding_backward(d_out: np.ndarray, ids: np.ndarray, shape: tuple, padding_idx: int = 0
                       ) -> SparseRows:
    """d_out: (*S, E) gradient of the looked-up vectors; ids: (*S,). Returns the summed gradient
    of each distinct row; the padding row gets none, so it stays zero.

    Most rows of a batch occur a few times: their occurrences are added rank by rank, one
    vectorised add for all rows' second occurrence, one for the third, and so on (np.add.reduceat
    spends about half a microsecond per row: 4.4 ms against 0.6 ms for 6,400 uniform ids, measured);
    the few rows used more than FEW_USES times (frequent words) are summed by reduceat."""
    flat_ids = ids.reshape(-1)
    keep = flat_ids != padding_idx
    flat_ids, flat_d = flat_ids[keep], d_out.reshape(-1, shape[1])[keep]
    order = np.argsort(flat_ids, kind="stable")
    sorted_ids = flat_ids[order]
    if not sorted_ids.size:
        return SparseRows(sorted_ids, np.zeros((0, shape[1]), d_out.dtype), tuple(shape))
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    values = flat_d[order[starts]]                       # each row's first occurrence
    few = counts <= FEW_USES
    running = np.flatnonzero(few & (counts > 1))
    for rank in range(1, FEW_USES):                      # then its second, third, ...
        if not running.size:
            break
        values[running] += flat_d[order[starts[running] + rank]]
        running = running[counts[running] > rank + 1]
    many = np.flatnonzero(~few)
    if many.size:
        lengths = counts[many]
        offsets = np.r_[0, np.cumsum(lengths)[:-1]]
        positions = np.arange(lengths.sum()) + np.repeat(starts[many] - offsets, lengths)
        values[many] = np.add.reduceat(flat_d[order[positions]], offsets, axis=0)
    return SparseRows(sorted_ids[starts], values, tuple(shape))


def dense_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x: (B, F); W: (F, K); b: (K,). Returns (B, K)."""
    return x @ W + b


def dense_backward(d_out: np.ndarray, x: np.ndarray, W: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d_out: (B, K). Returns dx (B, F), dW (F, K), db (K,)."""
    return d_out @ W.T, x.T @ d_out, d_out.sum(0)


def dropout_mask(shape: tuple, p: float, rng: np.random.Generator, dtype) -> np.ndarray | None:
    """Inverted dropout: a mask of 0 and 1/(1-p), so inference needs no rescaling. None if p == 0."""
    if p <= 0:
        return None
    return (rng.random(shape, dtype=np.float32) >= p).astype(dtype) / dtype.type(1 - p)


def row_generators(seed: int, positions: np.ndarray) -> list[np.random.Generator]:
    """One generator per batch row, seeded with (seed, the row's position in the batch).

    A row's dropout masks then depend on the step's seed and its position only, not on which other
    rows share its forward pass: a batch split across worker processes draws the same masks.
    (About 10 us a row: one SeedSequence hash, negligible next to the row's forward pass.)
    """
    return [np.random.default_rng([seed, int(p)]) for p in positions]


def row_dropout_mask(shape: tuple, p: float, rngs: list[np.random.Generator], dtype,
                     lengths: np.ndarray | None = None) -> np.ndarray | None:
    """Inverted dropout mask whose batch row b is drawn from rngs[b] alone. None if p == 0.

    shape: (B, F), or time-major (T, B, F) with `lengths` (B,): row b then draws (lengths[b], F)
    values and its padded steps stay zero (the outputs there are zero anyway)."""
    if p <= 0:
        return None
    mask = np.zeros(shape, dtype)
    for b, rng in enumerate(rngs):
        if len(shape) == 2:
            mask[b] = dropout_mask(shape[1:], p, rng, dtype)
        else:
            mask[:lengths[b], b] = dropout_mask((int(lengths[b]), shape[2]), p, rng, dtype)
    return mask
