"""The plain reference (rnn/reference.py): every piece against central differences in float64, the
fast path (rnn/cells.py, rnn/recurrent.py) equal to it to 1e-12 in float64, and a gradient-descent
loop built from it alone that learns."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import assert_grad_close, assert_sequence_grads_close, numeric_grad, step_as_layer_buffers
from rnn import cells, recurrent
from rnn import reference as ref

KINDS = ("rnn", "gru", "gru_after", "lstm")
STATES = {"rnn": 1, "gru": 1, "gru_after": 1, "lstm": 2}
GATES = {"rnn": 1, "gru": 3, "gru_after": 3, "lstm": 4}
AGREE = 1e-12          # largest relative error allowed between the reference and the fast path


def make_params(kind: str, D: int, H: int, rng: np.random.Generator) -> dict:
    """float64 params in the model's layout, small enough that no gate saturates."""
    G = GATES[kind]
    params = {"W_x": rng.normal(0, 0.5, (D, G * H)), "W_h": rng.normal(0, 0.5, (H, G * H)),
              "b": rng.normal(0, 0.3, G * H)}
    if kind == "gru_after":
        params["b_hn"] = rng.normal(0, 0.3, H)
    return params


def agreement(got: np.ndarray, want: np.ndarray) -> float:
    """Largest elementwise |got - want| / (|got| + |want|), 0 where both are 0. Elements below a
    millionth of the array's largest magnitude are measured against that millionth instead: a sum
    that cancels to almost nothing may lose all its relative digits and still be right."""
    assert got.shape == want.shape, (got.shape, want.shape)
    floor = 1e-6 * max(np.abs(want).max(), np.finfo(np.float64).tiny)
    return float((np.abs(got - want) / np.maximum(np.abs(got) + np.abs(want), floor)).max())


def assert_agree(got, want, name: str) -> float:
    err = agreement(np.asarray(got), np.asarray(want))
    assert err < AGREE, f"{name}: relative error {err:.3g} between the fast path and the reference"
    return err


# --------------------------------------------------------------------- steps: finite differences
D, H, N = 3, 3, 3


