"""Single timesteps of every cell: every gradient of the hand-derived backward step against central
differences in float64, and the step's buffers. (The forward equations are held equal to
rnn/reference.py in tests/test_reference.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import assert_grad_close, numeric_grad, step_as_layer_buffers
from rnn.cells import CELLS, from_gate_blocks, gate_blocks, recurrent_weight_grads
from rnn.config import cell_kind

KINDS = tuple(CELLS)
H = 3


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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 3])
def test_step_gradients(kind, n):
    x_proj, prev, W_h, b_hn, upstream = make_step_inputs(kind, n, seed=2 + n)
    cell = CELLS[kind]

    def loss():
        state = cell.step_forward(x_proj, prev, W_h, b_hn)[:cell.states]
        return float(sum((s * u).sum() for s, u in zip(state, upstream)))

    step = cell.step_forward(x_proj, prev, W_h, b_hn)
    dx_proj, d_prev = cell.step_backward(tuple(u.copy() for u in upstream), prev, step, transposed(W_h))
    assert len(d_prev) == cell.states
    assert_grad_close(numeric_grad(loss, x_proj), dx_proj, f"{kind} dx_proj")
    for k, name in enumerate(("a_prev", "c_prev")[:cell.states]):
        assert_grad_close(numeric_grad(loss, prev[k]), d_prev[k], f"{kind} d{name}")
    # the weight gradients as the sequence layer sums them, over a sequence of this one step
    weight_grads = recurrent_weight_grads(kind, step_as_layer_buffers(cell, prev, step), dx_proj)
    assert_grad_close(numeric_grad(loss, W_h), gate_blocks(weight_grads["W_h"], cell.gates), f"{kind} dW_h")
    if kind == "gru_after":
        assert_grad_close(numeric_grad(loss, b_hn), weight_grads["b_hn"], f"{kind} db_hn")


@pytest.mark.parametrize("kind", KINDS)
def test_step_out_buffers_give_identical_results(kind):
    """The sequence loop passes preallocated `out` views; results must not depend on it."""
    x_proj, prev, W_h, b_hn, upstream = make_step_inputs(kind, 3, seed=7)
    cell = CELLS[kind]
    step = cell.step_forward(x_proj, prev, W_h, b_hn)
    out = cell.step(*(np.full((cell.gates, 3, H) if name == "gates" else (3, H), np.nan)
                      for name in cell.step._fields))
    step_out = cell.step_forward(x_proj, prev, W_h, b_hn, out=out)
    assert type(step_out) is cell.step
    for name, a, b, buf in zip(cell.step._fields, step, step_out, out):
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert np.shares_memory(b, buf), name
    dx, d_prev = cell.step_backward(tuple(u.copy() for u in upstream), prev, step, transposed(W_h))
    dx_buf = np.full((cell.gates, 3, H), np.nan)
    dx_out, d_prev_out = cell.step_backward(tuple(u.copy() for u in upstream), prev, step_out,
                                            transposed(W_h), out=dx_buf)
    assert np.shares_memory(dx_out, dx_buf)
    np.testing.assert_array_equal(dx, dx_out)
    for a, b in zip(d_prev, d_prev_out):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_step_does_not_modify_its_inputs(kind):
    x_proj, prev, W_h, b_hn, upstream = make_step_inputs(kind, 3, seed=8)
    before = [a.copy() for a in (x_proj, *prev, W_h)]
    step = CELLS[kind].step_forward(x_proj, prev, W_h, b_hn)
    step_before = [np.array(v, copy=True) for v in step]
    CELLS[kind].step_backward(tuple(u.copy() for u in upstream), prev, step, transposed(W_h))
    for a, b in zip(before, (x_proj, *prev, W_h)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(step_before, step):            # a second backward needs the step intact
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


@pytest.mark.parametrize("kind", [k for k in KINDS if CELLS[k].halved])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_halved_inputs_give_identical_steps(kind, dtype):
    """A cell that takes its sigmoid blocks' pre-activations halved (Cell.halved, the 1/2 of
    sigmoid(z) = tanh(z/2)/2 + 1/2 moved into the weights) computes the same numbers, bit for bit:
    halving is exact."""
    x_proj, prev, W_h, b_hn, _ = (a.astype(dtype) if isinstance(a, np.ndarray) else
                                  tuple(p.astype(dtype) for p in a) if isinstance(a, tuple) else a
                                  for a in make_step_inputs(kind, 3, seed=9))
    cell = CELLS[kind]
    half = np.ones((cell.gates, 1, 1), dtype)
    half[:cell.halved] = 0.5
    plain = cell.step_forward(x_proj, prev, W_h, b_hn)
    halved = cell.step_forward(x_proj * half, prev, W_h * half, b_hn, halved=True)
    for name, a, b in zip(cell.step._fields, plain, halved):
        np.testing.assert_array_equal(a, b, err_msg=name)
    wrong = cell.step_forward(x_proj * half, prev, W_h * half, b_hn)    # the flag is what makes it so
    assert not np.allclose(wrong.gates, plain.gates)
