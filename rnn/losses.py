"""Binary cross-entropy from logits, and the language model's output layer: sampled and full
softmax losses, the log-uniform candidate sampler and temperature sampling."""
from __future__ import annotations

import numpy as np

from .layers import SparseRows

# The ids rnn/text.py gives padding and unknown words, written out so that the losses (and every
# model) do not load the tokenizer: tests/test_losses_lm.py holds them equal.
PAD, UNK = 0, 1


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


# ---------------------------------------------------------------------------------------------------
# Language model output layer: logits = h @ W.T + b over a vocabulary of V ids, one position per
# token. Ids follow rnn/text.py: 0 = PAD is not a word (never a target, never a candidate, never in a
# normalizer; a target equal to `ignore_index` marks a position to skip), 1 = UNK is an ordinary word
# (it stands for every rare word, so it is both predicted and sampled, at rank 1). Every other id is a
# word, most frequent first.
# ---------------------------------------------------------------------------------------------------

def log_uniform_probs(num_classes: int) -> np.ndarray:
    """The log-uniform (Zipfian) distribution Q over ids 0..V-1 of a frequency-sorted vocabulary.

    Q(0) = 0 (PAD); Q(k) = log(1 + 1/k) / log(V) for k = 1..V-1, which telescopes to a sum of 1 and
    falls roughly as 1/k like word frequencies. Returns (V,) float64."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (PAD and one word), got {num_classes}")
    k = np.arange(1, num_classes, dtype=np.float64)
    return np.r_[0.0, np.log1p(1.0 / k) / np.log(num_classes)]


def log_expected_count(ids: np.ndarray, num_classes: int, num_samples: int) -> np.ndarray:
    """log(K * Q(id)), the expected number of times id turns up in K = num_samples draws with
    replacement: the logQ correction of one draw. ids: any shape S of ints in [0, V). Returns S
    float64; -inf at PAD, which has Q = 0."""
    ids = np.asarray(ids)
    k = np.maximum(ids, 1).astype(np.float64)
    out = np.log(num_samples * np.log1p(1.0 / k) / np.log(num_classes))
    return np.where(ids == 0, -np.inf, out)


def sample_log_uniform(num_classes: int, num_samples: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Draw K = num_samples ids from Q with replacement and return them merged: (candidates (C,)
    sorted distinct int64, log_q_candidates (C,) float64), C <= K.

    A candidate drawn c times stands for c copies, each with correction log(K Q(k)); c copies of a
    logit s - log(K Q) weigh in a softmax exactly like one logit s - log(K Q) + log(c), so
    log_q_candidates = log(K Q(k)) - log(c) and the loss and gradients equal those of the raw draws
    while the output layer touches each row once. Inverse CDF: k = floor(V ** u) for u ~ U[0, 1)
    has P(k) = log((k + 1) / k) / log(V), exactly Q."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    u = rng.random(num_samples)
    draws = np.floor(np.exp(u * np.log(num_classes))).astype(np.int64)
    np.clip(draws, 1, num_classes - 1, out=draws)          # guards the float edge of V ** u
    candidates, counts = np.unique(draws, return_counts=True)
    return candidates, log_expected_count(candidates, num_classes, num_samples) - np.log(counts)


def _sum_rows(ids: np.ndarray, dW_rows: np.ndarray, db_rows: np.ndarray, V: int
              ) -> tuple[SparseRows, SparseRows]:
    """ids: (M,) with repeats; dW_rows: (M, H); db_rows: (M,). Returns the per-id sums as SparseRows
    of shapes (V, H) and (V,), rows sorted and distinct."""
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    rows = ids[starts]
    return (SparseRows(rows, np.add.reduceat(dW_rows[order], starts, axis=0), (V, dW_rows.shape[1])),
            SparseRows(rows, np.add.reduceat(db_rows[order], starts), (V,)))


def sampled_softmax_loss(h: np.ndarray, W: np.ndarray, b: np.ndarray, targets: np.ndarray,
                         candidates: np.ndarray, log_q_candidates: np.ndarray, *,
                         log_q_targets: np.ndarray | None = None,
                         denominator: float | None = None, ignore_index: int = PAD
                         ) -> tuple[float, int, np.ndarray, SparseRows, SparseRows]:
    """Sampled softmax (Jean et al., 2015) and its gradients, for training.

    h: (N, H) hidden states; W: (V, H), b: (V,) output layer; targets: (N,) next-token ids, where
    `ignore_index` marks positions to skip (so right-padded (T, B) targets reshaped to (T*B,) work
    as they are); candidates: (C,) ids shared by all positions, repeats allowed, never ignore_index;
    log_q_candidates: (C,) their logQ corrections (sample_log_uniform gives both). Each position's
    softmax runs over [target, candidates], the candidates' logits minus their corrections; a
    candidate equal to the position's target (an accidental hit) is dropped from that position's
    softmax, or the target would be counted twice.

    The target's logit is not corrected: it is in its softmax with probability 1, not drawn, so
    exp(s_t) + sum over the other draws of exp(s_k) / (K Q(k)) has expectation exactly the full
    normalizer, and as K grows loss and gradients tend to the full softmax's. log_q_targets (N,)
    subtracts a correction from the target too, as TensorFlow's sampled_softmax_loss does
    (log_expected_count(targets, ...)); with accidental hits removed that drops the target from the
    normalizer as K grows, so each position's gradient tends to the full one / (1 - p(target)),
    overweighting the positions the model already predicts well (tests/test_losses_lm.py).

    Returns (loss, count, dh (N, H), dW, db): count = positions not ignored; loss = summed negative
    log-likelihood / denominator (default: count; a data-parallel share passes the whole batch's
    count); dW (V, H) and db (V,) as SparseRows over the targets and candidates only. Gradients are in
    h's dtype; no (N, V) or (V, H) array is formed."""
    N = h.shape[0]
    if targets.shape != (N,):
        raise ValueError(f"targets must have shape ({N},) to match h {h.shape}, got {targets.shape}")
    if np.any(candidates == ignore_index):
        raise ValueError(f"candidates must not contain the ignored id {ignore_index}")
    keep = np.flatnonzero(targets != ignore_index)
    count = int(keep.size)
    scale = h.dtype.type(1.0 / (count if denominator is None else denominator) if count else 0.0)
    h_kept, t = h[keep], targets[keep]
    W_t, W_c = W[t], W[candidates]                                        # (n, H), (C, H)
    true_logit = np.einsum("nh,nh->n", h_kept, W_t) + b[t]
    if log_q_targets is not None:
        true_logit -= log_q_targets[keep].astype(h.dtype)
    logits = h_kept @ W_c.T                                                # (n, C)
    logits += (b[candidates] - log_q_candidates).astype(h.dtype)
    logits[t[:, None] == candidates] = -np.inf                            # accidental hits

    shift = np.maximum(true_logit, logits.max(1, initial=-np.inf))        # stable log-sum-exp
    true_logit -= shift
    logits -= shift[:, None]
    p_true = np.exp(true_logit)
    p_cand = np.exp(logits, out=logits)
    z = p_true + p_cand.sum(1)
    loss = float(np.sum(np.log(z) - true_logit, dtype=np.float64)) * float(scale)
    p_true /= z
    p_cand /= z[:, None]

    d_true = (p_true - 1) * scale                                          # dloss/d true_logit
    d_cand = p_cand
    d_cand *= scale                                                        # dloss/d logits
    dh = np.zeros_like(h)
    dh[keep] = d_true[:, None] * W_t + d_cand @ W_c
    dW, db = _sum_rows(np.r_[t, candidates],
                       np.concatenate([d_true[:, None] * h_kept, d_cand.T @ h_kept]),
                       np.r_[d_true, d_cand.sum(0)], W.shape[0])
    return loss, count, dh, dW, db


