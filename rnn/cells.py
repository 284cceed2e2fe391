"""One timestep of each recurrent cell: a forward step and its hand-derived backward step.

Notation (N rows of a batch, hidden size H, G gate blocks per cell):

    x_proj = x<t> W_x + b      (G, N, H)  input projection, computed for many timesteps at once
    a_prev = a<t-1>            (N, H)     previous hidden state
    W_h                        (G, H, H)  recurrent weights, one (H, H) block per gate

Splitting the article's `W [a<t-1>, x<t>]` into `a<t-1> W_h + x<t> W_x` is the same product; it lets
the sequence layer compute `x W_x` for many timesteps in one large matrix product.

Gates are stacked on a leading axis: x_proj, the gate values and their gradients are (G, N, H),
one contiguous (N, H) block per gate, so that `i, f, o, g = gates` and every elementwise operation
runs over contiguous memory (NumPy spends about four times as long per call on a column slice of
an (N, G*H) array: measured). `a_prev @ W_h` is one batched product for all gates. The model
stores W_h as (H, G*H), the blocks side by side; `gate_blocks` gives the (G, H, H) view.

A forward step takes the state of the previous step as a tuple (`(a,)`, or `(a, c)` for the LSTM)
and returns what it computed as its cell's named tuple (`RNNStep`, `GRUStep`, `GRUAfterStep`,
`LSTMStep`): the new state first, then what the backward step needs besides the previous state.
Given a tuple of preallocated arrays as `out`, it writes into them and allocates nothing; the
sequence layer holds the same tuple with a time axis on every array (its buffers) and hands each
step its slice. A backward step takes the previous state, the forward step's tuple and `W_h_T`, the
blocks of W_h transposed (G, H, H), which the sequence layer makes contiguous once per sequence (a
transposed view slows the product), optionally `scratch`, a (2G, N, H) array for its intermediate
values (the sequence layer allocates one per sequence; a step without it allocates what it needs),
and returns `dx_proj`, the gradient of the gate
pre-activations, which is also the gradient of `x_proj`; the weight gradients are sums over
timesteps of outer products with it, done after the loop as one large product per gate (see
`recurrent_weight_grads`).

Gate blocks, in order:
    rnn:  [candidate]
    gru:  [reset r, update u, candidate n]
    lstm: [input i, forget f, output o, candidate g]  (sigmoid gates first, contiguous; PyTorch
          orders them i, f, g, o: `rnn.interop` reorders)
"""
from __future__ import annotations

from typing import NamedTuple, Callable

import numpy as np

from .config import GATES


def sigmoid_(x: np.ndarray) -> np.ndarray:
    """In-place logistic sigmoid via sigma(x) = (1 + tanh(x/2)) / 2: never overflows, 4 passes."""
    x *= 0.5
    np.tanh(x, out=x)
    x *= 0.5
    x += 0.5
    return x


def gate_activations_(gates: np.ndarray, sigmoids: int, halved: bool = False) -> np.ndarray:
    """In place: the logistic sigmoid on the first `sigmoids` blocks of gates (G, N, H), tanh on the
    others, all in one tanh call through sigma(z) = (1 + tanh(z/2)) / 2 (the same operations as
    `sigmoid_` and a tanh per block, so the same numbers, in two calls fewer). `halved`: those
    blocks hold z/2 already (see `Cell.halved`)."""
    if not halved:
        gates[:sigmoids] *= 0.5
    np.tanh(gates, out=gates)
    s = gates[:sigmoids]
    s *= 0.5
    s += 0.5
    return gates


def gate_blocks(W: np.ndarray, G: int) -> np.ndarray:
    """(rows, G*H) weights, gate blocks side by side -> (G, rows, H) view, one block per gate."""
    return W.reshape(W.shape[0], G, -1).transpose(1, 0, 2)


