"""One timestep of each recurrent cell: a forward step and its hand-derived backward step.

Notation (N rows of a batch, hidden size H, G gate blocks per cell):

    x_proj = x<t> W_x + b      (N, G*H)   input projection, computed for all timesteps at once
    a_prev = a<t-1>            (N, H)     previous hidden state
    W_h                        (H, G*H)   recurrent weights, all gates fused into one product

Splitting the article's `W [a<t-1>, x<t>]` into `a<t-1> W_h + x<t> W_x` is the same product; it lets
the sequence layer compute `x W_x` for many timesteps in one large matrix product.

Every step function takes the state of the previous step as a tuple (`(a,)`, or `(a, c)` for the
LSTM) and may write its results into preallocated arrays passed as `out`: the forward steps then
allocate nothing (the backward steps still make a few small temporaries). Every backward step returns `dx_proj`, the gradient of the gate pre-activations,
which is also the gradient of `x_proj`; the weight gradients are sums over timesteps of outer
products with it, done after the loop as one large product (see `recurrent_weight_grads`).

Gate blocks, in column order of `x_proj`, `W_x`, `W_h` and `b`:
    rnn:  [candidate]
    gru:  [reset r, update u, candidate n]
    lstm: [input i, forget f, output o, candidate g]  (sigmoid gates first, contiguous; PyTorch
          orders them i, f, g, o: `rnn.interop` reorders)
"""
from __future__ import annotations

from typing import NamedTuple, Callable

import numpy as np


def sigmoid_(x: np.ndarray) -> np.ndarray:
    """In-place logistic sigmoid via sigma(x) = (1 + tanh(x/2)) / 2: never overflows, 4 passes."""
    x *= 0.5
    np.tanh(x, out=x)
    x *= 0.5
    x += 0.5
    return x


def _new(out, i, like, cols=None):
    if out is not None:
        return out[i]
    shape = like.shape if cols is None else (like.shape[0], cols)
    return np.empty(shape, dtype=like.dtype)


# ----------------------------------------------------------------------------------------- rnn
def rnn_step_forward(x_proj, prev, W_h, b_hn=None, out=None):
    """a<t> = tanh(x_proj + a<t-1> W_h).

    x_proj: (N, H); prev: (a_prev (N, H),); W_h: (H, H); out: optional (a,) arrays (N, H).
    Returns ((a,), cache) with cache = (a,): tanh's derivative needs only its output.
    """
    (a_prev,) = prev
    a = np.matmul(a_prev, W_h, out=_new(out, 0, a_prev))
    a += x_proj
    np.tanh(a, out=a)
    return (a,), (a,)


def rnn_step_backward(dstate, cache, W_h, out=None):
    """dstate: (da (N, H),), the total gradient reaching a<t>; cache from the forward step.

    Returns dx_proj (N, H) (written into `out` when given) and (da_prev (N, H),). Like every
    backward step, it overwrites the arrays of dstate with the previous step's gradients.
    """
    (da,), (a,) = dstate, cache
    dz = np.multiply(a, a, out=out)
    np.subtract(1, dz, out=dz)
    dz *= da
    return dz, (np.matmul(dz, W_h.T, out=da),)


# ----------------------------------------------------------------------------------------- gru
def gru_step_forward(x_proj, prev, W_h, b_hn=None, out=None):
    """The GRU of the original article (reset before the product, `reset_after=False`).

        r = sigmoid(x_r + a_prev W_hr)         u = sigmoid(x_u + a_prev W_hu)
        n = tanh(x_n + (r * a_prev) W_hn)
        a = u * n + (1 - u) * a_prev            # the update gate u weighs the NEW candidate

    x_proj: (N, 3H); prev: (a_prev (N, H),); W_h: (H, 3H); out: optional (a (N, H),
    gates (N, 3H), r_a (N, H)). Returns ((a,), cache) with cache = (gates r|u|n after their
    nonlinearities, a_prev, r * a_prev).
    """
    (a_prev,) = prev
    H = a_prev.shape[1]
    a, gates, r_a = _new(out, 0, a_prev), _new(out, 1, a_prev, 3 * H), _new(out, 2, a_prev)
    np.matmul(a_prev, W_h[:, :2 * H], out=gates[:, :2 * H])
    gates[:, :2 * H] += x_proj[:, :2 * H]
    sigmoid_(gates[:, :2 * H])
    r, u, n = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
    np.multiply(r, a_prev, out=r_a)
    np.matmul(r_a, W_h[:, 2 * H:], out=n)
    n += x_proj[:, 2 * H:]
    np.tanh(n, out=n)
    np.subtract(n, a_prev, out=a)            # a = a_prev + u * (n - a_prev)
    a *= u
    a += a_prev
    return (a,), (gates, a_prev, r_a)


