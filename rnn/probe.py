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

`train_probe` trains a fresh classifier on the task at one distance for a fixed budget of steps on
fresh batches, then tests it with the decisive token exactly that far from the end, recording the
gradient norm reaching each step back at the start and at the end of training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import ModelConfig, SentimentModel
from .optim import clip_gradients, make_optimizer
from .train import Dataset, TrainingDiverged, evaluate
from .config import PROBE_VARIANTS

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


@dataclass(frozen=True)
class ProbeConfig:
    """How `train_probe` trains and tests (the model's size is its ModelConfig).

    train_distance "upto" draws each training row's distance from 0..d ("exact": always d); the
    gradient traces are averaged over the first and over the last `trace_steps` steps.
    """
    lead: int                 # filler tokens before the farthest decisive token: T = d + 1 + lead
    train_distance: str       # upto | exact
    variant: str              # signal | order (see the module docstring)
    distractors: int
    batch_size: int
    steps: int
    test_size: int
    optimizer: str            # sgd | adam | adamw
    lr: float
    clip_mode: str            # none | value | norm
    clip_threshold: float
    trace_steps: int
    seed: int


def train_probe(config: ModelConfig, d: int, probe: ProbeConfig) -> dict:
    """Train a fresh `config` model at distance d; return test accuracy, traces and training figures.

    Three independent streams from (seed, d): the initial weights, the training batches and the
    test set, so every cell sees the same data at a given d. Returns {accuracy, grad_ratio_first,
    grad_ratio_last, final_loss (mean over the last trace_steps steps), clipped_fraction, traces},
    traces: {"first"|"last": {"a"[, "c"]: (T,) mean gradient norm by distance from the end}}.
    Raises TrainingDiverged on a non-finite loss or gradient norm.
    """
    T = d + 1 + probe.lead
    init_rng, data_rng, test_rng = (np.random.default_rng([probe.seed, d, k]) for k in range(3))
    model = SentimentModel.create(config, init_rng)
    optimizer = make_optimizer(probe.optimizer, probe.lr)
    n, steps = probe.trace_steps, probe.steps
    sums: dict = {"first": {}, "last": {}}
    losses, clipped = [], 0
    for step in range(steps):
        dist = d if probe.train_distance == "exact" else data_rng.integers(0, d + 1, probe.batch_size)
        batch = make_probe_data(probe.batch_size, T, dist, probe.variant, config.vocab_size, data_rng,
                                probe.distractors)
        windows = [w for w, inside in (("first", step < n), ("last", step >= steps - n)) if inside]
        loss, grads, _, traces = model.loss(batch.ids, batch.lengths, batch.labels, trace=bool(windows))
        pre, _, was_clipped = clip_gradients(grads, probe.clip_mode, probe.clip_threshold)
        if not (np.isfinite(loss) and np.isfinite(pre)):
            raise TrainingDiverged(f"{config.cell}, distance {d}, step {step + 1}: loss {loss}, gradient norm {pre}")
        optimizer.step(model.params, grads)
        clipped += was_clipped
        if step >= steps - n:
            losses.append(loss)
        for w in windows:
            for name, (s, c) in traces.items():      # every row has length T: counts are all equal
                sums[w][name] = sums[w].get(name, 0) + s / c
    test = make_probe_data(probe.test_size, T, d, probe.variant, config.vocab_size, test_rng, probe.distractors)
    traces = {w: {name: s / n for name, s in by_name.items()} for w, by_name in sums.items()}
    return {"accuracy": evaluate(model, test)["accuracy"],
            "grad_ratio_first": grad_ratio(traces["first"], d),
            "grad_ratio_last": grad_ratio(traces["last"], d),
            "final_loss": float(np.mean(losses)),
            "clipped_fraction": clipped / steps,
            "traces": traces}


def grad_ratio(trace: dict[str, np.ndarray], d: int) -> float:
    """Gradient norm on the memory state d steps back, relative to the one on the final output.

    The memory is a for the RNN and GRU, c for the LSTM (its c receives no gradient at the last
    step itself, hence the shared denominator a[0]).
    """
    reached = trace["c"][d] if "c" in trace else trace["a"][d]
    return float(reached / trace["a"][0]) if trace["a"][0] > 0 else 0.0