def from_gate_blocks(blocks: np.ndarray) -> np.ndarray:
    """Inverse of `gate_blocks`: (G, rows, H) -> (rows, G*H)."""
    G, rows, H = blocks.shape
    return blocks.transpose(1, 0, 2).reshape(rows, G * H)


def _or_new(out, step_type: type, G: int, like: np.ndarray):
    """`out` when given, else a new `step_type` of empty arrays shaped like `like` (N, H), but
    `gates`, (G, N, H)."""
    if out is not None:
        return out
    return step_type(*(np.empty((G, *like.shape) if name == "gates" else like.shape, like.dtype)
                       for name in step_type._fields))


def _or_new_blocks(out, G: int, like: np.ndarray) -> np.ndarray:
    """`out` when given, else a new (G, N, H) array shaped and typed like `like` (N, H)."""
    return out if out is not None else np.empty((G, *like.shape), like.dtype)


def _scratch_blocks(scratch, blocks: int, like: np.ndarray) -> np.ndarray:
    """The first `blocks` (N, H) blocks of a backward step's scratch array (2G, N, H), or new ones."""
    return scratch[:blocks] if scratch is not None else np.empty((blocks, *like.shape), like.dtype)


def add_blocks(blocks: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = blocks[0] + blocks[1] + ... for (G >= 2, ...) blocks; out may be blocks[0]. Plain adds:
    NumPy's reduction over a short leading axis is several times slower (measured: 23 us against
    4 us for (4, 64, 128))."""
    np.add(blocks[0], blocks[1], out=out)
    for block in blocks[2:]:
        out += block
    return out


def _interpolate(start: np.ndarray, end: np.ndarray, weight: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = start + weight * (end - start) in three passes: a GRU's blend of its old state and its
    candidate, whichever of the two its update gate weighs."""
    np.subtract(end, start, out=out)
    out *= weight
    out += start
    return out


# ----------------------------------------------------------------------------------------- rnn
class RNNStep(NamedTuple):
    a: np.ndarray            # (N, H) the new state; tanh's derivative needs only this output


def rnn_step_forward(x_proj, prev, W_h, b_hn=None, out: RNNStep | None = None) -> RNNStep:
    """a<t> = tanh(x_proj + a<t-1> W_h).

    x_proj: (1, N, H); prev: (a_prev (N, H),); W_h: (1, H, H); out: optional RNNStep to write into.
    """
    (a_prev,) = prev
    (a,) = _or_new(out, RNNStep, 1, a_prev)
    np.matmul(a_prev, W_h[0], out=a)
    a += x_proj[0]
    np.tanh(a, out=a)
    return RNNStep(a)


def rnn_step_backward(dstate, prev, step: RNNStep, W_h_T, out=None, scratch=None):
    """dstate: (da (N, H),), the total gradient reaching a<t>; prev and step: the forward step's
    input state and result; W_h_T: (1, H, H).

    Returns dx_proj (1, N, H) (written into `out` when given) and (da_prev (N, H),). Like every
    backward step, it overwrites the arrays of dstate with the previous step's gradients.
    """
    (da,), a = dstate, step.a
    dx = _or_new_blocks(out, 1, a)
    dz = dx[0]
    np.multiply(a, a, out=dz)
    np.subtract(1, dz, out=dz)
    dz *= da
    return dx, (np.matmul(dz, W_h_T[0], out=da),)


# ----------------------------------------------------------------------------------------- gru
class GRUStep(NamedTuple):
    a: np.ndarray            # (N, H) the new state
    gates: np.ndarray        # (3, N, H) reset r, update u, candidate n, after their nonlinearities
    r_a: np.ndarray          # (N, H) r * a_prev, the candidate's recurrent input