def gru_step_backward(dstate, cache, W_h, out=None):
    """Backward of `gru_step_forward`. dstate: (da (N, H),).

    Returns dx_proj (N, 3H), the gradient of the pre-activations [r, u, n] (the gradient of
    W_hn's input is r * a_prev, kept in the cache), and (da_prev (N, H),).
    """
    (da,), (gates, a_prev, _) = dstate, cache
    H = a_prev.shape[1]
    r, u, n = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
    dz = _new(None if out is None else (out,), 0, gates)
    dr, du, dn = dz[:, :H], dz[:, H:2 * H], dz[:, 2 * H:]
    np.multiply(n, n, out=dn)                # dn = da * u * (1 - n^2)
    np.subtract(1, dn, out=dn)
    dn *= u
    dn *= da
    d_ra = dn @ W_h[:, 2 * H:].T
    np.subtract(n, a_prev, out=du)           # du = da * (n - a_prev) * u (1 - u)
    du *= da
    np.multiply(d_ra, a_prev, out=dr)        # dr = d(r a_prev) * a_prev * r (1 - r)
    dz[:, :2 * H] *= gates[:, :2 * H] * (1 - gates[:, :2 * H])
    d_ra *= r
    d_ra += da * (1 - u)                     # the two direct paths from a_prev to a
    da_prev = np.matmul(dz[:, :2 * H], W_h[:, :2 * H].T, out=da)
    da_prev += d_ra
    return dz, (da_prev,)


def gru_after_step_forward(x_proj, prev, W_h, b_hn, out=None):
    """The cuDNN / PyTorch / Keras GRU (reset after the product, `reset_after=True`).

        r = sigmoid(x_r + a_prev W_hr)         z = sigmoid(x_z + a_prev W_hz)
        n = tanh(x_n + r * (a_prev W_hn + b_hn))
        a = (1 - z) * n + z * a_prev            # here the update gate z weighs the OLD state

    x_proj: (N, 3H); prev: (a_prev (N, H),); W_h: (H, 3H); b_hn: (H,); out: optional
    (a (N, H), gates (N, 3H), h_n (N, H)). Returns ((a,), cache) with cache = (gates r|z|n after
    their nonlinearities, a_prev, h_n = a_prev W_hn + b_hn).
    """
    (a_prev,) = prev
    H = a_prev.shape[1]
    a, gates, h_n = _new(out, 0, a_prev), _new(out, 1, a_prev, 3 * H), _new(out, 2, a_prev)
    np.matmul(a_prev, W_h, out=gates)
    np.add(gates[:, 2 * H:], b_hn, out=h_n)
    gates[:, :2 * H] += x_proj[:, :2 * H]
    sigmoid_(gates[:, :2 * H])
    r, z, n = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
    np.multiply(r, h_n, out=n)
    n += x_proj[:, 2 * H:]
    np.tanh(n, out=n)
    np.subtract(a_prev, n, out=a)            # a = n + z * (a_prev - n)
    a *= z
    a += n
    return (a,), (gates, a_prev, h_n)


def gru_after_step_backward(dstate, cache, W_h, out=None):
    """Backward of `gru_after_step_forward`. dstate: (da (N, H),).

    Returns dx_proj (N, 3H), the gradient of the pre-activations [r, z, n], and (da_prev (N, H),).
    The recurrent product's gradient differs from dx_proj only in the n block, which is scaled by
    r: `recurrent_weight_grads` applies that.
    """
    (da,), (gates, a_prev, h_n) = dstate, cache
    H = a_prev.shape[1]
    r, z, n = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
    dx = _new(None if out is None else (out,), 0, gates)
    dr, dz, dn = dx[:, :H], dx[:, H:2 * H], dx[:, 2 * H:]
    np.multiply(n, n, out=dn)                # dn = da * (1 - z) * (1 - n^2)
    np.subtract(1, dn, out=dn)
    dn *= 1 - z
    dn *= da
    np.subtract(a_prev, n, out=dz)           # dz = da * (a_prev - n) * z (1 - z)
    dz *= da
    np.multiply(dn, h_n, out=dr)             # dr = dn * h_n * r (1 - r)
    dx[:, :2 * H] *= gates[:, :2 * H] * (1 - gates[:, :2 * H])
    dh = dx.copy()
    dh[:, 2 * H:] *= r
    da *= z                                  # the direct path from a_prev to a
    da += dh @ W_h.T
    return dx, (da,)


