"""Statistics over replicates (seeds) and test reviews: is one cell really better than another?

Every model is trained with several seeds and scored on the same test reviews, so two sources of
chance sit in a reported accuracy: which seed trained it, and which reviews happen to be in the test
set. The functions here put a number on both.

- `mean_interval`: the mean of a metric over seeds with a Student-t confidence interval.
- `paired_bootstrap`: the accuracy difference between two models with a bootstrap interval and
  p-value that resamples the test reviews (the same ones for both models: paired) and the seeds.
- `mcnemar`: the exact McNemar test between two sets of predictions on the same reviews.
- `ensemble`: the mean predicted probability over seeds (a seed ensemble).
- `replicate_band`: the mean and range of replicates' curves (a band in a figure).

NumPy and the standard library only: the Student-t quantile and the binomial tail are computed
here (a continued fraction for the incomplete beta function, Newton's method to invert it, and
log-gamma for the binomial coefficients). The tests check them against SciPy.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Resamples drawn per block in bootstrap_differences. Each block holds a few (block, reviews) arrays
# of 8-byte indices and counts: about 55 MB at its peak for 25,000 reviews, whatever the number of
# resamples (measured with tracemalloc); larger blocks were no faster.
_BOOTSTRAP_BLOCK = 64


# --- Student's t distribution ---------------------------------------------------------------------

def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the incomplete beta function, evaluated with the modified Lentz
    method. It converges fast for x < (a + 1) / (a + b + 2); the caller ensures that."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        # Two terms per m: the even coefficient d_{2m}, then the odd one d_{2m+1}.
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < eps:
            return fraction
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (x={x}, a={a}, b={b})")


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for 0 <= x <= 1 and a, b > 0."""
    if not 0.0 <= x <= 1.0 or a <= 0 or b <= 0:
        raise ValueError(f"regularized_beta needs 0 <= x <= 1 and a, b > 0, got x={x}, a={a}, b={b}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    # On the other side the fraction converges slowly; use I_x(a, b) = 1 - I_{1-x}(b, a).
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0 under Student's t with df degrees of freedom."""
    return 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def _t_density(t: float, df: float) -> float:
    log_density = (math.lgamma((df + 1.0) / 2.0) - math.lgamma(df / 2.0) - 0.5 * math.log(df * math.pi)
                   - (df + 1.0) / 2.0 * math.log1p(t * t / df))
    return math.exp(log_density)


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) under Student's t distribution with df > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = _t_upper_tail(abs(t), df)
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p under Student's t with df > 0 degrees of freedom (SciPy's t.ppf).

    Solves P(T > t) = min(p, 1 - p) for t >= 0, so that small tail probabilities keep their
    relative precision, by Newton's method on the upper tail, kept inside a shrinking bracket
    (a step that leaves it bisects instead)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie strictly between 0 and 1, got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if p == 0.5:
        return 0.0
    target = min(p, 1.0 - p)
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > target:
        low, high = high, 2.0 * high
    t = 0.5 * (low + high)
    for _ in range(200):
        excess = _t_upper_tail(t, df) - target      # decreasing in t
        if excess > 0:
            low = t
        else:
            high = t
        step = excess / _t_density(t, df)            # d tail / dt = -density
        candidate = t + step
        if not low < candidate < high:
            candidate = 0.5 * (low + high)
        converged = abs(candidate - t) <= 1e-15 * max(1.0, t) or high - low <= 1e-15 * high
        t = candidate
        if converged:
            break
    return t if p > 0.5 else -t


# --- A metric over seeds --------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A mean over replicates with its spread: sample standard deviation sd (ddof=1), the
    confidence interval [low, high] of the mean, the number of replicates n and the confidence."""
    mean: float
    sd: float
    low: float
    high: float
    n: int
    confidence: float = 0.95


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of values (one per seed) with its Student-t confidence interval:
    mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n), sd with ddof=1.

    With a single value there is no spread to estimate: sd is nan and low = high = mean (the
    interval says nothing; report n with it)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean_interval needs a non-empty 1-D sequence of values, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"mean_interval needs finite values, got {x.tolist()}")
    _check_confidence(confidence)
    n, mean = x.size, float(x.mean())
    if n == 1:
        return Interval(mean=mean, sd=math.nan, low=mean, high=mean, n=1, confidence=confidence)
    sd = float(x.std(ddof=1))
    half_width = student_t_quantile((1.0 + confidence) / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean=mean, sd=sd, low=mean - half_width, high=mean + half_width, n=n,
                    confidence=confidence)


# --- Two models on the same test reviews ----------------------------------------------------------

@dataclass(frozen=True)
class Difference:
    """Accuracy of model A minus that of model B, with its bootstrap interval [low, high], the
    two-sided bootstrap p-value, and the number of resamples behind them."""
    difference: float
    low: float
    high: float
    p_value: float
    resamples: int = 0
    confidence: float = 0.95


def _correctness_matrix(correct: np.ndarray, name: str) -> np.ndarray:
    """(seeds, reviews) of 0/1 or bool as float64 (exact for the integer sums made of it)."""
    c = np.asarray(correct)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (seeds, reviews) array, got shape {c.shape}")
    if not np.isin(c, (0, 1)).all():
        raise ValueError(f"{name} must hold 0/1 or booleans (whether each review was right)")
    return c.astype(np.float64)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _seed_counts(seeds: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, seeds) counts: how often each seed is drawn when `seeds` are drawn with
    replacement, once per resample."""
    return rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=resamples).astype(np.float64)


