"""The language model's output layer: the log-uniform sampler, the sampled and full softmax losses
(central differences in float64, exact identities between them, the sampled gradient's expectation)
and temperature sampling."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import assert_grad_close, numeric_grad
from rnn.layers import SparseRows
from rnn.losses import (full_softmax_loss, log_expected_count, log_uniform_probs, sample_log_uniform,
                        sample_next_token, sampled_softmax_loss, softmax_cross_entropy)
from rnn.text import PAD, UNK

V, H, N = 12, 4, 7


def make_layer(seed: int, v: int = V, h: int = H, n: int = N, dtype=np.float64):
    """Random (h, W, b) of an output layer, large enough that the softmax is far from uniform."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (n, h)).astype(dtype), rng.normal(0, 0.8, (v, h)).astype(dtype),
            rng.normal(0, 0.5, v).astype(dtype))


def reference_nll(h, W, b, targets):
    """-log softmax at the target, written out over the non-PAD words, position by position."""
    out = []
    for x, t in zip(h, targets):
        if t == PAD:
            continue
        logits = W[1:] @ x + b[1:]
        out.append(-np.log(np.exp(logits[t - 1]) / np.exp(logits).sum()))
    return np.array(out)


# --------------------------------------------------------------------------- the sampler

def test_log_uniform_probs_sum_to_one_and_skip_pad():
    q = log_uniform_probs(20_000)
    assert q[PAD] == 0 and np.all(q[1:] > 0) and np.all(np.diff(q[1:]) < 0)
    assert q.sum() == pytest.approx(1.0, abs=1e-12)
    assert q[UNK] == pytest.approx(np.log(2) / np.log(20_000))


def test_sampler_frequencies_match_q_and_corrections_give_the_counts():
    """One call with many draws: the merged counts, read back from the corrections, follow Q."""
    v, k = 50, 200_000
    q = log_uniform_probs(v)
    candidates, log_q = sample_log_uniform(v, k, np.random.default_rng(0))
    assert np.all(np.diff(candidates) > 0) and candidates[0] >= 1 and candidates[-1] <= v - 1
    counts = np.exp(log_expected_count(candidates, v, k) - log_q)
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-6)
    assert counts.sum() == pytest.approx(k)
    full = np.zeros(v)
    full[candidates] = counts
    sigma = np.sqrt(k * q * (1 - q))
    assert np.all(np.abs(full - k * q) <= 5 * sigma + 1e-9), np.max(np.abs(full - k * q) / (sigma + 1e-12))


def test_sampler_corrections_give_an_unbiased_sum_over_the_vocabulary():
    """sum over candidates of f(k) / exp(log_q) estimates sum over all words of f: the correction
    matches the with-replacement sampling (a wrong correction, e.g. log Q without K or without the
    counts, is off by a large factor)."""
    v, k, reps = 40, 16, 4000
    rng = np.random.default_rng(1)
    f = np.r_[0.0, rng.uniform(0.5, 2.0, v - 1)]
    estimates = []
    for _ in range(reps):
        candidates, log_q = sample_log_uniform(v, k, rng)
        estimates.append(np.sum(f[candidates] * np.exp(-log_q)))
    estimates = np.array(estimates)
    se = estimates.std() / np.sqrt(reps)
    assert abs(estimates.mean() - f.sum()) < 4 * se, (estimates.mean(), f.sum(), se)