def _full_softmax_chunks(h, W, b, targets, ignore_index, chunk_size):
    """Yield (positions, targets, -log p(target) (n,), p (n, V)) for the kept positions of each
    chunk of at most chunk_size positions; the ignored id is left out of every normalizer."""
    for start in range(0, h.shape[0], chunk_size):
        t = targets[start:start + chunk_size]
        positions = start + np.flatnonzero(t != ignore_index)
        t = targets[positions]
        logits = h[positions] @ W.T                                        # (n, V)
        logits += b
        if ignore_index is not None:
            logits[:, ignore_index] = -np.inf
        logits -= logits.max(1, keepdims=True)
        true_logit = logits[np.arange(len(t)), t]
        p = np.exp(logits, out=logits)
        z = p.sum(1)
        p /= z[:, None]
        yield positions, t, np.log(z) - true_logit, p


def softmax_cross_entropy(h: np.ndarray, W: np.ndarray, b: np.ndarray, targets: np.ndarray, *,
                          ignore_index: int | None = PAD, chunk_size: int = 512) -> tuple[float, int]:
    """Full-softmax negative log-likelihood over the whole vocabulary, for evaluation.

    h: (N, H); W: (V, H); b: (V,); targets: (N,), `ignore_index` marking positions to skip (that id
    is also left out of the softmax: PAD is not a word). Works through chunk_size positions at a
    time, so memory stays at chunk_size x V whatever N is. Returns (summed NLL, count);
    perplexity = exp(sum / count)."""
    total, count = 0.0, 0
    for positions, _, nll, _ in _full_softmax_chunks(h, W, b, targets, ignore_index, chunk_size):
        total += float(np.sum(nll, dtype=np.float64))
        count += positions.size
    return total, count


