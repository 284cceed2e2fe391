"""Initial word vectors: random, read from a pretrained GloVe / word2vec text file, or learned
without labels (windowed co-occurrence counts -> PPMI -> truncated SVD).

Levy & Goldberg (2014) style: positive PMI with context-distribution smoothing,
factorised by a randomized SVD (Halko et al. 2011), rows U * sqrt(S). Ids are
those of a frequency-ordered `rnn.text.Vocabulary`, so the C most frequent
words are simply ids < C.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rnn.errors import InputError
from rnn.text import PAD, UNK

FIRST_WORD = max(PAD, UNK) + 1  # ids below this are never rows or contexts


def cooccurrence(
    sequences: Iterable[np.ndarray],
    vocab_size: int,
    context_size: int,
    window: int,
    chunk: int = 1 << 20,
) -> np.ndarray:
    """Counts (V, C) float64: counts[w, c] = sum over pairs within `window` of 1/distance.

    Both directions count; C = min(context_size, V). Sequences are joined with
    `window` PAD separators so no window spans two sequences; PAD and UNK are
    neither rows nor contexts. The stream is processed `chunk` positions at a time.
    """
    if window < 1 or context_size < 1:
        raise ValueError(f"window and context_size must be >= 1, got {window}, {context_size}")
    V, C = vocab_size, min(context_size, vocab_size)
    sep = np.full(window, PAD, dtype=np.int64)
    parts = [p for s in sequences for p in (np.asarray(s, dtype=np.int64), sep)]
    stream = np.concatenate(parts) if parts else sep
    if stream.min() < 0 or stream.max() >= V:
        raise ValueError(f"token ids must lie in [0, {V}), got {stream.min()}..{stream.max()}")
    counts = np.zeros(V * C)
    for start in range(0, len(stream), chunk):
        seg = stream[start : start + chunk + window]  # + window: pairs that start in this chunk
        is_row = seg >= FIRST_WORD
        is_ctx = is_row & (seg < C)
        for k in range(1, min(window, len(seg) - 1) + 1):
            m = min(chunk, len(seg) - k)
            left, right = seg[:m], seg[k : k + m]
            # np.add.at, not np.bincount(minlength=V*C): a fresh V*C array per call
            # (1.6 GB for 20000 x 10000) cost more than all the counting.
            for row, col, keep in ((left, right, is_row[:m] & is_ctx[k : k + m]),
                                   (right, left, is_row[k : k + m] & is_ctx[:m])):
                np.add.at(counts, row[keep] * C + col[keep], 1.0 / k)
    return counts.reshape(V, C)


def ppmi(counts: np.ndarray, alpha: float = 0.75, dtype: type = np.float32) -> np.ndarray:
    """PPMI (V, C) = max(0, log P(w,c) / (P(w) P_alpha(c))), 0 where counts is 0.

    P_alpha(c) ~ count(c)^alpha (alpha < 1 lifts rare contexts, whose PMI is
    otherwise inflated). Computed in `dtype` to halve memory for float32.
    """
    rows = counts.sum(axis=1)
    ctx = counts.sum(axis=0) ** alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        log_rows = np.log(np.where(rows > 0, rows, 1.0)).astype(dtype)  # empty rows/cols: counts all 0
        log_ctx = np.log(np.where(ctx > 0, ctx / ctx.sum(), 1.0)).astype(dtype)
        out = np.log(counts, dtype=dtype)  # -inf where count 0 -> clipped to 0 below
    out -= log_rows[:, None]
    out -= log_ctx[None, :]
    return np.maximum(out, 0, out=out)


def randomized_svd(
    M: np.ndarray, k: int, rng: np.random.Generator, oversample: int = 10, power_iters: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors U (m, k) and values S (k,) of M (m, n), descending.

    Random range finder with `power_iters` power iterations, re-orthonormalised
    by QR after every product so small singular values are not lost to rounding.
    """
    k = min(k, *M.shape)
    sketch = min(k + oversample, *M.shape)
    Q, _ = np.linalg.qr(M @ rng.standard_normal((M.shape[1], sketch)).astype(M.dtype))
    for _ in range(power_iters):
        Z, _ = np.linalg.qr(M.T @ Q)
        Q, _ = np.linalg.qr(M @ Z)
    Ub, S, _ = np.linalg.svd(Q.T @ M, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k]


