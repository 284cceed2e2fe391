"""Single timesteps of every cell: the forward equations against a plain reference, and every
gradient of the hand-derived backward step against central differences in float64."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import assert_grad_close, numeric_grad
from rnn.cells import CELLS, from_gate_blocks, gate_blocks
from rnn.config import cell_kind

KINDS = tuple(CELLS)
H = 3


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_step(kind: str, x_proj, prev, W_h, b_hn=None):
    """The cell equations written out gate by gate, unfused, in the documented block order."""
    a_prev = prev[0]
    blocks = list

    if kind == "rnn":
        return (np.tanh(x_proj[0] + a_prev @ W_h[0]),)
    if kind == "gru":
        x_r, x_u, x_n = blocks(x_proj)
        W_r, W_u, W_n = blocks(W_h)
        r, u = _sigmoid(x_r + a_prev @ W_r), _sigmoid(x_u + a_prev @ W_u)
        n = np.tanh(x_n + (r * a_prev) @ W_n)
        return (u * n + (1 - u) * a_prev,)                 # u weighs the new candidate
    if kind == "gru_after":
        x_r, x_z, x_n = blocks(x_proj)
        W_r, W_z, W_n = blocks(W_h)
        r, z = _sigmoid(x_r + a_prev @ W_r), _sigmoid(x_z + a_prev @ W_z)
        n = np.tanh(x_n + r * (a_prev @ W_n + b_hn))
        return ((1 - z) * n + z * a_prev,)                 # z weighs the old state
    c_prev = prev[1]
    x_i, x_f, x_o, x_g = blocks(x_proj)
    W_i, W_f, W_o, W_g = blocks(W_h)
    i, f, o = (_sigmoid(x + a_prev @ W) for x, W in ((x_i, W_i), (x_f, W_f), (x_o, W_o)))
    g = np.tanh(x_g + a_prev @ W_g)
    c = f * c_prev + i * g
    return (o * np.tanh(c), c)


def transposed(W_h):
    """The (G, H, H) blocks of W_h, each transposed: what a backward step takes."""
    return np.ascontiguousarray(W_h.transpose(0, 2, 1))


def make_step_inputs(kind: str, n: int, seed: int):
    """Random float64 inputs small enough that no gate saturates, and random upstream gradients."""
    rng = np.random.default_rng(seed)
    cell = CELLS[kind]
    x_proj = rng.normal(0, 0.6, (cell.gates, n, H))
    prev = tuple(rng.normal(0, 0.6, (n, H)) for _ in range(cell.states))
    W_h = rng.normal(0, 0.5, (cell.gates, H, H))
    b_hn = rng.normal(0, 0.5, H) if kind == "gru_after" else None
    upstream = tuple(rng.normal(0, 1.0, (n, H)) for _ in range(cell.states))
    return x_proj, prev, W_h, b_hn, upstream


def recurrent_grads_from_step(kind: str, dx_proj, cache, prev):
    """dW_h (G, H, H) (and db_hn) of one step from dx_proj and the cache, by the identities the
    sequence layer relies on: dW_h[k] = a_prev^T dx_proj[k], except GRU's candidate block, whose
    recurrent input is r * a_prev (reset before the product) or whose gradient is scaled by r."""
    a_prev = prev[0]
    if kind == "gru":
        _, _, r_a = cache
        return {"W_h": np.stack([a_prev.T @ dx_proj[0], a_prev.T @ dx_proj[1], r_a.T @ dx_proj[2]])}
    if kind == "gru_after":
        dh_n = dx_proj[2] * cache[0][0]
        return {"W_h": np.stack([a_prev.T @ dx_proj[0], a_prev.T @ dx_proj[1], a_prev.T @ dh_n]),
                "b_hn": dh_n.sum(0)}
    return {"W_h": a_prev.T @ dx_proj}


@pytest.mark.parametrize("kind", KINDS)
def test_step_forward_matches_reference_equations(kind):
    x_proj, prev, W_h, b_hn, _ = make_step_inputs(kind, 4, seed=1)
    state, _ = CELLS[kind].step_forward(x_proj, prev, W_h, b_hn)
    expected = reference_step(kind, x_proj, prev, W_h, b_hn)
    assert len(state) == len(expected) == CELLS[kind].states
    for got, want in zip(state, expected):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3])
def test_step_gradients(kind, n):
    x_proj, prev, W_h, b_hn, upstream = make_step_inputs(kind, n, seed=2 + n)
    cell = CELLS[kind]

    def loss():
        state, _ = cell.step_forward(x_proj, prev, W_h, b_hn)
        return float(sum((s * u).sum() for s, u in zip(state, upstream)))

    _, cache = cell.step_forward(x_proj, prev, W_h, b_hn)
    dx_proj, d_prev = cell.step_backward(tuple(u.copy() for u in upstream), cache, transposed(W_h))
    assert len(d_prev) == cell.states
    assert_grad_close(numeric_grad(loss, x_proj), dx_proj, f"{kind} dx_proj")
    for k, name in enumerate(("a_prev", "c_prev")[:cell.states]):
        assert_grad_close(numeric_grad(loss, prev[k]), d_prev[k], f"{kind} d{name}")
    weight_grads = recurrent_grads_from_step(kind, dx_proj, cache, prev)
    assert_grad_close(numeric_grad(loss, W_h), weight_grads["W_h"], f"{kind} dW_h")
    if kind == "gru_after":
        assert_grad_close(numeric_grad(loss, b_hn), weight_grads["b_hn"], f"{kind} db_hn")


@pytest.mark.parametrize("kind", KINDS)
def test_step_out_buffers_give_identical_results(kind):
    """The sequence loop passes preallocated `out` views; results must not depend on it."""
    x_proj, prev, W_h, b_hn, upstream = make_step_inputs(kind, 3, seed=7)
    cell = CELLS[kind]
    state, cache = cell.step_forward(x_proj, prev, W_h, b_hn)
    out = tuple(np.full((3, H) if w == 1 else (w, 3, H), np.nan) for w in cell.buffers)
    state_out, cache_out = cell.step_forward(x_proj, prev, W_h, b_hn, out=out)
    for a, b in zip(state, state_out):
        np.testing.assert_array_equal(a, b)
    dx, d_prev = cell.step_backward(tuple(u.copy() for u in upstream), cache, transposed(W_h))
    dx_buf = np.full((cell.gates, 3, H), np.nan)
    dx_out, d_prev_out = cell.step_backward(tuple(u.copy() for u in upstream), cache_out, transposed(W_h),
                                            out=dx_buf)
    assert np.shares_memory(dx_out, dx_buf)
    np.testing.assert_array_equal(dx, dx_out)
    for a, b in zip(d_prev, d_prev_out):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_step_does_not_modify_its_inputs(kind):
    x_proj, prev, W_h, b_hn, upstream = make_step_inputs(kind, 3, seed=8)
    before = [a.copy() for a in (x_proj, *prev, W_h)]
    _, cache = CELLS[kind].step_forward(x_proj, prev, W_h, b_hn)
    cache_before = [np.array(c, copy=True) for c in cache]
    CELLS[kind].step_backward(tuple(u.copy() for u in upstream), cache, transposed(W_h))
    for a, b in zip(before, (x_proj, *prev, W_h)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(cache_before, cache):          # a second backward needs the cache intact
        np.testing.assert_array_equal(a, b)


def test_cell_kind():
    assert cell_kind("gru", reset_after=True) == "gru_after"
    assert cell_kind("gru") == "gru"
    assert cell_kind("lstm", reset_after=True) == "lstm"
    with pytest.raises(ValueError, match="unknown cell 'transformer'"):
        cell_kind("transformer")


def test_gate_blocks_round_trip():
    W = np.arange(2 * 4 * 3).reshape(2, 12)            # rows 2, G 4, H 3
    blocks = gate_blocks(W, 4)
    assert blocks.shape == (4, 2, 3)
    np.testing.assert_array_equal(blocks[1], W[:, 3:6])
    np.testing.assert_array_equal(from_gate_blocks(blocks), W)