def full_softmax_loss(h: np.ndarray, W: np.ndarray, b: np.ndarray, targets: np.ndarray, *,
                      denominator: float | None = None, ignore_index: int | None = PAD,
                      chunk_size: int = 512
                      ) -> tuple[float, int, np.ndarray, np.ndarray, np.ndarray]:
    """softmax_cross_entropy with its gradients, for gradient checks and tiny models (the sampled
    loss is the one for real vocabularies). Same arguments; returns (loss, count, dh (N, H),
    dW (V, H), db (V,)) with loss = summed NLL / denominator (default: count), gradients dense."""
    count = int(np.sum(targets != ignore_index))
    scale = h.dtype.type(1.0 / (count if denominator is None else denominator) if count else 0.0)
    loss, dh, dW, db = 0.0, np.zeros_like(h), np.zeros_like(W), np.zeros_like(b)
    for positions, t, nll, p in _full_softmax_chunks(h, W, b, targets, ignore_index, chunk_size):
        loss += float(np.sum(nll, dtype=np.float64)) * float(scale)
        p[np.arange(len(t)), t] -= 1                                       # dloss/dlogits, unscaled
        p *= scale
        dh[positions] = p @ W
        dW += p.T @ h[positions]
        db += p.sum(0)
    return loss, count, dh, dW, db


def sample_next_token(logits: np.ndarray, temperature: float, rng: np.random.Generator,
                      exclude: tuple[int, ...] = (PAD, UNK)) -> np.ndarray:
    """Draw the next token from softmax(logits / temperature), never one of `exclude`.

    logits: (V,) or (N, V). temperature 0 means greedy (argmax), the limit of small temperatures.
    Gumbel-max (argmax of logits / T plus Gumbel noise) samples the softmax exactly without forming
    it: one draw of V noises per row, so the same seed gives the same tokens. Returns () or (N,)
    int64."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    z = np.array(logits, dtype=np.float64)
    z[..., list(exclude)] = -np.inf
    if np.all(np.isneginf(z), axis=-1).any():
        raise ValueError(f"every id is excluded or has logit -inf (exclude={exclude})")
    if temperature > 0:
        z /= temperature
        z += rng.gumbel(size=z.shape)
    return np.argmax(z, axis=-1)
