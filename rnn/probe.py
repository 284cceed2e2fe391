"""A synthetic memory probe: how many steps back can a cell carry one decisive token?

Every sequence is `T` random filler tokens with the decisive token at distance `d` from the end
(d = 0 is the last token), so the classifier, which reads only the final state, must carry that
token's identity through d updates. The data are fully determined by the rng passed in.

Vocabulary: PAD = 0, UNK = 1 (both unused, kept so ids mean what they mean in the IMDB data),
POS = 2, NEG = 3, A = 4, B = 5, then filler tokens up to vocab_size - 1.

Variants:
    signal  One POS or NEG token at distance d; `distractors` tokens of the opposite polarity are
            placed earlier. The label is the polarity of the LAST sentiment token, so distractors
            never make the label ambiguous; they only tempt a cell that keeps the first one seen.
    order   One A and one B ("good, not bad"): A before B is positive, B before A negative; the
            later of the two sits at distance d, the earlier one anywhere before it. With exactly
            one of each, the later token's identity decides the label, so the memory demand is that
            of `signal` with one distractor; what changes is that neither token has a polarity of
            its own (each is positive or negative depending on what came before).
"""
from __future__ import annotations

import numpy as np

from .config import PROBE_VARIANTS
from .train import Dataset

PAD, UNK, POS, NEG, A, B = 0, 1, 2, 3, 4, 5
FIRST_FILLER = 6


def make_probe_data(n: int, T: int, distance: int | np.ndarray, variant: str, vocab_size: int,
                    rng: np.random.Generator, distractors: int = 0) -> Dataset:
    """n sequences of length T with the decisive token at `distance` from the end.

    distance: one int for every row, or (n,) ints, one per row. Labels are exactly balanced
    (n // 2 or n - n // 2 positives) in random order. Returns a Dataset with ids (n, T) int32,
    lengths (n,) int64 all equal to T, labels (n,) int8.
    """
    if variant not in PROBE_VARIANTS:
        raise ValueError(f"unknown probe variant {variant!r}: expected one of {', '.join(PROBE_VARIANTS)}")
    if vocab_size <= FIRST_FILLER:
        raise ValueError(f"vocab_size must be > {FIRST_FILLER} (PAD, UNK, POS, NEG, A, B and at least "
                         f"one filler), got {vocab_size}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    distance = np.broadcast_to(np.asarray(distance, dtype=np.int64), (n,))
    if distractors < 0:
        raise ValueError(f"distractors must be >= 0, got {distractors}")
    earlier = distractors if variant == "signal" else 1     # tokens placed before the decisive one
    if distance.min() < 0 or distance.max() > T - 1 - earlier:
        raise ValueError(f"distance must lie in [0, T - 1 - {earlier}] = [0, {T - 1 - earlier}] "
                         f"(T = {T}, {earlier} earlier token(s)), got {distance.min()}..{distance.max()}")

    rows = np.arange(n)
    pos = T - 1 - distance                                   # (n,) position of the decisive token
    labels = rng.permutation(rows % 2).astype(np.int8)
    ids = rng.integers(FIRST_FILLER, vocab_size, size=(n, T)).astype(np.int32)
    if variant == "signal":
        ids[rows, pos] = np.where(labels == 1, POS, NEG)
        first = np.where(labels == 1, NEG, POS)          # distractors: the opposite polarity
    else:
        # A then B is positive, so the later token is B for positives and A for negatives.
        ids[rows, pos] = np.where(labels == 1, B, A)
        first = np.where(labels == 1, A, B)
    if earlier:
        # `earlier` distinct slots per row before its decisive token: the smallest of independent
        # uniform keys, with the slots at or after the decisive token keyed out of reach.
        keys = np.where(np.arange(T)[None, :] < pos[:, None], rng.random((n, T)), 2.0)
        slots = np.argsort(keys, axis=1)[:, :earlier]
        ids[rows[:, None], slots] = first[:, None]
    return Dataset(ids, np.full(n, T, dtype=np.int64), labels)