def gru_step_forward(x_proj, prev, W_h, b_hn=None, out: GRUStep | None = None) -> GRUStep:
    """The GRU of the original article (reset before the product, `reset_after=False`).

        r = sigmoid(x_r + a_prev W_hr)         u = sigmoid(x_u + a_prev W_hu)
        n = tanh(x_n + (r * a_prev) W_hn)
        a = u * n + (1 - u) * a_prev            # the update gate u weighs the NEW candidate

    x_proj: (3, N, H); prev: (a_prev (N, H),); W_h: (3, H, H); out: optional GRUStep to write into.
    """
    (a_prev,) = prev
    a, gates, r_a = _or_new(out, GRUStep, 3, a_prev)
    ru = gates[:2]
    np.matmul(a_prev, W_h[:2], out=ru)
    ru += x_proj[:2]
    sigmoid_(ru)
    r, u, n = gates
    np.multiply(r, a_prev, out=r_a)
    np.matmul(r_a, W_h[2], out=n)
    n += x_proj[2]
    np.tanh(n, out=n)
    _interpolate(a_prev, n, u, out=a)        # a = u * n + (1 - u) * a_prev
    return GRUStep(a, gates, r_a)


def gru_step_backward(dstate, prev, step: GRUStep, W_h_T, out=None, scratch=None):
    """Backward of `gru_step_forward`. dstate: (da (N, H),); W_h_T: (3, H, H).

    Returns dx_proj (3, N, H), the gradient of the pre-activations [r, u, n] (the gradient of
    W_hn's input is r * a_prev, step.r_a), and (da_prev (N, H),).
    """
    (da,), (a_prev,), gates = dstate, prev, step.gates
    r, u, n = gates
    dx = _or_new_blocks(out, 3, a_prev)
    work = _scratch_blocks(scratch, 3, a_prev)
    dr, du, dn = dx
    np.multiply(n, n, out=dn)                # dn = da * u * (1 - n^2)
    np.subtract(1, dn, out=dn)
    dn *= u
    dn *= da
    d_ra = np.matmul(dn, W_h_T[2], out=work[2])
    np.subtract(n, a_prev, out=du)           # du = da * (n - a_prev) * u (1 - u)
    du *= da
    np.multiply(d_ra, a_prev, out=dr)        # dr = d(r a_prev) * a_prev * r (1 - r)
    sigmoid_grad = work[:2]
    np.subtract(1, gates[:2], out=sigmoid_grad)
    sigmoid_grad *= gates[:2]
    dx[:2] *= sigmoid_grad
    d_ra *= r
    direct = work[0]                         # the two direct paths from a_prev to a
    np.subtract(1, u, out=direct)
    direct *= da
    d_ra += direct
    add_blocks(np.matmul(dx[:2], W_h_T[:2], out=work[:2]), out=da)
    da += d_ra
    return dx, (da,)


class GRUAfterStep(NamedTuple):
    a: np.ndarray            # (N, H) the new state
    gates: np.ndarray        # (3, N, H) reset r, update z, candidate n, after their nonlinearities
    h_n: np.ndarray          # (N, H) a_prev W_hn + b_hn, the product the reset gate scales


def gru_after_step_forward(x_proj, prev, W_h, b_hn, out: GRUAfterStep | None = None) -> GRUAfterStep:
    """The cuDNN / PyTorch / Keras GRU (reset after the product, `reset_after=True`).

        r = sigmoid(x_r + a_prev W_hr)         z = sigmoid(x_z + a_prev W_hz)
        n = tanh(x_n + r * (a_prev W_hn + b_hn))
        a = (1 - z) * n + z * a_prev            # here the update gate z weighs the OLD state

    x_proj: (3, N, H); prev: (a_prev (N, H),); W_h: (3, H, H); b_hn: (H,); out: optional
    GRUAfterStep to write into.
    """
    (a_prev,) = prev
    a, gates, h_n = _or_new(out, GRUAfterStep, 3, a_prev)
    np.matmul(a_prev, W_h, out=gates)
    np.add(gates[2], b_hn, out=h_n)
    gates[:2] += x_proj[:2]
    sigmoid_(gates[:2])
    r, z, n = gates
    np.multiply(r, h_n, out=n)
    n += x_proj[2]
    np.tanh(n, out=n)
    _interpolate(n, a_prev, z, out=a)        # a = (1 - z) * n + z * a_prev
    return GRUAfterStep(a, gates, h_n)