def make_step(kind: str, seed: int):
    """x (N, D), the previous states, params, and the upstream gradients of the step's outputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (N, D))
    prev = tuple(rng.normal(0, 0.6, (N, H)) for _ in range(STATES[kind]))
    params = make_params(kind, D, H, rng)
    upstream = tuple(rng.normal(0, 1, (N, H)) for _ in range(STATES[kind]))
    return x, prev, params, upstream


def step_forward(kind, x, prev, params):
    """Either forward step, its outputs as a tuple: (a,) or (a, c), and the cache."""
    if kind == "lstm":
        a, c, cache = ref.lstm_step_forward(x, *prev, params)
        return (a, c), cache
    a, cache = ref.STEPS[kind][0](x, prev[0], params)
    return (a,), cache


def step_backward(kind, upstream, cache):
    """Either backward step as (dx, d_prev tuple, grads)."""
    if kind == "lstm":
        dx, da_prev, dc_prev, grads = ref.lstm_step_backward(*upstream, cache)
        return dx, (da_prev, dc_prev), grads
    dx, da_prev, grads = ref.STEPS[kind][1](upstream[0], cache)
    return dx, (da_prev,), grads


@pytest.mark.parametrize("kind", KINDS)
def test_step_gradients(kind):
    x, prev, params, upstream = make_step(kind, seed=1)

    def loss():
        out, _ = step_forward(kind, x, prev, params)
        return float(sum((o * u).sum() for o, u in zip(out, upstream)))

    _, cache = step_forward(kind, x, prev, params)
    dx, d_prev, grads = step_backward(kind, upstream, cache)
    assert set(grads) == set(params)
    assert_grad_close(numeric_grad(loss, x), dx, f"{kind} dx")
    for k, p in enumerate(prev):
        assert_grad_close(numeric_grad(loss, p), d_prev[k], f"{kind} d{'ac'[k]}_prev")
    for name, p in params.items():
        assert_grad_close(numeric_grad(loss, p), grads[name], f"{kind} d{name}")


def test_gate_roles_and_block_order():
    """Gates pinned open or shut through their bias blocks (+-60), in the documented order: the
    article's GRU [r, u, n] takes the new candidate when u = 1, PyTorch's [r, z, n] keeps the old
    state when z = 1, and the LSTM [i, f, o, g] keeps its memory when i = 0 and f = 1."""
    x, (a_prev,), params, _ = make_step("gru", seed=2)
    params["b"][H:2 * H] = 60.0                             # sigmoid(z > 37) is 1.0 in float64
    a, (*_, n, _) = ref.gru_step_forward(x, a_prev, params)
    np.testing.assert_array_equal(a, n)
    params["b_hn"] = np.zeros(H)
    a, _ = ref.gru_after_step_forward(x, a_prev, params)
    np.testing.assert_array_equal(a, a_prev)
    x, (a_prev, c_prev), params, _ = make_step("lstm", seed=2)
    params["b"][:H], params["b"][H:2 * H] = -60.0, 60.0
    _, c, _ = ref.lstm_step_forward(x, a_prev, c_prev, params)
    np.testing.assert_array_equal(c, c_prev)


# ------------------------------------------------------------------ sequence: finite differences
T = 5
UNSORTED = np.array([3, 5, 1, 3])      # the mask needs no sorting; the fast path does


def make_sequence(kind: str, lengths: np.ndarray, seed: int, T: int = T, D: int = D, H: int = H):
    """params, X (T, B, D), state0, and upstream gradients, non-zero on padded steps too."""
    rng = np.random.default_rng(seed)
    B = len(lengths)
    params = make_params(kind, D, H, rng)
    X = rng.normal(0, 1, (T, B, D))
    state0 = tuple(rng.normal(0, 0.5, (B, H)) for _ in range(STATES[kind]))
    d_out = rng.normal(0, 1, (T, B, H))
    d_final = tuple(rng.normal(0, 1, (B, H)) for _ in range(STATES[kind]))
    return params, X, state0, d_out, d_final


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_sequence_gradients(kind, reverse):
    params, X, state0, d_out, d_final = make_sequence(kind, UNSORTED, seed=3 + reverse)

    def loss():
        outputs, final, _ = ref.sequence_forward(X, UNSORTED, params, kind, state0, reverse)
        return float((outputs * d_out).sum() + sum((f * g).sum() for f, g in zip(final, d_final)))

    outputs, _, cache = ref.sequence_forward(X, UNSORTED, params, kind, state0, reverse)
    dX, grads, d_state0 = ref.sequence_backward(d_out, d_final, cache)
    assert_sequence_grads_close(loss, params, grads, X, dX, state0, d_state0, kind)
    padded = np.arange(T)[:, None] >= UNSORTED[None, :]
    assert np.all(outputs[padded] == 0) and np.all(dX[padded] == 0)


# --------------------------------------------------- the fast path equals the reference: sequence
SORTED = np.array([7, 5, 5, 2, 1])     # the fast path's contract: longest first


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_fast_sequence_equals_reference(kind, reverse):
    """Outputs, final states and every gradient of `rnn.recurrent`, padded and in either direction."""
    params, X, state0, d_out, d_final = make_sequence(kind, SORTED, seed=5 + reverse, T=7, D=4, H=6)
    fast = recurrent.sequence_forward(X, SORTED, params, kind, state0, reverse)
    plain = ref.sequence_forward(X, SORTED, params, kind, state0, reverse)
    assert_agree(fast[0], plain[0], "outputs")
    for k, (f, p) in enumerate(zip(fast[1], plain[1], strict=True)):
        assert_agree(f, p, f"final {'ac'[k]}")
    dX, grads, d_state0, _ = recurrent.sequence_backward(d_out, d_final, fast[2])
    dX_ref, grads_ref, d_state0_ref = ref.sequence_backward(d_out, d_final, plain[2])
    assert_agree(dX, dX_ref, "dX")
    assert set(grads) == set(grads_ref) == set(params)
    for name in params:
        assert_agree(grads[name], grads_ref[name], f"d{name}")
    for k, (f, p) in enumerate(zip(d_state0, d_state0_ref, strict=True)):
        assert_agree(f, p, f"d{'ac'[k]}0")


# ------------------------------------------------------- the fast path equals the reference: step
def fast_step(kind: str, x, prev, params, upstream):
    """One step of `rnn.cells` from the reference's inputs, its results put in the reference's
    terms: (state tuple, dx, d_prev tuple, grads). The fast step takes x_proj = x @ W_x + b as gate
    blocks (G, N, H) and returns dx_proj, the same blocks of dZ; dx, dW_x and db follow from it,
    and dW_h (and db_hn) from `recurrent_weight_grads` over a sequence of one step."""
    G, W_x, b = GATES[kind], params["W_x"], params["b"]
    x_proj = (x @ W_x + b).reshape(len(x), G, -1).transpose(1, 0, 2)
    W_h = np.ascontiguousarray(cells.gate_blocks(params["W_h"], G))
    cell = cells.CELLS[kind]
    step = cell.step_forward(x_proj, prev, W_h, params.get("b_hn"))
    W_h_T = np.ascontiguousarray(W_h.transpose(0, 2, 1))
    dx_proj, d_prev = cell.step_backward(tuple(u.copy() for u in upstream), prev, step, W_h_T)
    dZ = cells.from_gate_blocks(dx_proj)                     # (N, G*H)
    grads = {"W_x": x.T @ dZ, "b": dZ.sum(0),
             **cells.recurrent_weight_grads(kind, step_as_layer_buffers(cell, prev, step), dx_proj)}
    return step[:cell.states], dZ @ W_x.T, d_prev, grads


@pytest.mark.parametrize("kind", KINDS)
def test_fast_step_equals_reference(kind):
    rng = np.random.default_rng(11)
    n, d, h = 4, 5, 6
    x = rng.normal(0, 1, (n, d))
    prev = tuple(rng.normal(0, 0.6, (n, h)) for _ in range(STATES[kind]))
    params = make_params(kind, d, h, rng)
    upstream = tuple(rng.normal(0, 1, (n, h)) for _ in range(STATES[kind]))
    state, dx, d_prev, grads = fast_step(kind, x, prev, params, upstream)
    state_ref, cache = step_forward(kind, x, prev, params)
    dx_ref, d_prev_ref, grads_ref = step_backward(kind, upstream, cache)
    for k in range(STATES[kind]):
        assert_agree(state[k], state_ref[k], f"{'ac'[k]}")
        assert_agree(d_prev[k], d_prev_ref[k], f"d{'ac'[k]}_prev")
    assert_agree(dx, dx_ref, "dx")
    assert set(grads) == set(grads_ref) == set(params)
    for name in params:
        assert_agree(grads[name], grads_ref[name], f"d{name}")


def test_agreement_measure_can_fail():
    want = np.array([1.0, -2.0, 0.0, 3e-9])
    assert agreement(want.copy(), want) == 0
    assert agreement(want * (1 + 1e-11), want) > AGREE
    assert agreement(want + np.array([0, 0, 0, 1e-18]), want) < AGREE   # below the floor


# ----------------------------------------------------------------------- it learns: the article
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_descent_from_reference_pieces_learns(kind):
    """The article's many-to-one model, y = sigmoid(a<T> W_y + b_y) on each sequence's final state
    with binary cross-entropy, trained by plain gradient descent from reference pieces alone on a
    toy task: is the mean of feature 0 over the real steps positive?"""
    rng = np.random.default_rng(0)
    T, B, D, H = 8, 32, 3, 8
    lengths = rng.integers(2, T + 1, B)
    X = rng.normal(0, 1, (T, B, D))
    X[np.arange(T)[:, None] >= lengths] = 0
    y = (X[:, :, 0].sum(0) > 0).astype(np.float64)
    params = {k: v * 0.5 for k, v in make_params(kind, D, H, rng).items()}
    W_y, b_y = rng.normal(0, 1 / np.sqrt(H), H), 0.0

    def loss_and_grads():
        outputs, final, cache = ref.sequence_forward(X, lengths, params, kind)
        p = ref.sigmoid(final[0] @ W_y + b_y)
        loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        dlogit = (p - y) / B                                # (B,)
        d_final = (np.outer(dlogit, W_y),) + (np.zeros((B, H)),) * (STATES[kind] - 1)
        _, grads, _ = ref.sequence_backward(np.zeros_like(outputs), d_final, cache)
        return loss, grads, final[0].T @ dlogit, dlogit.sum()

    losses = []
    for _ in range(150):
        loss, grads, dW_y, db_y = loss_and_grads()
        losses.append(loss)
        for k in params:
            params[k] = params[k] - 0.5 * grads[k]
        W_y, b_y = W_y - 0.5 * dW_y, b_y - 0.5 * db_y
    # measured: every cell ends below 0.06 from about 0.7; training only W_y, b_y ends above 0.54,
    # and with the sign of dW_h flipped above 0.28
    assert losses[-1] < 0.1, f"{kind}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