def svd_embeddings(
    sequences: Iterable[np.ndarray],
    vocab_size: int,
    dim: int,
    rng: np.random.Generator,
    context_size: int = 10000,
    window: int = 5,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (V, dim) float32, seen (V,) bool: rows that got an SVD vector).

    Seen rows (any co-occurrence count, non-zero projection): U * sqrt(S), each
    row unit norm, then all scaled so their element std is `scale` (default
    1/sqrt(dim), like a random init). Other rows get N(0, scale^2) draws; the
    PAD row is zero. If dim exceeds the available rank (tiny vocabularies), the
    extra columns are zero.
    """
    scale = 1.0 / np.sqrt(dim) if scale is None else scale
    counts = cooccurrence(sequences, vocab_size, context_size, window)
    seen = counts.any(axis=1)
    M = ppmi(counts)
    del counts
    U, S = randomized_svd(M, dim, rng)
    del M
    vecs = np.zeros((vocab_size, dim), dtype=np.float32)
    vecs[:, : len(S)] = U * np.sqrt(S)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    seen &= norms[:, 0] > 0
    vecs[seen] /= norms[seen]
    if seen.any():
        vecs[seen] *= scale / vecs[seen].std()
    vecs[~seen] = rng.normal(0.0, scale, size=(int((~seen).sum()), dim))
    vecs[PAD] = 0.0
    return vecs, seen


def read_vectors(path: Path, vocab_index: dict[str, int], dim: int) -> dict[int, np.ndarray]:
    """{vocab id: vector (dim,) float32} for the vocabulary words found in a GloVe or word2vec text
    file (one word and its values a line; word2vec's "count dim" header line is skipped).

    Exact matches win over lowercased ones, so a cased word2vec file still covers a lowercase
    vocabulary without a capitalized variant overriding the word itself.
    """
    found: dict[int, np.ndarray] = {}
    exact: set[int] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.rstrip().split(" ")
                if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue
                if len(parts) == 1 and not parts[0]:
                    continue
                if len(parts) - 1 != dim:
                    raise InputError(f"{path}:{lineno}: expected {dim} values (train.embed_dim), got {len(parts) - 1}")
                idx = vocab_index.get(parts[0])
                is_exact = idx is not None
                if idx is None:
                    idx = vocab_index.get(parts[0].lower())
                if idx is None or idx in exact or (not is_exact and idx in found):
                    continue
                try:
                    found[idx] = np.array(parts[1:], dtype=np.float32)
                except ValueError:
                    raise InputError(f"{path}:{lineno}: non-numeric vector value") from None
                if is_exact:
                    exact.add(idx)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text embedding file ({exc.reason})") from None
    return found


def build_embeddings(tokens: list[str], dim: int, rng: np.random.Generator, scale: float | None = None,
                     vectors: Path | None = None) -> tuple[np.ndarray, float | None]:
    """(embeddings (V, dim) float32, coverage): N(0, scale^2) draws (default scale 1/sqrt(dim)),
    the rows of the words found in the `vectors` file replaced by their vectors, the PAD row zero.

    coverage: the share of the words (PAD and UNK aside) found in `vectors`; None without a file.
    """
    scale = scale if scale is not None else 1.0 / np.sqrt(dim)
    emb = rng.normal(0.0, scale, size=(len(tokens), dim)).astype(np.float32)
    coverage = None
    if vectors is not None:
        index = {t: i for i, t in enumerate(tokens) if i not in (PAD, UNK)}
        found = read_vectors(vectors, index, dim)
        for i, vec in found.items():
            emb[i] = vec
        coverage = len(found) / len(index) if index else 0.0
    emb[PAD] = 0.0
    return emb, coverage
