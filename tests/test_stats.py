"""rnn.stats: the Student-t quantile and binomial p-values against SciPy, hand-computed cases, the
bootstrap's variance against its exact expectation, and coverage of the intervals in simulations
where the truth is known."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats as sps

import rnn.stats as rs
from rnn.stats import (Difference, Interval, binomial_two_sided_p, bootstrap_differences, ensemble, mcnemar,
                       mean_interval, paired_bootstrap, regularized_beta, student_t_cdf, student_t_quantile)

PROBABILITIES = (1e-7, 1e-4, 0.001, 0.01, 0.025, 0.05, 0.1, 0.25, 0.4, 0.499, 0.5, 0.501, 0.6, 0.75,
                 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 1 - 1e-4, 1 - 1e-7)


# --- Student's t ----------------------------------------------------------------------------------

def test_t_quantile_matches_scipy_for_df_1_to_100():
    for df in range(1, 101):
        for p in PROBABILITIES:
            expected = sps.t.ppf(p, df)
            assert abs(student_t_quantile(p, df) - expected) <= 1e-8 * max(1.0, abs(expected)), (df, p)


@pytest.mark.parametrize("df", [0.3, 1.5, 2.5, 250.0, 5000.0])
def test_t_quantile_matches_scipy_for_other_df(df):
    for p in (0.005, 0.05, 0.3, 0.9, 0.975):
        assert student_t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-8, abs=1e-10)


def test_t_quantile_closed_forms():
    # df=1 is the Cauchy distribution, df=2 has F^-1(p) = (2p - 1) / sqrt(2p(1 - p)).
    for p in (0.01, 0.2, 0.7, 0.975):
        assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert student_t_quantile(0.5, 7) == 0.0
    assert student_t_quantile(0.1, 7) == pytest.approx(-student_t_quantile(0.9, 7), rel=1e-14)


def test_t_cdf_and_regularized_beta_match_scipy():
    for df in (1, 2, 3, 10, 30, 100):
        for t in (-40.0, -3.0, -0.5, 0.0, 0.2, 1.96, 12.0):
            assert student_t_cdf(t, df) == pytest.approx(sps.t.cdf(t, df), rel=1e-10, abs=1e-15)
    for a, b in ((0.5, 0.5), (0.5, 50.0), (3.0, 0.5), (20.0, 7.0), (200.0, 0.5)):
        for x in (0.0, 1e-6, 0.1, 0.5, 0.9, 0.999, 1.0):
            assert regularized_beta(x, a, b) == pytest.approx(special.betainc(a, b, x), rel=1e-10, abs=1e-15)


def test_t_quantile_rejects_bad_arguments():
    for p, df in ((0.0, 3), (1.0, 3), (1.2, 3), (0.5, 0), (0.9, -1)):
        with pytest.raises(ValueError):
            student_t_quantile(p, df)


# --- mean_interval --------------------------------------------------------------------------------

def test_mean_interval_by_hand():
    result = mean_interval([1.0, 2.0, 3.0])
    half_width = 4.302652729749464 / math.sqrt(3)   # t_{0.975, 2} * sd / sqrt(n), sd = 1
    assert isinstance(result, Interval)
    assert (result.mean, result.sd, result.n) == (2.0, 1.0, 3)
    assert result.low == pytest.approx(2.0 - half_width, rel=1e-12)
    assert result.high == pytest.approx(2.0 + half_width, rel=1e-12)


def test_mean_interval_matches_scipy():
    values = [0.861, 0.874, 0.869, 0.858, 0.880]
    for confidence in (0.8, 0.95, 0.99):
        result = mean_interval(values, confidence)
        low, high = sps.t.interval(confidence, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
        assert (result.low, result.high) == pytest.approx((low, high), rel=1e-10)
        assert result.confidence == confidence


def test_mean_interval_of_one_value_has_no_spread():
    result = mean_interval([0.87])
    assert math.isnan(result.sd)
    assert (result.mean, result.low, result.high, result.n) == (0.87, 0.87, 0.87, 1)


def test_mean_interval_of_equal_values_is_a_point():
    result = mean_interval([0.5, 0.5, 0.5, 0.5])
    assert (result.sd, result.low, result.high) == (0.0, 0.5, 0.5)


@pytest.mark.parametrize("values, confidence", [([], 0.95), ([1.0, float("nan")], 0.95),
                                                 ([[1.0, 2.0]], 0.95), ([1.0, 2.0], 1.0)])
def test_mean_interval_rejects_bad_input(values, confidence):
    with pytest.raises(ValueError):
        mean_interval(values, confidence)


def test_mean_interval_covers_the_true_mean_of_normal_data():
    rng = np.random.default_rng(0)
    simulations, n = 2000, 4
    covered = 0
    for _ in range(simulations):
        result = mean_interval(rng.normal(0.85, 0.01, size=n))
        covered += result.low <= 0.85 <= result.high
    # 95% expected; the binomial sd over 2000 simulations is 0.005.
    assert 0.93 <= covered / simulations <= 0.97


# --- paired_bootstrap -----------------------------------------------------------------------------

def random_correct(rng, seeds, reviews, accuracy):
    return rng.random((seeds, reviews)) < accuracy


def test_identical_models_differ_by_exactly_zero():
    rng = np.random.default_rng(0)
    one_seed = random_correct(rng, 1, 300, 0.8)
    result = paired_bootstrap(one_seed, one_seed.copy(), np.random.default_rng(1), resamples=500)
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    # Several seeds that agree on every review: resampling seeds changes nothing either.
    three_seeds = np.repeat(one_seed, 3, axis=0)
    result = paired_bootstrap(three_seeds, one_seed, np.random.default_rng(1), resamples=500)
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_a_model_always_right_against_one_always_wrong():
    right, wrong = np.ones((3, 50), dtype=bool), np.zeros((2, 50), dtype=bool)
    result = paired_bootstrap(right, wrong, np.random.default_rng(0), resamples=99)
    assert isinstance(result, Difference)
    assert (result.difference, result.low, result.high) == (1.0, 1.0, 1.0)
    assert result.p_value == 2 * (1 + 0) / (1 + 99)       # no resample on the far side of zero
    reverse = paired_bootstrap(wrong, right, np.random.default_rng(0), resamples=99)
    assert (reverse.difference, reverse.low, reverse.high, reverse.p_value) == (-1.0, -1.0, -1.0, 0.02)


def test_difference_is_mean_accuracy_over_seeds():
    a = np.array([[1, 1, 0, 1], [1, 0, 0, 1]])            # seed accuracies 0.75, 0.5
    b = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]])  # 0.25, 0.25, 0.5
    result = paired_bootstrap(a, b, np.random.default_rng(0), resamples=10)
    assert result.difference == pytest.approx(0.625 - 1 / 3)


def expected_bootstrap_variance(a: np.ndarray, b: np.ndarray) -> float:
    """The exact variance of a resampled difference under the documented scheme.

    Review counts w ~ Multinomial(R, 1/R) give Var(sum_r w_r x_r / R) = var(x) / R (var with
    ddof=0). Given w, A's accuracy is a mean of S draws from its seeds' accuracies under w, whose
    variance is the spread of those seed accuracies over S; its expectation over w adds each seed's
    deviation from the seed mean, e_sr = a_sr - mean_s a_sr, seen through w:
    E[(sum_r w_r e_sr / R)^2] = mean_r(e_sr)^2 + var_r(e_sr) / R."""
    reviews = a.shape[1]
    total = (a.mean(axis=0) - b.mean(axis=0)).var() / reviews
    for m in (a.astype(float), b.astype(float)):
        e = m - m.mean(axis=0)
        total += (e.mean(axis=1) ** 2 + e.var(axis=1) / reviews).mean() / m.shape[0]
    return total


def test_bootstrap_variance_matches_the_resampling_scheme():
    # Reviews shared by both models (paired), seeds independent: a scheme that resampled A's and
    # B's reviews separately, or skipped the seeds, would miss this variance by far more than 10%.
    # Most reviews are either easy or hard for both models, so pairing matters.
    rng = np.random.default_rng(3)
    easiness = rng.beta(0.2, 0.1, size=300)
    a = rng.random((3, 300)) < easiness
    b = rng.random((2, 300)) < np.clip(easiness - 0.05, 0, 1)
    resamples = 4000
    draws = bootstrap_differences(a, b, np.random.default_rng(4), resamples)
    expected = expected_bootstrap_variance(a, b)
    # The variance of 4000 draws is within 10% of its expectation (relative sd ~ sqrt(2/4000) = 2%).
    assert draws.var() == pytest.approx(expected, rel=0.10)
    assert draws.mean() == pytest.approx(a.mean() - b.mean(), abs=4 * math.sqrt(expected / resamples))
    # Unpaired reviews would add both models' review-to-review spread: much larger here.
    unpaired = (a.mean(axis=0).var() + b.mean(axis=0).var()) / 300
    assert unpaired > 2 * expected
    # Without resampling the seeds, the variance would be the paired reviews' alone: clearly less.
    reviews_only = (a.mean(axis=0) - b.mean(axis=0)).var() / 300
    assert reviews_only < 0.8 * expected


def test_bootstrap_summarises_its_differences(monkeypatch):
    rng = np.random.default_rng(5)
    a, b = random_correct(rng, 3, 200, 0.8), random_correct(rng, 3, 200, 0.78)
    draws = bootstrap_differences(a, b, np.random.default_rng(6), 500)
    result = paired_bootstrap(a, b, np.random.default_rng(6), resamples=500, confidence=0.9)
    assert (result.low, result.high) == pytest.approx(tuple(np.quantile(draws, [0.05, 0.95])), rel=1e-12)
    far_side = min((draws <= 0).sum(), (draws >= 0).sum())
    assert result.p_value == min(1.0, 2 * (1 + far_side) / 501)
    assert (result.resamples, result.confidence) == (500, 0.9)
    # The block size bounds memory only: it does not change a single draw.
    monkeypatch.setattr(rs, "_BOOTSTRAP_BLOCK", 7)
    assert np.array_equal(bootstrap_differences(a, b, np.random.default_rng(6), 500), draws)


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(7)
    a, b = random_correct(rng, 3, 250, 0.85), random_correct(rng, 2, 250, 0.83)
    first = paired_bootstrap(a, b, np.random.default_rng(42), resamples=300)
    assert paired_bootstrap(a, b, np.random.default_rng(42), resamples=300) == first
    assert paired_bootstrap(a, b, np.random.default_rng(43), resamples=300) != first


def test_a_real_difference_is_found():
    # A is right on 5% more of 2000 reviews: the same answers, except 100 reviews that every seed
    # of A gets right and every seed of B wrong.
    rng = np.random.default_rng(8)
    b = random_correct(rng, 3, 2000, 0.8)
    a = b.copy()
    changed = rng.choice(2000, size=100, replace=False)
    a[:, changed], b[:, changed] = True, False
    result = paired_bootstrap(a, b, np.random.default_rng(9), resamples=1000)
    assert result.difference == pytest.approx(0.05)
    assert 0 < result.low < 0.05 < result.high
    assert result.p_value == 2 / 1001      # no resample at or below zero


@pytest.mark.parametrize("seeds, low, high", [(1, 0.88, 0.99), (3, 0.96, 1.0)])
def test_bootstrap_coverage_for_identical_models(seeds, low, high):
    """Two models with the same chance of being right on each review, every seed an independent
    draw: the true difference is zero. With one seed per model the bootstrap is the plain paired
    bootstrap over reviews and its 95% interval covers zero about 95% of the time. With 3 seeds it
    also resamples seeds, which counts the seeds' disagreement a second time: the interval is wider
    by about sqrt(1 + (S - 1) / S), so it covers P(|Z| < 1.96 * 1.29) = 99% (documented in
    paired_bootstrap). The binomial sd of a coverage over 200 simulations is 0.015 at 95%."""
    rng = np.random.default_rng(10 + seeds)
    simulations, reviews = 200, 400
    covered = rejected = 0
    for _ in range(simulations):
        chance_right = rng.beta(4, 1, size=reviews)
        a = rng.random((seeds, reviews)) < chance_right
        b = rng.random((seeds, reviews)) < chance_right
        result = paired_bootstrap(a, b, rng, resamples=300)
        covered += result.low <= 0 <= result.high
        rejected += result.p_value < 0.05
    assert low <= covered / simulations <= high
    assert rejected / simulations <= 1 - low + 0.02


@pytest.mark.parametrize("a, b", [(np.ones((3, 5)), np.ones((3, 6))),      # different reviews
                                  (np.ones(5), np.ones((1, 5))),           # no seed axis
                                  (np.full((2, 4), 0.5), np.ones((2, 4))),  # not 0/1
                                  (np.ones((0, 4)), np.ones((1, 4)))])      # no seeds
def test_bootstrap_rejects_bad_input(a, b):
    with pytest.raises(ValueError):
        paired_bootstrap(a, b, np.random.default_rng(0), resamples=10)


# --- McNemar --------------------------------------------------------------------------------------

def predictions_with(only_a: int, only_b: int, both: int = 7, neither: int = 3
                     ) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * only_a + [False] * only_b + [True] * both + [False] * neither)
    b = np.array([False] * only_a + [True] * only_b + [True] * both + [False] * neither)
    return a, b


def test_mcnemar_by_hand():
    assert mcnemar(*predictions_with(5, 0)) == (5, 0, 2 * 0.5 ** 5)
    assert mcnemar(*predictions_with(0, 5)) == (0, 5, 2 * 0.5 ** 5)
    assert mcnemar(*predictions_with(4, 4)) == (4, 4, 1.0)
    assert mcnemar(*predictions_with(0, 0)) == (0, 0, 1.0)
    # 1 of 3 discordant: 2 * P(X <= 1) = 2 * (1 + 3) / 8 = 1, capped.
    assert mcnemar(*predictions_with(1, 2))[2] == 1.0
    # 1 of 6: 2 * (1 + 6) / 64.
    assert mcnemar(*predictions_with(1, 5))[2] == pytest.approx(14 / 64, rel=1e-13)


@pytest.mark.parametrize("k, n", [(0, 1), (3, 10), (7, 10), (10, 25), (40, 100), (49, 99), (450, 1000),
                                  (2600, 5000), (5400, 11000), (2000, 5000), (9000, 12000)])
def test_binomial_p_matches_scipy(k, n):
    expected = sps.binomtest(k, n, 0.5).pvalue
    assert binomial_two_sided_p(k, n) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_matches_scipy_on_random_predictions():
    rng = np.random.default_rng(11)
    a, b = rng.random(25_000) < 0.88, rng.random(25_000) < 0.87
    only_a, only_b, p_value = mcnemar(a, b)
    assert (only_a, only_b) == (int((a & ~b).sum()), int((b & ~a).sum()))
    assert p_value == pytest.approx(sps.binomtest(only_a, only_a + only_b).pvalue, rel=1e-9)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError):
        mcnemar(np.ones(4, dtype=bool), np.ones(5, dtype=bool))
    with pytest.raises(ValueError):
        mcnemar(np.ones((2, 4), dtype=bool), np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError):
        mcnemar(np.array([0.3, 1.0]), np.array([1.0, 1.0]))


# --- ensemble -------------------------------------------------------------------------------------

def test_ensemble_is_the_mean_over_seeds():
    probabilities = np.array([[0.9, 0.2, 0.5], [0.7, 0.4, 0.5]], dtype=np.float32)
    averaged = ensemble(probabilities)
    assert averaged.shape == (3,) and averaged.dtype == np.float32
    np.testing.assert_allclose(averaged, [0.8, 0.3, 0.5], rtol=1e-6)
    with pytest.raises(ValueError):
        ensemble(np.array([0.5, 0.5]))
    with pytest.raises(ValueError):
        ensemble(np.array([[2.3, -1.0]]))   # logits, not probabilities


def test_bootstrap_accuracy_is_the_accuracy_with_an_interval_over_reviews():
    rng = np.random.default_rng(0)
    correct = rng.random((1, 4000)) < 0.8
    interval = rs.bootstrap_accuracy(correct, np.random.default_rng(1), resamples=1000)
    assert interval.mean == pytest.approx(correct.mean()) and interval.n == 1 and np.isnan(interval.sd)
    # The binomial standard error of an accuracy of 0.8 on 4000 reviews is 0.0063: the 95% interval
    # is about +-1.96 of it.
    se = np.sqrt(0.8 * 0.2 / 4000)
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert interval.low < interval.mean < interval.high
    three = rs.bootstrap_accuracy(np.vstack([correct, correct, ~correct]), np.random.default_rng(1), 1000)
    assert three.mean == pytest.approx(np.mean([correct.mean()] * 2 + [1 - correct.mean()])) and three.sd > 0


# --- curves over replicates ---------------------------------------------------------------------

def test_replicate_band_keeps_the_x_every_replicate_reaches():
    x, mean, low, high = rs.replicate_band([([1, 2, 3], [0.5, 0.7, 0.8]), ([1, 2], [0.6, 0.9])])
    np.testing.assert_array_equal(x, [1, 2])
    np.testing.assert_allclose(mean, [0.55, 0.8])
    np.testing.assert_allclose(low, [0.5, 0.7])
    np.testing.assert_allclose(high, [0.6, 0.9])


def test_replicate_band_matches_x_by_value_not_by_position():
    x, mean, _, _ = rs.replicate_band([([0, 5], [1.0, 2.0]), ([5, 0], [4.0, 3.0])])
    np.testing.assert_allclose(mean, [2.0, 3.0])