def _review_counts(reviews: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """(block, reviews) counts: how often each review is drawn when `reviews` are drawn with
    replacement, once per row. Drawing indices and counting them is one bincount over the block."""
    indices = rng.integers(0, reviews, size=(block, reviews))
    indices += np.arange(block)[:, None] * reviews
    return np.bincount(indices.ravel(), minlength=block * reviews).reshape(block, reviews).astype(np.float64)


def _paired_correctness(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = _correctness_matrix(correct_a, "correct_a")
    b = _correctness_matrix(correct_b, "correct_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"correct_a and correct_b must score the same reviews, "
                         f"got {a.shape[1]} and {b.shape[1]} reviews")
    return a, b


def bootstrap_differences(correct_a: np.ndarray, correct_b: np.ndarray, rng: np.random.Generator,
                          resamples: int = 2000) -> np.ndarray:
    """The resampled differences behind paired_bootstrap (same inputs, same rng use): (resamples,)
    accuracy of A averaged over its resampled seeds minus that of B, on the resampled reviews.

    Each resample draws the reviews with replacement, the same ones for A and B (paired, so that
    reviews both models find hard do not count as a difference), and the seeds of A and of B with
    replacement, each independently.

    Memory stays bounded: a resample of reviews is a vector of counts (how often each review was
    drawn), and a model's right answers on it are correct @ counts, one number per seed, weighted by
    how often each seed was drawn. Resamples are processed in blocks of _BOOTSTRAP_BLOCK."""
    a, b = _paired_correctness(correct_a, correct_b)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    (seeds_a, reviews), seeds_b = a.shape, b.shape[0]
    weights_a = _seed_counts(seeds_a, resamples, rng)                  # (resamples, seeds_a)
    weights_b = _seed_counts(seeds_b, resamples, rng)                  # (resamples, seeds_b)
    both = np.concatenate([a, b])                                      # (seeds_a + seeds_b, reviews)
    differences = np.empty(resamples)
    for start in range(0, resamples, _BOOTSTRAP_BLOCK):
        stop = min(start + _BOOTSTRAP_BLOCK, resamples)
        counts = _review_counts(reviews, stop - start, rng)            # (block, reviews)
        right = counts @ both.T                                        # (block, seeds_a + seeds_b)
        # Integers all the way (exact in float64), so identical models give exactly zero.
        right_a = (weights_a[start:stop] * right[:, :seeds_a]).sum(axis=1) * seeds_b
        right_b = (weights_b[start:stop] * right[:, seeds_a:]).sum(axis=1) * seeds_a
        differences[start:stop] = (right_a - right_b) / (seeds_a * seeds_b * reviews)
    return differences


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, rng: np.random.Generator,
                     resamples: int = 2000, confidence: float = 0.95) -> Difference:
    """Bootstrap the difference in accuracy between model A and model B on the same test reviews.

    Inputs:
    - correct_a: (seeds_a, reviews) bool or 0/1, whether each seed of model A got each review right.
    - correct_b: (seeds_b, reviews), the same reviews in the same order for model B.
    - rng: the generator every resample is drawn from (same rng state, same result).

    The statistic is A's accuracy averaged over its seeds minus B's. The resamples are those of
    `bootstrap_differences` (reviews paired, seeds resampled independently per model). The interval
    is their percentile interval. The p-value is two-sided: twice the share of resampled
    differences on the far side of zero (a difference of exactly zero counts on both sides), with
    the +1 correction (1 + count) / (1 + resamples), capped at 1.

    Resampling both reviews and seeds counts the seeds' disagreement on single reviews twice (once
    through the reviews, once through the seeds): when seeds differ only by that, the interval is
    conservative (95% nominal covers about 99% with 3 seeds); when whole seeds differ in accuracy,
    3 seeds are few to estimate it and it can cover less. tests/test_stats.py measures both.
    """
    _check_confidence(confidence)
    a, b = _paired_correctness(correct_a, correct_b)
    differences = bootstrap_differences(a, b, rng, resamples)
    alpha = 1.0 - confidence
    low, high = np.quantile(differences, [alpha / 2.0, 1.0 - alpha / 2.0])
    far_side = min(int((differences <= 0).sum()), int((differences >= 0).sum()))
    p_value = min(1.0, 2.0 * (1 + far_side) / (1 + resamples))
    return Difference(difference=float(a.mean() - b.mean()), low=float(low), high=float(high),
                      p_value=p_value, resamples=resamples, confidence=confidence)


def bootstrap_accuracy(correct: np.ndarray, rng: np.random.Generator, resamples: int = 2000,
                       confidence: float = 0.95) -> Interval:
    """One model's accuracy with a bootstrap interval over the test reviews (and its seeds).

    correct: (seeds, reviews) 0/1, whether each replicate got each review right. The draws are
    paired_bootstrap's against a model that is never right, so the two intervals are of one kind;
    for a deterministic model (one seed) it is the plain bootstrap over reviews. sd: over seeds
    (nan for one seed)."""
    correct = _correctness_matrix(correct, "correct")
    _check_confidence(confidence)
    draws = bootstrap_differences(correct, np.zeros((1, correct.shape[1]), bool), rng, resamples)
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    per_seed = correct.mean(axis=1)
    sd = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")
    return Interval(float(per_seed.mean()), sd, float(low), float(high), len(per_seed), confidence)


def correct_predictions(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Whether each prediction is right: labels (reviews,) 0/1, probabilities (..., reviews) of the
    positive class -> (..., reviews) bool, a review called positive at P >= threshold."""
    return (np.asarray(probabilities) >= threshold) == (np.asarray(labels) == 1)


def compare_models(probabilities: dict[str, np.ndarray], labels: np.ndarray, pairs: Sequence[tuple[str, str]],
                   rng: np.random.Generator, resamples: int = 2000, threshold: float = 0.5
                   ) -> dict[tuple[str, str], tuple[Difference, tuple[int, int, float]]]:
    """For each pair (a, b): paired_bootstrap of a - b over reviews and seeds, and mcnemar on the
    two models' seed ensembles. probabilities: model -> (seeds, reviews) P(positive) of the same
    reviews, whose true labels are `labels` (reviews,)."""
    correct = {m: correct_predictions(labels, p, threshold) for m, p in probabilities.items()}
    ensemble_right = {m: correct_predictions(labels, ensemble(p), threshold) for m, p in probabilities.items()}
    return {(a, b): (paired_bootstrap(correct[a], correct[b], rng, resamples),
                     mcnemar(ensemble_right[a], ensemble_right[b])) for a, b in pairs}


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips: 2 * P(X <= min(k, n - k)),
    capped at 1 (the fair coin's distribution is symmetric). Sums the terms in log space
    (log-gamma coefficients, log-sum-exp), so that n in the tens of thousands neither overflows
    nor loses the smallest p-values to cancellation."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    k = min(k, n - k)
    if 2 * k == n:
        return 1.0
    log_n_factorial, log_half = math.lgamma(n + 1), n * math.log(0.5)
    log_terms = [log_n_factorial - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half
                 for i in range(k + 1)]
    largest = max(log_terms)
    log_tail = largest + math.log(math.fsum(math.exp(t - largest) for t in log_terms))
    return min(1.0, 2.0 * math.exp(log_tail))


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test between two models' predictions on the same reviews.

    Inputs: correct_a, correct_b, (reviews,) bool or 0/1: whether each model (typically a seed
    ensemble) got each review right.

    Returns (b, c, p_value): b reviews A got right and B wrong, c the other way round, and the
    exact two-sided binomial p-value of b among the b + c discordant reviews under p = 1/2 (the
    same as scipy.stats.binomtest(b, b + c).pvalue). Reviews both got right or both wrong say
    nothing about which model is better and do not enter."""
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must be 1-D of equal length, got {a.shape} and {b.shape}")
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("correct_a and correct_b must hold 0/1 or booleans")
    a, b = a.astype(bool), b.astype(bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return only_a, only_b, binomial_two_sided_p(only_a, only_a + only_b)


def ensemble(probabilities: np.ndarray) -> np.ndarray:
    """Seed ensemble: probabilities (seeds, reviews) of the positive class -> (reviews,) their mean
    over seeds, in the input's floating dtype."""
    p = np.asarray(probabilities)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be a (seeds, reviews) array with at least one seed, "
                         f"got shape {p.shape}")
    if not (np.isfinite(p).all() and p.min(initial=0.0) >= 0 and p.max(initial=1.0) <= 1):
        raise ValueError("probabilities must be finite and lie in [0, 1] (probabilities, not logits)")
    return p.mean(axis=0)


def replicate_band(curves: Sequence[tuple[Sequence[float], Sequence[float]]]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x (K,), mean (K,), low (K,), high (K,)) over replicates' (x, y) curves, at the K x values all of
    them reach (a replicate stopped early has a shorter curve); low and high are the min and max."""
    common = sorted(set.intersection(*(set(np.asarray(x).tolist()) for x, _ in curves)))
    ys = np.array([[dict(zip(np.asarray(x).tolist(), y))[v] for v in common] for x, y in curves], dtype=np.float64)
    return np.array(common), ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)
