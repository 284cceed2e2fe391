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

Every step function takes the state of the previous step as a tuple (`(a,)`, or `(a, c)` for the
LSTM) and may write its results into preallocated arrays passed as `out`: the forward steps then
allocate nothing. Every backward step takes `W_h_T`, the blocks of W_h transposed (G, H, H), which
the sequence layer makes contiguous once per sequence (a transposed view slows the product), and
returns `dx_proj`, the gradient of the gate pre-activations, which is also the gradient of
`x_proj`; the weight gradients are sums over timesteps of outer products with it, done after the
loop as one large product per gate (see `recurrent_weight_grads`).

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


def gate_blocks(W: np.ndarray, G: int) -> np.ndarray:
    """(rows, G*H) weights, gate blocks side by side -> (G, rows, H) view, one block per gate."""
    return W.reshape(W.shape[0], G, -1).transpose(1, 0, 2)


def from_gate_blocks(blocks: np.ndarray) -> np.ndarray:
    """Inverse of `gate_blocks`: (G, rows, H) -> (rows, G*H)."""
    G, rows, H = blocks.shape
    return blocks.transpose(1, 0, 2).reshape(rows, G * H)


def _new(out, i, like, blocks=None):
    """`out[i]` (`out` itself if i is None) when given, else a new array shaped like `like`
    (N, H) or, with `blocks`, (blocks, N, H)."""
    if out is not None:
        return out if i is None else out[i]
    return np.empty(like.shape if blocks is None else (blocks, *like.shape), dtype=like.dtype)