# ---------------------------------------------------------------------------------------- lstm
def lstm_step_forward(x_proj, prev, W_h, b_hn=None, out=None):
    """The LSTM of the article, gates fused into one product.

        i, f, o = sigmoid(x_ifo + a_prev W_h,ifo)     g = tanh(x_g + a_prev W_h,g)
        c = i * g + f * c_prev                          a = o * tanh(c)

    x_proj: (N, 4H); prev: (a_prev, c_prev), each (N, H); W_h: (H, 4H); out: optional
    (a (N, H), c (N, H), gates (N, 4H), tanh_c (N, H)). Returns ((a, c), cache) with
    cache = (gates i|f|o|g after their nonlinearities, c_prev, tanh_c).
    """
    a_prev, c_prev = prev
    H = a_prev.shape[1]
    a, c = _new(out, 0, a_prev), _new(out, 1, a_prev)
    gates, tanh_c = _new(out, 2, a_prev, 4 * H), _new(out, 3, a_prev)
    np.matmul(a_prev, W_h, out=gates)
    gates += x_proj
    sigmoid_(gates[:, :3 * H])
    np.tanh(gates[:, 3 * H:], out=gates[:, 3 * H:])
    i, f, o, g = (gates[:, k * H:(k + 1) * H] for k in range(4))
    np.multiply(f, c_prev, out=c)
    np.multiply(i, g, out=tanh_c)            # tanh_c's buffer is free until the line after
    c += tanh_c
    np.tanh(c, out=tanh_c)
    np.multiply(o, tanh_c, out=a)
    return (a, c), (gates, c_prev, tanh_c)


def lstm_step_backward(dstate, cache, W_h, out=None):
    """Backward of `lstm_step_forward`. dstate: (da, dc), each (N, H): the total gradients reaching
    a<t> and c<t>; they are overwritten with da_prev and dc_prev.

    Returns dx_proj (N, 4H), the gradient of the pre-activations [i, f, o, g], and
    (da_prev, dc_prev), each (N, H).
    """
    (da, dc), (gates, c_prev, tanh_c) = dstate, cache
    H = c_prev.shape[1]
    i, f, o, g = (gates[:, k * H:(k + 1) * H] for k in range(4))
    dx = _new(None if out is None else (out,), 0, gates)
    di, df, do, dg = (dx[:, k * H:(k + 1) * H] for k in range(4))
    np.multiply(tanh_c, tanh_c, out=dg)      # dc += da * o * (1 - tanh(c)^2)
    np.subtract(1, dg, out=dg)
    dg *= o
    dg *= da
    dc += dg
    np.multiply(dc, g, out=di)
    np.multiply(dc, c_prev, out=df)
    np.multiply(da, tanh_c, out=do)
    dx[:, :3 * H] *= gates[:, :3 * H] * (1 - gates[:, :3 * H])
    np.multiply(g, g, out=dg)                # dg = dc * i * (1 - g^2)
    np.subtract(1, dg, out=dg)
    dg *= i
    dg *= dc
    dc *= f
    return dx, (np.matmul(dx, W_h.T, out=da), dc)


# ------------------------------------------------------------------------------------ registry
class Cell(NamedTuple):
    """What the sequence layer needs to know about a cell."""
    gates: int                   # G: gate blocks in x_proj
    states: int                  # 1 for (a,), 2 for (a, c)
    buffers: tuple[int, ...]     # width, in units of H, of each per-step `out` array
    step_forward: Callable
    step_backward: Callable


CELLS = {
    "rnn": Cell(1, 1, (1,), rnn_step_forward, rnn_step_backward),
    "gru": Cell(3, 1, (1, 3, 1), gru_step_forward, gru_step_backward),
    "gru_after": Cell(3, 1, (1, 3, 1), gru_after_step_forward, gru_after_step_backward),
    "lstm": Cell(4, 2, (1, 1, 4, 1), lstm_step_forward, lstm_step_backward),
}


def cell_kind(cell: str, reset_after: bool = False) -> str:
    """The registry key of a configured cell: 'gru' splits by its `reset_after` switch."""
    if cell not in ("rnn", "gru", "lstm"):
        raise ValueError(f"unknown cell {cell!r}: expected one of rnn, gru, lstm")
    return "gru_after" if cell == "gru" and reset_after else cell


def recurrent_weight_grads(kind: str, buffers: list[np.ndarray], dX: np.ndarray, W_h: np.ndarray
                           ) -> dict[str, np.ndarray]:
    """Sum over timesteps of the recurrent weight gradients, as one large product per block.

    buffers: the layer's per-step arrays (T, B, width) as filled by the forward steps, the first
    one holding the hidden states a<1..T>; the caller passes `a_prev` histories through `a_hist`
    (T+1, B, H) in buffers[0]. dX: (T, B, G*H) gradients of the pre-activations, zero on padded
    steps. Returns {"W_h": (H, G*H)} and, for gru_after, {"b_hn": (H,)}.
    """
    a_hist = buffers[0]
    H = a_hist.shape[-1]
    A = a_hist[:-1].reshape(-1, H)           # a<t-1> for every step
    D = dX.reshape(-1, dX.shape[-1])
    if kind == "gru":
        r_a = buffers[2].reshape(-1, H)
        return {"W_h": np.concatenate([A.T @ D[:, :2 * H], r_a.T @ D[:, 2 * H:]], axis=1)}
    if kind == "gru_after":
        r = buffers[1][..., :H].reshape(-1, H)
        dh_n = D[:, 2 * H:] * r
        return {"W_h": np.concatenate([A.T @ D[:, :2 * H], A.T @ dh_n], axis=1),
                "b_hn": dh_n.sum(0)}
    return {"W_h": A.T @ D}