def gru_after_step_backward(dstate, prev, step: GRUAfterStep, W_h_T, out=None, scratch=None):
    """Backward of `gru_after_step_forward`. dstate: (da (N, H),); W_h_T: (3, H, H).

    Returns dx_proj (3, N, H), the gradient of the pre-activations [r, z, n], and (da_prev (N, H),).
    The recurrent product's gradient differs from dx_proj only in the n block, which is scaled by
    r: `recurrent_weight_grads` applies that.
    """
    (da,), (a_prev,), (_, gates, h_n) = dstate, prev, step
    r, z, n = gates
    dx = _or_new_blocks(out, 3, a_prev)
    work = _scratch_blocks(scratch, 6, a_prev)
    dr, dz, dn = dx
    dh = work[:3]                            # gradient of the recurrent product a_prev W_h
    np.multiply(n, n, out=dn)                # dn = da * (1 - z) * (1 - n^2)
    np.subtract(1, dn, out=dn)
    np.subtract(1, z, out=dh[2])
    dn *= dh[2]
    dn *= da
    np.subtract(a_prev, n, out=dz)           # dz = da * (a_prev - n) * z (1 - z)
    dz *= da
    np.multiply(dn, h_n, out=dr)             # dr = dn * h_n * r (1 - r)
    np.subtract(1, gates[:2], out=dh[:2])
    dh[:2] *= gates[:2]
    dx[:2] *= dh[:2]
    dh[:2] = dx[:2]
    np.multiply(dn, r, out=dh[2])
    da *= z                                  # the direct path from a_prev to a
    prod = np.matmul(dh, W_h_T, out=work[3:])
    da += add_blocks(prod, out=prod[0])
    return dx, (da,)


# ---------------------------------------------------------------------------------------- lstm
class LSTMStep(NamedTuple):
    a: np.ndarray            # (N, H) the new hidden state
    c: np.ndarray            # (N, H) the new cell state
    gates: np.ndarray        # (4, N, H) input i, forget f, output o, candidate g, after their
                             # nonlinearities
    tanh_c: np.ndarray       # (N, H) tanh(c)


def lstm_step_forward(x_proj, prev, W_h, b_hn=None, out: LSTMStep | None = None, halved: bool = False
                      ) -> LSTMStep:
    """The LSTM of the article, all gates in one batched product.

        i, f, o = sigmoid(x_ifo + a_prev W_h,ifo)     g = tanh(x_g + a_prev W_h,g)
        c = i * g + f * c_prev                          a = o * tanh(c)

    x_proj: (4, N, H); prev: (a_prev, c_prev), each (N, H); W_h: (4, H, H); out: optional
    LSTMStep to write into; halved: x_proj and W_h come with their i, f, o blocks halved
    (`Cell.halved`), which saves a pass.
    """
    a_prev, c_prev = prev
    a, c, gates, tanh_c = _or_new(out, LSTMStep, 4, a_prev)
    np.matmul(a_prev, W_h, out=gates)
    gates += x_proj
    gate_activations_(gates, 3, halved)
    i, f, o, g = gates
    np.multiply(f, c_prev, out=c)
    np.multiply(i, g, out=tanh_c)            # tanh_c's buffer is free until the line after
    c += tanh_c
    np.tanh(c, out=tanh_c)
    np.multiply(o, tanh_c, out=a)
    return LSTMStep(a, c, gates, tanh_c)


