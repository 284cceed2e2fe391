"""Initial word vectors: random, read from a pretrained GloVe / word2vec text file, or learned
without labels (windowed co-occurrence counts -> PPMI -> truncated SVD).

Levy & Goldberg (2014) style: positive PMI with context-distribution smoothing,
factorised by a randomized SVD (Halko et al. 2011), rows U * sqrt(S). Ids are
those of a frequency-ordered `rnn.text.Vocabulary`, so the C most frequent
words are simply ids < C.

The counts and the PPMI are sparse (`SparseMatrix`, compressed rows): a 20,000 x
10,000 matrix is mostly zeros, and held dense it took 1.6 GB. Every step works
on bounded pieces, so memory grows with the nonzeros, not with words x contexts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnn.errors import InputError
from rnn.text import PAD, UNK

FIRST_WORD = max(PAD, UNK) + 1  # ids below this are never rows or contexts


@dataclass(frozen=True)
class SparseMatrix:
    """A (m, n) matrix in compressed sparse rows (CSR).

    Row i holds the values data[indptr[i]:indptr[i + 1]] in the columns
    indices[indptr[i]:indptr[i + 1]], ascending; every other entry is 0.
    indptr (m + 1,) int64, indices (nnz,) int32, data (nnz,).
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> SparseMatrix:
        rows, cols = np.nonzero(dense)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=dense.shape[0]))])
        return cls(indptr, cols.astype(np.int32), dense[rows, cols], dense.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def nnz(self) -> int:
        return len(self.data)

    def row_ids(self) -> np.ndarray:
        """(nnz,) int32: the row of each stored value."""
        return np.repeat(np.arange(self.shape[0], dtype=np.int32), np.diff(self.indptr))

    def toarray(self) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=self.dtype)
        dense[self.row_ids(), self.indices] = self.data
        return dense

    @property
    def T(self) -> SparseMatrix:
        return self.transpose()

    def transpose(self, band_values: int = 1 << 20) -> SparseMatrix:
        """The transpose (n, m), as a new CSR matrix (as much memory again), built a band of
        columns at a time (about `band_values` values on average) so that the sort's
        temporaries stay small."""
        m, n = self.shape
        rows = self.row_ids()
        band = max(1, n * band_values // max(self.nnz, 1))
        indptr = np.zeros(n + 1, dtype=np.int64)
        indices, data = np.empty(self.nnz, dtype=np.int32), np.empty(self.nnz, dtype=self.dtype)
        for first in range(0, n, band):
            last = min(n, first + band)
            in_band = (self.indices >= first) & (self.indices < last)
            columns = self.indices[in_band]
            order = np.argsort(columns, kind="stable")  # stable: rows stay ascending in each column
            at = indptr[first]
            indices[at : at + len(order)] = rows[in_band][order]
            data[at : at + len(order)] = self.data[in_band][order]
            indptr[first + 1 : last + 1] = at + np.cumsum(np.bincount(columns - first, minlength=last - first))
        return SparseMatrix(indptr, indices, data, (n, m))

    def sums(self, axis: int) -> np.ndarray:
        """Float64 sums over `axis` (0: per column (n,), 1: per row (m,)), a row chunk at a time
        (bincount makes float64 and int64 copies of what it is given)."""
        out = np.zeros(self.shape[1 - axis])
        for start, stop in self.row_chunks(1 << 20):
            lo, hi = self.indptr[start], self.indptr[stop]
            if axis == 0:
                out += np.bincount(self.indices[lo:hi], weights=self.data[lo:hi], minlength=len(out))
            else:
                rows = np.repeat(np.arange(stop - start), np.diff(self.indptr[start : stop + 1]))
                out[start:stop] = np.bincount(rows, weights=self.data[lo:hi], minlength=stop - start)
        return out

    def row_chunks(self, max_nnz: int) -> Iterator[tuple[int, int]]:
        """Row ranges [start, stop) holding at most max_nnz values each (or one row, if it has more)."""
        start, m = 0, self.shape[0]
        while start < m:
            stop = int(np.searchsorted(self.indptr, self.indptr[start] + max_nnz, side="right")) - 1
            stop = min(max(stop, start + 1), m)
            yield start, stop
            start = stop

    def __matmul__(self, X: np.ndarray) -> np.ndarray:
        return self.matmul(X)

    def matmul(self, X: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        """self @ X: (m, k) from X (n, k), in row chunks of about `chunk` gathered products.

        Each stored value is multiplied by the row of X its column names, and np.add.reduceat
        sums those products per row. The work runs on X.T: gathering from one column of X at a
        time (n values) stays in cache, and a buffer reused across chunks keeps memory flat.
        """
        if X.ndim != 2 or X.shape[0] != self.shape[1]:
            raise ValueError(f"cannot multiply {self.shape} by {X.shape}")
        k, dtype = X.shape[1], np.result_type(self.dtype, X.dtype)
        XT = np.ascontiguousarray(X.T, dtype=dtype)
        outT = np.zeros((k, self.shape[0]), dtype=dtype)
        buffer = np.empty(chunk, dtype=dtype)
        for start, stop in self.row_chunks(max(1, chunk // max(k, 1))):
            lo, hi = self.indptr[start], self.indptr[stop]
            if lo == hi:
                continue
            size = k * (hi - lo)  # above `chunk` only for a single row with more values
            products = (buffer[:size] if size <= chunk else np.empty(size, dtype=dtype)).reshape(k, hi - lo)
            np.take(XT, self.indices[lo:hi], axis=1, out=products)
            products *= self.data[lo:hi]
            firsts = self.indptr[start:stop]
            filled = firsts < self.indptr[start + 1 : stop + 1]  # reduceat cannot sum an empty row
            outT[:, start:stop][:, filled] = np.add.reduceat(products, firsts[filled] - lo, axis=1)
        return np.ascontiguousarray(outT.T)


def _stream(sequences: Iterable[np.ndarray], vocab_size: int, window: int) -> np.ndarray:
    """All sequences in one array, `window` PADs before, between and after them, so that
    no window spans two sequences or runs off either end. Its type is the smallest unsigned
    one that holds every id (uint16 for a 20,000-word vocabulary: half of int32's memory);
    it is filled in place, without a converted copy of each sequence."""
    sequences = [np.asarray(seq) for seq in sequences]
    stream = np.full(window + sum(len(seq) + window for seq in sequences), PAD,
                     dtype=np.min_scalar_type(max(vocab_size - 1, 0)))
    at = window
    for seq in sequences:
        if seq.size and (seq.min() < 0 or seq.max() >= vocab_size):  # checked before the cast
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got {seq.min()}..{seq.max()}")
        stream[at : at + len(seq)] = seq
        at += len(seq) + window
    return stream


def _count_rows(stream: np.ndarray, first: int, last: int, C: int, window: int, chunk: int) -> np.ndarray:
    """Dense float64 counts (last - first, C) of the rows first..last-1 (see cooccurrence)."""
    block = np.zeros((last - first) * C)
    for start in range(window, len(stream) - window, chunk):
        segment = stream[start : start + chunk]
        here = np.flatnonzero((segment >= first) & (segment < last)) + start
        cell = (stream[here] - first).astype(np.int64) * C
        for d in (*range(-window, 0), *range(1, window + 1)):
            context = stream[here + d]
            keep = (context >= FIRST_WORD) & (context < C)
            np.add.at(block, cell[keep] + context[keep], 1.0 / abs(d))
    return block.reshape(last - first, C)


def cooccurrence(
    sequences: Iterable[np.ndarray],
    vocab_size: int,
    context_size: int,
    window: int,
    chunk: int = 1 << 18,
    block_size: int = 1 << 22,
) -> SparseMatrix:
    """Counts (V, C) float32, sparse: counts[w, c] = sum over pairs within `window` of 1/distance.

    Both directions count; C = min(context_size, V). Sequences are joined with
    `window` PAD separators so no window spans two sequences; PAD and UNK are
    neither rows nor contexts. Rows are counted a block at a time in float64
    (at most `block_size` dense cells), the stream read `chunk` positions at a time.
    """
    if window < 1 or context_size < 1:
        raise ValueError(f"window and context_size must be >= 1, got {window}, {context_size}")
    V, C = vocab_size, min(context_size, vocab_size)
    stream = _stream(sequences, V, window)
    # Room for every value that can occur (a word meets at most 2 * window contexts per
    # occurrence): np.empty only reserves it, the pages never written take no memory, and
    # filling block by block avoids holding the pieces and their concatenation at once.
    frequency = sum(np.bincount(stream[i : i + chunk], minlength=V) for i in range(0, len(stream), chunk))
    capacity = int(np.minimum(2 * window * frequency[FIRST_WORD:], max(C - FIRST_WORD, 0)).sum())
    indptr = np.zeros(V + 1, dtype=np.int64)
    indices, data = np.empty(capacity, dtype=np.int32), np.empty(capacity, dtype=np.float32)
    rows_per_block = max(1, block_size // C)
    for first in range(FIRST_WORD, V, rows_per_block):
        block = _count_rows(stream, first, min(V, first + rows_per_block), C, window, chunk)
        for row in range(0, len(block), 64):  # 64 rows at a time: small index temporaries
            top = first + row
            part = block[row : row + 64].ravel()
            cells = np.flatnonzero(part)
            at = indptr[top]
            indices[at : at + len(cells)] = cells % C
            data[at : at + len(cells)] = part[cells]
            rows = np.bincount(cells // C, minlength=len(part) // C)
            indptr[top + 1 : top + 1 + len(rows)] = at + np.cumsum(rows)
    return SparseMatrix(indptr, _shrink(indices, indptr[-1]), _shrink(data, indptr[-1]), (V, C))


def _shrink(array: np.ndarray, size: int) -> np.ndarray:
    """The first `size` items of a 1-D array it owns, in place where the allocator can (realloc)."""
    array.resize(size, refcheck=False)
    return array


def ppmi(counts: SparseMatrix, alpha: float = 0.75, dtype: type = np.float32) -> SparseMatrix:
    """PPMI (V, C) = max(0, log P(w,c) / (P(w) P_alpha(c))), sparse: only its positive values stored.

    P_alpha(c) ~ count(c)^alpha (alpha < 1 lifts rare contexts, whose PMI is
    otherwise inflated). Computed in `dtype` (float32: half the memory), on the
    nonzero counts only (PMI is -inf, clipped to 0, wherever the count is 0),
    in row chunks so that the temporaries stay small.
    """
    V = counts.shape[0]
    row_sums = counts.sums(axis=1)
    ctx = counts.sums(axis=0) ** alpha
    with np.errstate(divide="ignore", invalid="ignore"):  # empty rows/cols: never looked up below
        log_rows = np.log(np.where(row_sums > 0, row_sums, 1.0)).astype(dtype)
        log_ctx = np.log(np.where(ctx > 0, ctx / ctx.sum(), 1.0)).astype(dtype)
    indptr = np.zeros(V + 1, dtype=np.int64)
    indices, data = np.empty(counts.nnz, dtype=np.int32), np.empty(counts.nnz, dtype=dtype)
    for start, stop in counts.row_chunks(1 << 20):
        lo, hi = counts.indptr[start], counts.indptr[stop]
        values = np.log(counts.data[lo:hi], dtype=dtype)
        values -= np.repeat(log_rows[start:stop], np.diff(counts.indptr[start : stop + 1]))
        values -= log_ctx[counts.indices[lo:hi]]
        keep = values > 0
        kept_before = np.concatenate([[0], np.cumsum(keep)])  # kept values before each position
        at = indptr[start]
        indices[at : at + kept_before[-1]] = counts.indices[lo:hi][keep]
        data[at : at + kept_before[-1]] = values[keep]
        indptr[start + 1 : stop + 1] = at + kept_before[counts.indptr[start + 1 : stop + 1] - lo]
    return SparseMatrix(indptr, _shrink(indices, indptr[-1]), _shrink(data, indptr[-1]), counts.shape)


def randomized_svd(
    M: np.ndarray | SparseMatrix, k: int, rng: np.random.Generator, oversample: int = 10, power_iters: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k left singular vectors U (m, k) and values S (k,) of M (m, n), descending.

    Random range finder with `power_iters` power iterations, re-orthonormalised
    by QR after every product so small singular values are not lost to rounding.
    M is only ever multiplied (M @ X, M.T @ Y), so a SparseMatrix is never made dense.
    """
    k = min(k, *M.shape)
    sketch = min(k + oversample, *M.shape)
    MT = M.T
    Q, _ = np.linalg.qr(M @ rng.standard_normal((M.shape[1], sketch)).astype(M.dtype))
    for _ in range(power_iters):
        Z, _ = np.linalg.qr(MT @ Q)
        Q, _ = np.linalg.qr(M @ Z)
    Ub, S, _ = np.linalg.svd((MT @ Q).T, full_matrices=False)  # (M.T Q).T = Q.T M, (sketch, n)
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
    seen = np.diff(counts.indptr) > 0  # rows with any count
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