def test_sampler_is_deterministic_for_a_seed():
    a = sample_log_uniform(1000, 512, np.random.default_rng(7))
    b = sample_log_uniform(1000, 512, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# --------------------------------------------------------------------------- sampled softmax

def fixed_sample(seed: int):
    """Targets with two ignored positions; candidates with a repeat and with accidental hits (3 and 7
    are targets too); arbitrary corrections."""
    rng = np.random.default_rng(seed)
    targets = np.array([3, PAD, 7, 1, 11, PAD, 3])
    candidates = np.array([2, 3, 5, 7, 5, 9])
    return targets, candidates, rng.normal(0, 1, candidates.size)


@pytest.mark.parametrize("denominator", [None, 5.0])
@pytest.mark.parametrize("correct_targets", [False, True])
def test_sampled_softmax_gradients_match_central_differences(denominator, correct_targets):
    h, W, b = make_layer(0)
    targets, candidates, log_q_c = fixed_sample(1)
    log_q_t = None
    if correct_targets:
        log_q_t = np.random.default_rng(2).normal(0, 1, N)
        log_q_t[targets == PAD] = -np.inf        # what log_expected_count gives at PAD: never read

    def f():
        return sampled_softmax_loss(h, W, b, targets, candidates, log_q_c, log_q_targets=log_q_t,
                                    denominator=denominator)[0]

    loss, count, dh, dW, db = sampled_softmax_loss(h, W, b, targets, candidates, log_q_c,
                                                   log_q_targets=log_q_t, denominator=denominator)
    assert count == 5 and np.isfinite(loss)
    assert_grad_close(numeric_grad(f, h), dh, "dh")
    assert_grad_close(numeric_grad(f, W), dW.to_dense(), "dW")
    assert_grad_close(numeric_grad(f, b), db.to_dense(), "db")
    assert np.all(dh[targets == PAD] == 0)


def test_sampled_softmax_sparse_rows_are_the_touched_ids():
    h, W, b = make_layer(2)
    targets, candidates, log_q_c = fixed_sample(3)
    targets = targets.copy()
    targets[1] = 10                              # 10 is touched only through this position...
    mask_10 = targets.copy()
    mask_10[1] = PAD                             # ...so ignoring it must leave row 10 out
    for t in (targets, mask_10):
        _, _, _, dW, db = sampled_softmax_loss(h, W, b, t, candidates, log_q_c)
        want = np.unique(np.r_[t[t != PAD], candidates])
        for g, shape in ((dW, W.shape), (db, b.shape)):
            assert isinstance(g, SparseRows) and g.shape == shape
            np.testing.assert_array_equal(g.rows, want)          # sorted, distinct, nothing else
            assert g.values.shape == (len(want),) + shape[1:]
        np.testing.assert_array_equal(dW.rows, db.rows)


def test_sampled_softmax_with_every_word_as_candidate_is_the_full_softmax():
    """Candidates = all words, no correction: each position's softmax runs over its target plus all
    other words (its own hit removed), which is the full softmax over the vocabulary without PAD."""
    h, W, b = make_layer(4)
    targets = np.array([3, PAD, 7, 1, 11, 2, 3])
    sampled = sampled_softmax_loss(h, W, b, targets, np.arange(1, V), np.zeros(V - 1))
    full = full_softmax_loss(h, W, b, targets)
    assert sampled[0] == pytest.approx(full[0], rel=1e-12) and sampled[1] == full[1] == 6
    np.testing.assert_allclose(sampled[2], full[2], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(sampled[3].to_dense(), full[3], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(sampled[4].to_dense(), full[4], rtol=1e-10, atol=1e-14)


def test_merged_candidates_equal_the_raw_draws():
    """A candidate drawn c times with correction log(K Q) is one candidate with log(K Q) - log(c)."""
    h, W, b = make_layer(5)
    targets = np.array([3, 4, 9, 1, 11, 2, 3])
    draws = np.array([1, 1, 1, 2, 5, 5, 3, 11, 1])
    log_q_draws = log_expected_count(draws, V, draws.size)
    merged, counts = np.unique(draws, return_counts=True)
    log_q_merged = log_expected_count(merged, V, draws.size) - np.log(counts)
    for log_q_t in (None, log_expected_count(targets, V, draws.size)):
        raw = sampled_softmax_loss(h, W, b, targets, draws, log_q_draws, log_q_targets=log_q_t)
        one = sampled_softmax_loss(h, W, b, targets, merged, log_q_merged, log_q_targets=log_q_t)
        assert raw[0] == pytest.approx(one[0], rel=1e-12)
        np.testing.assert_allclose(raw[2], one[2], rtol=1e-10, atol=1e-14)
        for g_raw, g_one in zip(raw[3:], one[3:]):
            np.testing.assert_array_equal(g_raw.rows, g_one.rows)
            np.testing.assert_allclose(g_raw.values, g_one.values, rtol=1e-10, atol=1e-14)


def test_shares_with_a_common_denominator_add_up_to_the_whole_batch():
    h, W, b = make_layer(6)
    targets, candidates, log_q_c = fixed_sample(7)
    whole = sampled_softmax_loss(h, W, b, targets, candidates, log_q_c)
    parts = [sampled_softmax_loss(h[s], W, b, targets[s], candidates, log_q_c, denominator=whole[1])
             for s in (slice(0, 3), slice(3, N))]
    assert sum(p[0] for p in parts) == pytest.approx(whole[0], rel=1e-12)
    assert sum(p[1] for p in parts) == whole[1]
    np.testing.assert_allclose(np.concatenate([p[2] for p in parts]), whole[2], rtol=1e-12)
    np.testing.assert_allclose(sum(p[3].to_dense() for p in parts), whole[3].to_dense(), rtol=1e-10)
    np.testing.assert_allclose(sum(p[4].to_dense() for p in parts), whole[4].to_dense(), rtol=1e-10)


def test_sampled_softmax_float32_stays_float32_and_close_to_float64():
    h, W, b = make_layer(8)
    targets, candidates, log_q_c = fixed_sample(9)
    ref = sampled_softmax_loss(h, W, b, targets, candidates, log_q_c)
    out = sampled_softmax_loss(*(a.astype(np.float32) for a in (h, W, b)), targets, candidates, log_q_c)
    assert out[2].dtype == out[3].values.dtype == out[4].values.dtype == np.float32
    assert out[0] == pytest.approx(ref[0], rel=1e-5)
    np.testing.assert_allclose(out[2], ref[2], rtol=1e-4, atol=1e-6)


def test_sampled_softmax_rejects_pad_candidates_and_misshaped_targets():
    h, W, b = make_layer(0)
    targets, candidates, log_q_c = fixed_sample(1)
    with pytest.raises(ValueError, match="candidates"):
        sampled_softmax_loss(h, W, b, targets, np.r_[PAD, candidates], np.r_[0.0, log_q_c])
    with pytest.raises(ValueError, match="targets"):
        sampled_softmax_loss(h, W, b, targets[:3], candidates, log_q_c)


def test_sampled_softmax_with_every_position_ignored_is_zero():
    h, W, b = make_layer(0)
    _, candidates, log_q_c = fixed_sample(1)
    loss, count, dh, dW, db = sampled_softmax_loss(h, W, b, np.zeros(N, int), candidates, log_q_c)
    assert (loss, count) == (0.0, 0) and not dh.any() and not dW.values.any() and not db.values.any()


# --------------------------------------------------------------------------- expectation

def _cosine(a, c):
    return float(np.sum(a * c) / (np.linalg.norm(a) * np.linalg.norm(c)))


def _mean_over_draws(h, W, b, targets, num_samples, reps, correct_targets=False, seed=0):
    """Average (loss, dh) of the sampled softmax over `reps` log-uniform draws."""
    v = W.shape[0]
    rng = np.random.default_rng(seed)
    log_q_t = log_expected_count(targets, v, num_samples) if correct_targets else None
    loss, dh = 0.0, np.zeros_like(h)
    for _ in range(reps):
        candidates, log_q_c = sample_log_uniform(v, num_samples, rng)
        out = sampled_softmax_loss(h, W, b, targets, candidates, log_q_c, log_q_targets=log_q_t)
        loss, dh = loss + out[0] / reps, dh + out[2] / reps
    return loss, dh


def toy_lm(seed: int):
    """V = 50 words, a bias that follows word frequency (as a trained model's does), so the target's
    probability ranges from ~0 to ~0.8 over the six positions."""
    v = 50
    h, W, b = make_layer(seed, v=v, h=8, n=6)
    b = b + 2 * np.r_[0.0, -np.log(np.arange(1, v))]
    return h, W, b, np.array([1, 2, 5, 17, 30, 49])


def test_sampled_gradient_on_average_is_the_full_softmax_gradient():
    """50 draws a step from 50 words, averaged over 2000 steps: each position's dh points along the
    full softmax's (cosine > 0.97; 0.994-0.999 over seeds 10-12) with nearly its length (ratio
    0.93-1.01), and the loss is close to the full loss (a slight underestimate: E log <= log E)."""
    h, W, b, targets = toy_lm(10)
    full_loss, _, full_dh, _, _ = full_softmax_loss(h, W, b, targets)
    loss, dh = _mean_over_draws(h, W, b, targets, num_samples=50, reps=2000)
    cosines = [_cosine(dh[i], full_dh[i]) for i in range(len(targets))]
    ratios = np.linalg.norm(dh, axis=1) / np.linalg.norm(full_dh, axis=1)
    assert min(cosines) > 0.97, cosines
    assert np.all(np.abs(ratios - 1) < 0.15), ratios
    assert loss == pytest.approx(full_loss, rel=0.05) and loss < full_loss


def test_correcting_the_target_too_overweights_well_predicted_positions():
    """TensorFlow's convention (log_q_targets = log(K Q(target)), accidental hits removed): the
    direction still agrees but positions whose target is likely get gradients several times too
    long (ratio 2.6-3.2 at K = 50, growing with K), while the default stays near 1."""
    h, W, b, targets = toy_lm(10)
    _, _, full_dh, _, _ = full_softmax_loss(h, W, b, targets)
    _, dh = _mean_over_draws(h, W, b, targets, num_samples=50, reps=500, correct_targets=True)
    ratios = np.linalg.norm(dh, axis=1) / np.linalg.norm(full_dh, axis=1)
    assert ratios.max() > 2, ratios


def test_logq_correction_makes_the_sampled_softmax_estimate_the_full_distribution():
    """The gradient of the bias on a non-target word is that word's estimated probability. With the
    correction, its average over draws is the full softmax's up to Monte Carlo noise: over layers
    made with seeds 0-5 the log-ratio's spread across words is 0.06-0.09 and the cosine 0.99-1.0.
    Without it frequent words are over-counted: spread 0.45, cosine 0.88-0.94. So the test fails if
    the correction is dropped or mismatched."""
    v, k, reps = 50, 50, 2000
    h, W, b = make_layer(11, v=v, h=8, n=1)
    W *= 0.5                                     # many words share the mass, so all of them count
    b[:] = 0                                     # logits unrelated to frequency: the correction matters
    targets = np.array([1])
    full_db = full_softmax_loss(h, W, b, targets)[4]
    others = np.ones(v, bool)
    others[[PAD, 1]] = False
    spread, cosine = {}, {}
    for corrected in (True, False):
        rng = np.random.default_rng(0)
        mean_db = np.zeros(v)
        for _ in range(reps):
            candidates, log_q_c = sample_log_uniform(v, k, rng)
            if not corrected:
                log_q_c = 0 * log_q_c
            mean_db += sampled_softmax_loss(h, W, b, targets, candidates, log_q_c)[4].to_dense() / reps
        spread[corrected] = np.log(mean_db[others] / full_db[others]).std()
        cosine[corrected] = _cosine(mean_db[others], full_db[others])
    assert spread[True] < 0.15 and cosine[True] > 0.98, (spread, cosine)
    assert spread[False] > 0.3, (spread, cosine)


# --------------------------------------------------------------------------- full softmax

def test_full_softmax_matches_the_reference_for_any_chunk_size():
    h, W, b = make_layer(12, n=11)
    targets = np.array([3, PAD, 7, 1, 11, 2, 3, PAD, 5, 6, 10])
    want = reference_nll(h, W, b, targets)
    for chunk in (1, 3, 4, 512):
        total, count = softmax_cross_entropy(h, W, b, targets, chunk_size=chunk)
        assert count == 9 and total == pytest.approx(want.sum(), rel=1e-12)
        loss = full_softmax_loss(h, W, b, targets, chunk_size=chunk)[0]
        assert loss == pytest.approx(want.mean(), rel=1e-12)


def test_full_softmax_of_a_blank_layer_has_perplexity_v_minus_one():
    """All logits equal: every word but PAD has probability 1/(V-1)."""
    h = np.random.default_rng(0).normal(size=(5, H))
    total, count = softmax_cross_entropy(h, np.zeros((V, H)), np.zeros(V), np.array([1, 2, 3, 4, 5]))
    assert np.exp(total / count) == pytest.approx(V - 1, rel=1e-12)


def test_full_softmax_is_stable_for_huge_logits():
    h, W, b = make_layer(13)
    b = b + np.r_[0, 1e4, np.zeros(V - 2)]       # word 1 takes all the mass; no overflow to inf/nan
    total, _ = softmax_cross_entropy(h * 100, W, b, np.array([1, 2, 1, 1, 1, 1, 1]))
    assert np.isfinite(total) and total > 1e3


def test_full_softmax_gradients_match_central_differences():
    h, W, b = make_layer(14)
    targets = np.array([3, PAD, 7, 1, 11, 2, 3])

    def f():
        return full_softmax_loss(h, W, b, targets, chunk_size=3, denominator=4.0)[0]

    _, count, dh, dW, db = full_softmax_loss(h, W, b, targets, chunk_size=3, denominator=4.0)
    assert count == 6
    assert_grad_close(numeric_grad(f, h), dh, "dh")
    assert_grad_close(numeric_grad(f, W), dW, "dW")
    assert_grad_close(numeric_grad(f, b), db, "db")
    assert not dW[PAD].any() and db[PAD] == 0 and not dh[1].any()


# --------------------------------------------------------------------------- temperature sampling

def test_next_token_is_reproducible_for_a_seed():
    logits = np.random.default_rng(0).normal(size=(64, 30))
    a = sample_next_token(logits, 0.8, np.random.default_rng(3))
    b = sample_next_token(logits, 0.8, np.random.default_rng(3))
    c = sample_next_token(logits, 0.8, np.random.default_rng(4))
    assert a.shape == (64,) and a.dtype.kind == "i"
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


def test_small_temperature_gives_the_argmax_of_the_allowed_ids():
    logits = np.random.default_rng(1).normal(size=(20, 30))
    logits[:5, PAD] = logits[5:10, UNK] = 50.0   # excluded, however likely
    allowed = logits.copy()
    allowed[:, [PAD, UNK]] = -np.inf
    want = allowed.argmax(1)
    for t in (0.0, 1e-3):
        np.testing.assert_array_equal(sample_next_token(logits, t, np.random.default_rng(0)), want)
    assert int(sample_next_token(logits[0], 0.0, np.random.default_rng(0))) == want[0]


def test_excluded_ids_are_never_drawn_and_the_rest_follow_the_softmax():
    v, n, t = 6, 40_000, 0.5
    logits = np.array([3.0, 3.0, 0.2, -0.4, 0.0, 0.5])       # PAD and UNK the most likely
    draws = sample_next_token(np.tile(logits, (n, 1)), t, np.random.default_rng(0))
    counts = np.bincount(draws, minlength=v)
    assert counts[PAD] == counts[UNK] == 0
    z = logits[2:] / t
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts[2:] - n * p) < 5 * sigma), (counts, n * p)


def test_next_token_rejects_bad_temperature_and_full_exclusion():
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(np.zeros(5), -1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="excluded"):
        sample_next_token(np.zeros(2), 1.0, np.random.default_rng(0))


def test_special_ids_are_the_tokenizers():
    from rnn import losses, text

    assert (losses.PAD, losses.UNK) == (text.PAD, text.UNK)
