"""Mini-batches bucketed by length, the validation split, and the language models' corpus."""
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


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_idx, val_idx): `fraction` of each label class goes to validation.

    labels: (N,). A class of two or more examples keeps at least one in each part.
    """
    train, val = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def language_model_corpus(parts: list[tuple[np.ndarray, np.ndarray]], max_tokens: int | None,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The reviews a language model reads: the padded parts stacked, one-token reviews left out.

    parts: (ids (N_i, T_i) int, lengths (N_i,)) each. With `max_tokens`, only a random subset of
    the reviews, in their original order, whose lengths sum to at most that many tokens (drawn
    from `rng` before the one-token reviews are dropped). Returns ids (N, max T_i) int32, lengths (N,).
    """
    width = max(ids.shape[1] for ids, _ in parts)
    ids = np.zeros((sum(len(n) for _, n in parts), width), np.int32)
    start = 0
    for part, n in parts:
        ids[start:start + len(n), :part.shape[1]] = part
        start += len(n)
    lengths = np.concatenate([n for _, n in parts])
    keep = lengths >= 2                                  # a one-token review predicts nothing
    if max_tokens is not None:
        order = rng.permutation(len(lengths))
        chosen = order[np.cumsum(lengths[order]) <= max_tokens]
        keep &= np.isin(np.arange(len(lengths)), chosen)
    return ids[keep], lengths[keep]
