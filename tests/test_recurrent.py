"""The sequence layer: backpropagation through time over padded, length-sorted batches, in both
directions, checked against central differences, against each sequence run alone, and for the
bookkeeping around it (initial states, masking, gradient traces, denormal flushing)."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import assert_sequence_grads_close
from rnn.cells import CELLS
from rnn.recurrent import BUFFERS, flush_threshold, sequence_backward, sequence_forward

KINDS = tuple(CELLS)
D, H = 3, 3
LENGTHS = {1: np.array([3]), 4: np.array([5, 3, 3, 1])}     # batch size -> sorted lengths
T = 5


def make_layer(kind: str, B: int, seed: int, dtype=np.float64, scale: float = 0.5):
    """Random params with non-zero biases, input, initial states and upstream gradients for a
    padded batch of B sequences (lengths from LENGTHS, padded to T)."""
    rng = np.random.default_rng(seed)
    cell = CELLS[kind]
    G = cell.gates
    params = {"W_x": rng.normal(0, scale, (D, G * H)), "W_h": rng.normal(0, scale, (H, G * H)),
              "b": rng.normal(0, 0.3, G * H)}
    if kind == "gru_after":
        params["b_hn"] = rng.normal(0, 0.3, H)
    params = {k: v.astype(dtype) for k, v in params.items()}
    X = rng.normal(0, 1, (T, B, D)).astype(dtype)
    state0 = tuple(rng.normal(0, 0.5, (B, H)).astype(dtype) for _ in range(cell.states))
    d_out = rng.normal(0, 1, (T, B, H)).astype(dtype)       # non-zero on padded steps too
    d_final = tuple(rng.normal(0, 1, (B, H)).astype(dtype) for _ in range(cell.states))
    return params, X, LENGTHS[B], state0, d_out, d_final


def upstream_loss(outputs, finals, d_out, d_final) -> float:
    """The scalar whose gradients w.r.t. outputs and final states are d_out and d_final."""
    return float((outputs * d_out).sum() + sum((f * g).sum() for f, g in zip(finals, d_final)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("B", sorted(LENGTHS))
def test_sequence_gradients(kind, reverse, B):
    params, X, lengths, state0, d_out, d_final = make_layer(kind, B, seed=B + 10 * reverse)

    def loss():
        outputs, finals, _ = sequence_forward(X, lengths, params, kind, state0, reverse)
        return upstream_loss(outputs, finals, d_out, d_final)

    _, _, cache = sequence_forward(X, lengths, params, kind, state0, reverse)
    dX, grads, d_state0, _ = sequence_backward(d_out, d_final, cache)
    assert_sequence_grads_close(loss, params, grads, X, dX, state0, d_state0, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_batch_equals_each_sequence_run_alone(kind, reverse):
    """Padded steps neither change the state nor receive gradient: every row of a padded batch
    gives what the sequence gives alone, unpadded; the reverse direction is the forward direction
    over the sequence reversed within its own length."""
    params, X, lengths, state0, d_out, d_final = make_layer(kind, 4, seed=3)
    outputs, finals, cache = sequence_forward(X, lengths, params, kind, state0, reverse)
    dX, grads, d_state0, _ = sequence_backward(d_out, d_final, cache)
    for b, n in enumerate(lengths):
        x = X[:n, b:b + 1]
        s0 = tuple(s[b:b + 1] for s in state0)
        go = d_out[:n, b:b + 1]
        gf = tuple(g[b:b + 1] for g in d_final)
        if reverse:                          # forward over the reversed sequence, flipped back
            o, f, c = sequence_forward(x[::-1].copy(), np.array([n]), params, kind, s0)
            dx, g, ds0, _ = sequence_backward(go[::-1].copy(), gf, c)
            o, dx = o[::-1], dx[::-1]
        else:
            o, f, c = sequence_forward(x, np.array([n]), params, kind, s0)
            dx, g, ds0, _ = sequence_backward(go, gf, c)
        np.testing.assert_allclose(outputs[:n, b:b + 1], o, rtol=1e-12, atol=1e-14)
        assert np.all(outputs[n:, b] == 0), "outputs at padded steps must be exactly zero"
        for k in range(len(f)):
            np.testing.assert_allclose(finals[k][b:b + 1], f[k], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(d_state0[k][b:b + 1], ds0[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(dX[:n, b:b + 1], dx, rtol=1e-12, atol=1e-14)
        assert np.all(dX[n:, b] == 0), "padded steps must receive exactly zero gradient"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_padded_inputs_change_nothing(kind, reverse):
    params, X, lengths, state0, d_out, d_final = make_layer(kind, 4, seed=4)
    results = []
    for fill in (0.0, 1e3):
        X2 = X.copy()
        for b, n in enumerate(lengths):
            X2[n:, b] = fill
        outputs, finals, cache = sequence_forward(X2, lengths, params, kind, state0, reverse)
        results.append((outputs, finals, *sequence_backward(d_out, d_final, cache)[:3]))
    (o1, f1, dX1, g1, s1), (o2, f2, dX2, g2, s2) = results
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(dX1, dX2)
    for a, b in zip(f1 + s1, f2 + s2):
        np.testing.assert_array_equal(a, b)
    for name in g1:
        np.testing.assert_array_equal(g1[name], g2[name], err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_upstream_gradients_mean_zero(kind):
    """`None` for the outputs' or the final states' gradient is the same as passing zeros."""
    params, X, lengths, state0, d_out, d_final = make_layer(kind, 4, seed=5)
    _, _, cache = sequence_forward(X, lengths, params, kind, state0)
    zeros = tuple(np.zeros_like(g) for g in d_final)
    for args, same in (((None, d_final), (np.zeros_like(d_out), d_final)),
                       ((d_out, None), (d_out, zeros)),
                       ((d_out, (d_final[0],) + (None,) * (len(d_final) - 1)),
                        (d_out, (d_final[0],) + zeros[1:]))):
        got, want = sequence_backward(*args, cache), sequence_backward(*same, cache)
        np.testing.assert_array_equal(got[0], want[0])
        for name in got[1]:
            np.testing.assert_array_equal(got[1][name], want[1][name])
        for a, b in zip(got[2], want[2]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_initial_state_gradient_scales_with_mean_loss(kind):
    """For L = mean over the batch of per-example losses, dL/d(state0) of row b is that example's
    own gradient divided by B, never the sum over the batch or a factor B off."""
    params, X, lengths, state0, d_out, d_final = make_layer(kind, 4, seed=6)
    B = len(lengths)
    _, _, cache = sequence_forward(X, lengths, params, kind, state0)
    _, _, d_state0, _ = sequence_backward(d_out / B, tuple(g / B for g in d_final), cache)
    for b, n in enumerate(lengths):
        _, _, c = sequence_forward(X[:n, b:b + 1], np.array([n]), params, kind,
                                   tuple(s[b:b + 1] for s in state0))
        _, _, alone, _ = sequence_backward(d_out[:n, b:b + 1], tuple(g[b:b + 1] for g in d_final), c)
        for k in range(len(alone)):
            np.testing.assert_allclose(d_state0[k][b], alone[k][0] / B, rtol=1e-12, atol=1e-15)


def test_lstm_states_never_alias():
    params, X, lengths, state0, d_out, d_final = make_layer("lstm", 4, seed=7)
    a0, c0 = state0
    a0_copy, c0_copy = a0.copy(), c0.copy()
    outputs, finals, cache = sequence_forward(X, lengths, params, "lstm", state0)
    bufs = cache.buffers
    for i in range(len(bufs)):
        for j in range(i + 1, len(bufs)):
            assert not np.shares_memory(bufs[i], bufs[j]), f"buffers {i} and {j} overlap"
        assert not np.shares_memory(bufs[i], a0) and not np.shares_memory(bufs[i], c0)
    assert not np.shares_memory(finals[0], finals[1])
    a0 += 100.0                              # the cache took copies: backward is unaffected
    c0 -= 100.0
    _, grads, d_state0, _ = sequence_backward(d_out, d_final, cache)
    _, _, cache2 = sequence_forward(X, lengths, params, "lstm", (a0_copy, c0_copy))
    _, grads2, d_state0_2, _ = sequence_backward(d_out, d_final, cache2)
    for name in grads:
        np.testing.assert_array_equal(grads[name], grads2[name])
    da0, dc0 = d_state0
    assert da0 is not dc0 and not np.shares_memory(da0, dc0)
    for d in d_state0:
        for arr in (a0, c0, d_out, *d_final, *bufs):
            assert not np.shares_memory(d, arr)
    np.testing.assert_array_equal(da0, d_state0_2[0])
    np.testing.assert_array_equal(dc0, d_state0_2[1])
    assert not np.array_equal(da0, dc0)
    dc0_before = dc0.copy()
    da0 += 1.0
    np.testing.assert_array_equal(dc0, dc0_before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_backward_is_repeatable_and_leaves_inputs_alone(kind, reverse):
    params, X, lengths, state0, d_out, d_final = make_layer(kind, 4, seed=8)
    keep = {"X": X.copy(), "d_out": d_out.copy(), **{f"p.{k}": v.copy() for k, v in params.items()},
            **{f"d_final{k}": g.copy() for k, g in enumerate(d_final)},
            **{f"state0{k}": s.copy() for k, s in enumerate(state0)}}
    _, _, cache = sequence_forward(X, lengths, params, kind, state0, reverse)
    first = sequence_backward(d_out, d_final, cache, trace=True)
    second = sequence_backward(d_out, d_final, cache, trace=True)
    np.testing.assert_array_equal(first[0], second[0])
    for name in first[1]:
        np.testing.assert_array_equal(first[1][name], second[1][name])
    for a, b in zip(first[2], second[2]):
        np.testing.assert_array_equal(a, b)
    current = {"X": X, "d_out": d_out, **{f"p.{k}": v for k, v in params.items()},
               **{f"d_final{k}": g for k, g in enumerate(d_final)},
               **{f"state0{k}": s for k, s in enumerate(state0)}}
    for name, value in keep.items():
        np.testing.assert_array_equal(current[name], value, err_msg=f"{name} was modified")


@pytest.mark.parametrize("bad", [np.array([2, 3, 1]), np.array([4, 0]), np.array([6, 2])])
def test_bad_lengths_raise(bad):
    params, X, *_ = make_layer("rnn", 4, seed=9)
    with pytest.raises(ValueError, match="lengths"):
        sequence_forward(X[:, :len(bad)], bad, params, "rnn")


# ------------------------------------------------------------------------------ gradient traces
@pytest.mark.parametrize("kind", KINDS)
def test_trace_counts_and_distance_zero(kind):
    params, X, lengths, state0, _, d_final = make_layer(kind, 4, seed=11)
    _, _, cache = sequence_forward(X, lengths, params, kind, state0)
    *_, traces = sequence_backward(None, d_final, cache, trace=True)
    assert set(traces) == ({"a", "c"} if kind == "lstm" else {"a"})
    for k, name in enumerate(sorted(traces)):
        sums, counts = traces[name]
        assert sums.dtype == np.float64
        np.testing.assert_array_equal(counts, [(lengths > d).sum() for d in range(T)])
        np.testing.assert_allclose(sums[0], np.linalg.norm(d_final[k], axis=1).sum(), rtol=1e-12)


@pytest.mark.parametrize("kind", ["rnn", "gru_after", "lstm"])
def test_trace_is_the_norm_of_the_state_gradient_at_each_distance(kind):
    """Independent reference: dL/d(state at step t) is the initial-state gradient of the same
    layer restarted at step t+1 from the states it had reached."""
    params, X, lengths, state0, d_out, d_final = make_layer(kind, 1, seed=12)
    n = int(lengths[0])
    _, _, cache = sequence_forward(X, lengths, params, kind, state0)
    *_, traces = sequence_backward(d_out, d_final, cache, trace=True)
    for t in range(n):
        d = n - 1 - t                                    # distance from the last real token
        if t == n - 1:
            expected = d_final
            expected = (expected[0] + d_out[t, :1],) + tuple(expected[1:])
        else:
            outs, fins, _ = sequence_forward(X[:t + 1, :1], np.array([t + 1]), params, kind, state0)
            _, _, c = sequence_forward(X[t + 1:n, :1], np.array([n - t - 1]), params, kind, fins)
            _, _, ds, _ = sequence_backward(d_out[t + 1:n, :1], d_final, c)
            expected = (ds[0] + d_out[t, :1],) + tuple(ds[1:])
        for k, name in enumerate(sorted(traces)):
            sums, counts = traces[name]
            assert counts[d] == 1
            np.testing.assert_allclose(sums[d], np.linalg.norm(expected[k]), rtol=1e-10,
                                       err_msg=f"{name} at distance {d}")


def test_trace_is_computed_in_float64():
    """A float32 gradient of 1e-25 is a normal number but its square underflows in float32."""
    params, X, lengths, state0, _, _ = make_layer("rnn", 4, seed=13, dtype=np.float32)
    _, _, cache = sequence_forward(X, lengths, params, "rnn", state0)
    tiny_grad = np.full((4, H), 1e-25, np.float32)
    assert tiny_grad[0, 0] > flush_threshold(np.float32)
    *_, traces = sequence_backward(None, (tiny_grad,), cache, trace=True)
    sums, counts = traces["a"]
    np.testing.assert_allclose(sums[0] / counts[0], np.sqrt(H) * float(np.float32(1e-25)), rtol=1e-6)


def test_flushing_sets_tiny_gradients_to_zero_without_nan():
    threshold = flush_threshold(np.float32)
    assert np.finfo(np.float32).tiny < threshold < 1e-20
    params, X, lengths, state0, d_out, d_final = make_layer("lstm", 4, seed=14, dtype=np.float32)
    _, _, cache = sequence_forward(X, lengths, params, "lstm", state0)
    below = tuple(np.full_like(g, threshold / 4) for g in d_final)
    dX, grads, d_state0, traces = sequence_backward(None, below, cache, trace=True)
    assert np.all(dX == 0) and all(np.all(g == 0) for g in grads.values())
    assert all(np.all(d == 0) for d in d_state0)
    assert traces["a"][0][0] > 0, "the trace records the gradient before it is flushed"
    above = tuple(np.full_like(g, threshold * 4) for g in d_final)
    dX, grads, _, _ = sequence_backward(None, above, cache)
    assert np.any(dX != 0) and np.all(np.isfinite(dX))


def test_vanishing_gradient_is_flushed_to_exact_zero():
    """Through many steps with tiny recurrent weights the gradient would sink into float32's
    denormal range; it becomes exactly zero instead, and nothing turns NaN."""
    rng = np.random.default_rng(15)
    steps, B = 40, 2
    params = {"W_x": rng.normal(0, 0.5, (D, H)).astype(np.float32),
              "W_h": np.full((H, H), 0.01, np.float32), "b": np.zeros(H, np.float32)}
    X = rng.normal(0, 1, (steps, B, D)).astype(np.float32)
    _, _, cache = sequence_forward(X, np.array([steps, steps]), params, "rnn")
    d_final = (np.ones((B, H), np.float32),)
    dX, grads, _, traces = sequence_backward(None, d_final, cache, trace=True)
    sums, _ = traces["a"]
    assert sums[0] > 0 and sums[-1] == 0, "far from the end the gradient must be flushed to 0"
    flushed = np.flatnonzero(sums == 0)[0]
    assert np.all(sums[flushed:] == 0) and np.all(sums[:flushed] > 0)
    assert np.all(dX[:steps - flushed] == 0), "steps past the flush point get no gradient"
    for g in (dX, *grads.values()):
        assert np.all(np.isfinite(g))


def run_layer(kind, B, seed, reverse=False):
    params, X, lengths, state0, d_out, d_final = make_layer(kind, B, seed=seed)
    outputs, finals, cache = sequence_forward(X, lengths, params, kind, state0, reverse)
    return outputs, finals, cache, (d_out, d_final)


@pytest.mark.parametrize("kind", KINDS)
def test_reused_buffers_hold_no_stale_values(kind):
    """The layers' buffers are reused from call to call (BUFFERS): a padded batch after a batch
    whose buffers were left full of NaN gives the numbers of a fresh pool, NaN-free."""
    BUFFERS.clear()
    outputs, finals, cache, (d_out, d_final) = run_layer(kind, 4, seed=11, reverse=True)
    fresh = (outputs.copy(), [f.copy() for f in finals], *sequence_backward(d_out, d_final, cache)[:2])
    del outputs, finals, cache
    for buf in BUFFERS._buffers:                       # what a diverged earlier batch might leave
        buf.fill(np.nan)
    outputs, finals, cache, (d_out, d_final) = run_layer(kind, 4, seed=11, reverse=True)
    dX, grads = sequence_backward(d_out, d_final, cache)[:2]
    assert len(BUFFERS._buffers) > 0 and np.all(np.isfinite(outputs)) and np.all(np.isfinite(dX))
    np.testing.assert_array_equal(outputs, fresh[0])
    for a, b in zip(finals, fresh[1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dX, fresh[2])
    for name in grads:
        np.testing.assert_array_equal(grads[name], fresh[3][name], err_msg=name)


def test_buffers_in_use_are_never_handed_out_twice():
    """Two forward passes kept alive get separate memory; each backward pass gives the numbers it
    gives when its forward pass ran alone."""
    alone = []
    for seed in (12, 13):
        outputs, finals, cache, (d_out, d_final) = run_layer("lstm", 4, seed=seed)
        alone.append((outputs.copy(), sequence_backward(d_out, d_final, cache)[1]))
        del outputs, finals, cache
    first, second = run_layer("lstm", 4, seed=12), run_layer("lstm", 4, seed=13)
    for a, b in zip(first[2].buffers, second[2].buffers):
        assert not np.shares_memory(a, b)
    for (outputs, _, cache, (d_out, d_final)), (want_out, want_grads) in zip((first, second), alone):
        np.testing.assert_array_equal(outputs, want_out)
        grads = sequence_backward(d_out, d_final, cache)[1]
        for name in grads:
            np.testing.assert_array_equal(grads[name], want_grads[name], err_msg=name)