def lstm_step_backward(dstate, prev, step: LSTMStep, W_h_T, out=None, scratch=None):
    """Backward of `lstm_step_forward`. dstate: (da, dc), each (N, H): the total gradients reaching
    a<t> and c<t>; they are overwritten with da_prev and dc_prev. W_h_T: (4, H, H); scratch:
    optional (8, N, H) array for the step's intermediate values (allocated when None).

    Returns dx_proj (4, N, H), the gradient of the pre-activations [i, f, o, g], and
    (da_prev, dc_prev), each (N, H).
    """
    (da, dc), (_, c_prev), (_, _, gates, tanh_c) = dstate, prev, step
    i, f, o, g = gates
    dx = _or_new_blocks(out, 4, c_prev)
    work = _scratch_blocks(scratch, 4, c_prev)
    di, df, do, dg = dx
    np.multiply(tanh_c, tanh_c, out=dg)      # dc += da * o * (1 - tanh(c)^2)
    np.subtract(1, dg, out=dg)
    dg *= o
    dg *= da
    dc += dg
    np.multiply(dc, g, out=di)
    np.multiply(dc, c_prev, out=df)
    np.multiply(da, tanh_c, out=do)
    sigmoid_grad = work[:3]                  # sigmoid' = s (1 - s)
    np.subtract(1, gates[:3], out=sigmoid_grad)
    sigmoid_grad *= gates[:3]
    dx[:3] *= sigmoid_grad
    np.multiply(g, g, out=dg)                # dg = dc * i * (1 - g^2)
    np.subtract(1, dg, out=dg)
    dg *= i
    dg *= dc
    dc *= f
    add_blocks(np.matmul(dx, W_h_T, out=work), out=da)
    return dx, (da, dc)


# ------------------------------------------------------------------------------------ registry
class Cell(NamedTuple):
    """What the sequence layer needs to know about a cell."""
    gates: int                   # G: gate blocks in x_proj
    states: int                  # 1 for (a,), 2 for (a, c): the first fields of `step`
    step: type                   # the named tuple of a forward step's arrays
    step_forward: Callable
    step_backward: Callable
    halved: int = 0              # the first blocks are sigmoids whose pre-activations step_forward
                                 # takes halved (halved=True): the layer scales copies of W_x, b
                                 # and W_h by 1/2, exactly (a power of two), once per sequence


CELLS = {
    "rnn": Cell(GATES["rnn"], 1, RNNStep, rnn_step_forward, rnn_step_backward),
    "gru": Cell(GATES["gru"], 1, GRUStep, gru_step_forward, gru_step_backward),
    "gru_after": Cell(GATES["gru"], 1, GRUAfterStep, gru_after_step_forward, gru_after_step_backward),
    "lstm": Cell(GATES["lstm"], 2, LSTMStep, lstm_step_forward, lstm_step_backward, halved=3),
}


def recurrent_weight_grads(kind: str, buffers: tuple, dX: np.ndarray) -> dict[str, np.ndarray]:
    """Sum over timesteps of the recurrent weight gradients, as one large product per gate block.

    buffers: the layer's arrays as filled by the forward steps, the cell's step tuple with a time
    axis: the state fields hold the history a<0..T> (T+1, B, H), so that a<t-1> for every step is
    buffers.a[:-1]; the others hold every step, (T, B, H) or, for gates, (G, T, B, H). dX:
    (G, T*B, H) gradients of the pre-activations, zero on padded steps. Returns {"W_h": (H, G*H)}
    and, for gru_after, {"b_hn": (H,)}.
    """
    H = buffers.a.shape[-1]
    A_T = buffers.a[:-1].reshape(-1, H).T    # (H, T*B)
    if kind == "gru":                        # the candidate's recurrent input is r * a_prev
        r_a = buffers.r_a.reshape(-1, H)
        return {"W_h": from_gate_blocks(np.stack([A_T @ dX[0], A_T @ dX[1], r_a.T @ dX[2]]))}
    if kind == "gru_after":                  # the candidate's product is scaled by r
        dh_n = dX[2] * buffers.gates[0].reshape(-1, H)
        return {"W_h": from_gate_blocks(np.stack([A_T @ dX[0], A_T @ dX[1], A_T @ dh_n])),
                "b_hn": dh_n.sum(0)}
    return {"W_h": from_gate_blocks(np.matmul(A_T, dX))}