def add_blocks(blocks: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = blocks[0] + blocks[1] + ... for (G >= 2, ...) blocks; out may be blocks[0]. Plain adds:
    NumPy's reduction over a short leading axis is several times slower (measured: 23 us against
    4 us for (4, 64, 128))."""
    np.add(blocks[0], blocks[1], out=out)
    for block in blocks[2:]:
        out += block
    return out


# ----------------------------------------------------------------------------------------- rnn
def rnn_step_forward(x_proj, prev, W_h, b_hn=None, out=None):
    """a<t> = tanh(x_proj + a<t-1> W_h).

    x_proj: (1, N, H); prev: (a_prev (N, H),); W_h: (1, H, H); out: optional (a (N, H),).
    Returns ((a,), cache) with cache = (a,): tanh's derivative needs only its output.
    """
    (a_prev,) = prev
    a = np.matmul(a_prev, W_h[0], out=_new(out, 0, a_prev))
    a += x_proj[0]
    np.tanh(a, out=a)
    return (a,), (a,)


def rnn_step_backward(dstate, cache, W_h_T, out=None):
    """dstate: (da (N, H),), the total gradient reaching a<t>; cache from the forward step;
    W_h_T: (1, H, H).

    Returns dx_proj (1, N, H) (written into `out` when given) and (da_prev (N, H),). Like every
    backward step, it overwrites the arrays of dstate with the previous step's gradients.
    """
    (da,), (a,) = dstate, cache
    dx = _new(out, None, a, 1)
    dz = dx[0]
    np.multiply(a, a, out=dz)
    np.subtract(1, dz, out=dz)
    dz *= da
    return dx, (np.matmul(dz, W_h_T[0], out=da),)


# ----------------------------------------------------------------------------------------- gru
def gru_step_forward(x_proj, prev, W_h, b_hn=None, out=None):
    """The GRU of the original article (reset before the product, `reset_after=False`).

        r = sigmoid(x_r + a_prev W_hr)         u = sigmoid(x_u + a_prev W_hu)
        n = tanh(x_n + (r * a_prev) W_hn)
        a = u * n + (1 - u) * a_prev            # the update gate u weighs the NEW candidate

    x_proj: (3, N, H); prev: (a_prev (N, H),); W_h: (3, H, H); out: optional (a (N, H),
    gates (3, N, H), r_a (N, H)). Returns ((a,), cache) with cache = (gates r|u|n after their
    nonlinearities, a_prev, r * a_prev).
    """
    (a_prev,) = prev
    a, gates, r_a = _new(out, 0, a_prev), _new(out, 1, a_prev, 3), _new(out, 2, a_prev)
    ru = gates[:2]
    np.matmul(a_prev, W_h[:2], out=ru)
    ru += x_proj[:2]
    sigmoid_(ru)
    r, u, n = gates
    np.multiply(r, a_prev, out=r_a)
    np.matmul(r_a, W_h[2], out=n)
    n += x_proj[2]
    np.tanh(n, out=n)
    np.subtract(n, a_prev, out=a)            # a = a_prev + u * (n - a_prev)
    a *= u
    a += a_prev
    return (a,), (gates, a_prev, r_a)


def gru_step_backward(dstate, cache, W_h_T, out=None):
    """Backward of `gru_step_forward`. dstate: (da (N, H),); W_h_T: (3, H, H).

    Returns dx_proj (3, N, H), the gradient of the pre-activations [r, u, n] (the gradient of
    W_hn's input is r * a_prev, kept in the cache), and (da_prev (N, H),).
    """
    (da,), (gates, a_prev, _) = dstate, cache
    r, u, n = gates
    dx = _new(out, None, a_prev, 3)
    dr, du, dn = dx
    np.multiply(n, n, out=dn)                # dn = da * u * (1 - n^2)
    np.subtract(1, dn, out=dn)
    dn *= u
    dn *= da
    d_ra = np.matmul(dn, W_h_T[2])
    np.subtract(n, a_prev, out=du)           # du = da * (n - a_prev) * u (1 - u)
    du *= da
    np.multiply(d_ra, a_prev, out=dr)        # dr = d(r a_prev) * a_prev * r (1 - r)
    scratch = np.subtract(1, gates[:2])
    scratch *= gates[:2]
    dx[:2] *= scratch
    d_ra *= r
    np.subtract(1, u, out=scratch[0])        # the two direct paths from a_prev to a
    scratch[0] *= da
    d_ra += scratch[0]
    add_blocks(np.matmul(dx[:2], W_h_T[:2], out=scratch), out=da)
    da += d_ra
    return dx, (da,)


def gru_after_step_forward(x_proj, prev, W_h, b_hn, out=None):
    """The cuDNN / PyTorch / Keras GRU (reset after the product, `reset_after=True`).

        r = sigmoid(x_r + a_prev W_hr)         z = sigmoid(x_z + a_prev W_hz)
        n = tanh(x_n + r * (a_prev W_hn + b_hn))
        a = (1 - z) * n + z * a_prev            # here the update gate z weighs the OLD state

    x_proj: (3, N, H); prev: (a_prev (N, H),); W_h: (3, H, H); b_hn: (H,); out: optional
    (a (N, H), gates (3, N, H), h_n (N, H)). Returns ((a,), cache) with cache = (gates r|z|n
    after their nonlinearities, a_prev, h_n = a_prev W_hn + b_hn).
    """
    (a_prev,) = prev
    a, gates, h_n = _new(out, 0, a_prev), _new(out, 1, a_prev, 3), _new(out, 2, a_prev)
    np.matmul(a_prev, W_h, out=gates)
    np.add(gates[2], b_hn, out=h_n)
    gates[:2] += x_proj[:2]
    sigmoid_(gates[:2])
    r, z, n = gates
    np.multiply(r, h_n, out=n)
    n += x_proj[2]
    np.tanh(n, out=n)
    np.subtract(a_prev, n, out=a)            # a = n + z * (a_prev - n)
    a *= z
    a += n
    return (a,), (gates, a_prev, h_n)


def gru_after_step_backward(dstate, cache, W_h_T, out=None):
    """Backward of `gru_after_step_forward`. dstate: (da (N, H),); W_h_T: (3, H, H).

    Returns dx_proj (3, N, H), the gradient of the pre-activations [r, z, n], and (da_prev (N, H),).
    The recurrent product's gradient differs from dx_proj only in the n block, which is scaled by
    r: `recurrent_weight_grads` applies that.
    """
    (da,), (gates, a_prev, h_n) = dstate, cache
    r, z, n = gates
    dx = _new(out, None, a_prev, 3)
    dr, dz, dn = dx
    dh = np.empty_like(dx)                   # gradient of the recurrent product a_prev W_h
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
    prod = np.matmul(dh, W_h_T)
    da += add_blocks(prod, out=prod[0])
    return dx, (da,)


# ---------------------------------------------------------------------------------------- lstm
def lstm_step_forward(x_proj, prev, W_h, b_hn=None, out=None):
    """The LSTM of the article, all gates in one batched product.

        i, f, o = sigmoid(x_ifo + a_prev W_h,ifo)     g = tanh(x_g + a_prev W_h,g)
        c = i * g + f * c_prev                          a = o * tanh(c)

    x_proj: (4, N, H); prev: (a_prev, c_prev), each (N, H); W_h: (4, H, H); out: optional
    (a (N, H), c (N, H), gates (4, N, H), tanh_c (N, H)). Returns ((a, c), cache) with
    cache = (gates i|f|o|g after their nonlinearities, c_prev, tanh_c).
    """
    a_prev, c_prev = prev
    a, c = _new(out, 0, a_prev), _new(out, 1, a_prev)
    gates, tanh_c = _new(out, 2, a_prev, 4), _new(out, 3, a_prev)
    np.matmul(a_prev, W_h, out=gates)
    gates += x_proj
    sigmoid_(gates[:3])
    i, f, o, g = gates
    np.tanh(g, out=g)
    np.multiply(f, c_prev, out=c)
    np.multiply(i, g, out=tanh_c)            # tanh_c's buffer is free until the line after
    c += tanh_c
    np.tanh(c, out=tanh_c)
    np.multiply(o, tanh_c, out=a)
    return (a, c), (gates, c_prev, tanh_c)


def lstm_step_backward(dstate, cache, W_h_T, out=None):
    """Backward of `lstm_step_forward`. dstate: (da, dc), each (N, H): the total gradients reaching
    a<t> and c<t>; they are overwritten with da_prev and dc_prev. W_h_T: (4, H, H).

    Returns dx_proj (4, N, H), the gradient of the pre-activations [i, f, o, g], and
    (da_prev, dc_prev), each (N, H).
    """
    (da, dc), (gates, c_prev, tanh_c) = dstate, cache
    i, f, o, g = gates
    dx = _new(out, None, c_prev, 4)
    di, df, do, dg = dx
    np.multiply(tanh_c, tanh_c, out=dg)      # dc += da * o * (1 - tanh(c)^2)
    np.subtract(1, dg, out=dg)
    dg *= o
    dg *= da
    dc += dg
    np.multiply(dc, g, out=di)
    np.multiply(dc, c_prev, out=df)
    np.multiply(da, tanh_c, out=do)
    scratch = np.subtract(1, gates[:3])      # sigmoid' = s (1 - s)
    scratch *= gates[:3]
    dx[:3] *= scratch
    np.multiply(g, g, out=dg)                # dg = dc * i * (1 - g^2)
    np.subtract(1, dg, out=dg)
    dg *= i
    dg *= dc
    dc *= f
    add_blocks(np.matmul(dx, W_h_T), out=da)
    return dx, (da, dc)


# ------------------------------------------------------------------------------------ registry
class Cell(NamedTuple):
    """What the sequence layer needs to know about a cell."""
    gates: int                   # G: gate blocks in x_proj
    states: int                  # 1 for (a,), 2 for (a, c)
    buffers: tuple[int, ...]     # each per-step `out` array: 1 = (N, H), G = (G, N, H)
    step_forward: Callable
    step_backward: Callable


CELLS = {
    "rnn": Cell(GATES["rnn"], 1, (1,), rnn_step_forward, rnn_step_backward),
    "gru": Cell(GATES["gru"], 1, (1, 3, 1), gru_step_forward, gru_step_backward),
    "gru_after": Cell(GATES["gru"], 1, (1, 3, 1), gru_after_step_forward, gru_after_step_backward),
    "lstm": Cell(GATES["lstm"], 2, (1, 1, 4, 1), lstm_step_forward, lstm_step_backward),
}


def recurrent_weight_grads(kind: str, buffers: list[np.ndarray], dX: np.ndarray
                           ) -> dict[str, np.ndarray]:
    """Sum over timesteps of the recurrent weight gradients, as one large product per gate block.

    buffers: the layer's per-step arrays as filled by the forward steps, (T, B, H) or, for gate
    values, (G, T, B, H); buffers[0] is the history a<0..T> (T+1, B, H), so that a<t-1> for every
    step is buffers[0][:-1]. dX: (G, T*B, H) gradients of the pre-activations, zero on padded
    steps. Returns {"W_h": (H, G*H)} and, for gru_after, {"b_hn": (H,)}.
    """
    a_hist = buffers[0]
    H = a_hist.shape[-1]
    A_T = a_hist[:-1].reshape(-1, H).T       # (H, T*B)
    if kind == "gru":                        # the candidate's recurrent input is r * a_prev
        r_a = buffers[2].reshape(-1, H)
        return {"W_h": from_gate_blocks(np.stack([A_T @ dX[0], A_T @ dX[1], r_a.T @ dX[2]]))}
    if kind == "gru_after":                  # the candidate's product is scaled by r
        dh_n = dX[2] * buffers[1][0].reshape(-1, H)
        return {"W_h": from_gate_blocks(np.stack([A_T @ dX[0], A_T @ dX[1], A_T @ dh_n])),
                "b_hn": dh_n.sum(0)}
    return {"W_h": from_gate_blocks(np.matmul(A_T, dX))}
