"""Backpropagation through time, written plainly: read this file first.

The cells of the article that started the project (Mukul Rathi, "Demystifying Deep Learning, Part 10:
Recurrent Neural Networks", 2018), one timestep at a time, cs231n style: a forward step returns its
output and a cache; the backward step takes the gradient reaching that output and returns the
gradients of its inputs and of the weights it used. Then one loop over time each way. No buffers,
no in-place tricks: slow, and meant to be read. The tests hold the fast path equal to it.

Layout (the model's, see rnn/model.py): W_x (D, G*H), W_h (H, G*H), b (G*H,), the G gate blocks
side by side: rnn [candidate]; gru [r, u, n]; gru_after [r, z, n] and b_hn (H,); lstm [i, f, o, g].
The article's `W [a<t-1>, x<t>]` is `x @ W_x + a_prev @ W_h`: the same product, split in two, and
transposed, because here a batch is rows, x (N, D), a (N, H), where the article keeps the m examples
in columns. Z is a gate's weighted input (its pre-activation), dZ its gradient. Weight gradients
carry no 1/m: the loss's own scale arrives with the upstream gradient.

Read next rnn/cells.py, then rnn/recurrent.py, then rnn/model.py. They compute the same numbers,
rearranged for speed: gate blocks on a leading axis, (G, N, H), so every elementwise operation
runs on contiguous memory; x @ W_x + b for many timesteps in one large product before the loop;
preallocated buffers written with `out=`, so the loop allocates nothing; instead of a mask, the
batch is sorted by length and step t touches only the prefix of rows still running; and the
backward steps return only the pre-activation gradients dZ, so that each weight gradient, a sum
over t of products, is one large product after the loop instead of T small ones.
"""
from __future__ import annotations

import numpy as np

Array = np.ndarray


def sigmoid(z: Array) -> Array:
    """1 / (1 + exp(-z)), written with tanh so that it never overflows."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def blocks(params: dict, G: int) -> tuple[list, list, list]:
    """The gate blocks of W_x, W_h and b: G arrays (D, H), G arrays (H, H), G arrays (H,)."""
    return [np.split(params[k], G, axis=-1) for k in ("W_x", "W_h", "b")]


def weight_grads(x: Array, a_prev: Array, dZ: Array) -> dict:
    """Gradients of Z = x @ W_x + a_prev @ W_h + b, given dZ (N, G*H): x (N, D), a_prev (N, H)."""
    return {"W_x": x.T @ dZ, "W_h": a_prev.T @ dZ, "b": dZ.sum(0)}


# ------------------------------------------------------------------------------------ the cells
def rnn_step_forward(x: Array, a_prev: Array, params: dict) -> tuple[Array, tuple]:
    """a = tanh(x @ W_x + a_prev @ W_h + b). x (N, D), a_prev (N, H) -> a (N, H), cache."""
    a = np.tanh(x @ params["W_x"] + a_prev @ params["W_h"] + params["b"])
    return a, (x, a_prev, a, params)


def rnn_step_backward(da: Array, cache: tuple) -> tuple[Array, Array, dict]:
    """da (N, H) -> dx (N, D), da_prev (N, H), grads {W_x, W_h, b}."""
    x, a_prev, a, params = cache
    dZ = da * (1 - a**2)                                    # tanh' = 1 - tanh^2
    return dZ @ params["W_x"].T, dZ @ params["W_h"].T, weight_grads(x, a_prev, dZ)


def gru_step_forward(x: Array, a_prev: Array, params: dict) -> tuple[Array, tuple]:
    """The article's GRU: the reset gate scales a_prev before the candidate's product.
    x (N, D), a_prev (N, H) -> a (N, H), cache."""
    (W_xr, W_xu, W_xn), (W_hr, W_hu, W_hn), (b_r, b_u, b_n) = blocks(params, 3)
    r = sigmoid(x @ W_xr + a_prev @ W_hr + b_r)             # reset gate
    u = sigmoid(x @ W_xu + a_prev @ W_hu + b_u)             # update gate
    n = np.tanh(x @ W_xn + (r * a_prev) @ W_hn + b_n)       # candidate
    a = u * n + (1 - u) * a_prev                            # u weighs the NEW candidate
    return a, (x, a_prev, r, u, n, params)


def gru_step_backward(da: Array, cache: tuple) -> tuple[Array, Array, dict]:
    """da (N, H) -> dx (N, D), da_prev (N, H), grads {W_x, W_h, b}."""
    x, a_prev, r, u, n, params = cache
    _, (W_hr, W_hu, W_hn), _ = blocks(params, 3)
    dZ_n = da * u * (1 - n**2)
    dZ_u = da * (n - a_prev) * u * (1 - u)                  # sigmoid' = s (1 - s)
    d_ra = dZ_n @ W_hn.T                                    # gradient of r * a_prev
    dZ_r = d_ra * a_prev * r * (1 - r)
    dZ = np.concatenate([dZ_r, dZ_u, dZ_n], axis=1)         # (N, 3H), blocks side by side like W
    # a_prev reaches a directly, through r * a_prev, and through both gates' products
    da_prev = da * (1 - u) + d_ra * r + dZ_r @ W_hr.T + dZ_u @ W_hu.T
    grads = weight_grads(x, a_prev, dZ)
    grads["W_h"] = np.concatenate([a_prev.T @ dZ_r, a_prev.T @ dZ_u, (r * a_prev).T @ dZ_n], axis=1)
    return dZ @ params["W_x"].T, da_prev, grads


def gru_after_step_forward(x: Array, a_prev: Array, params: dict) -> tuple[Array, tuple]:
    """PyTorch's GRU (reset_after): the reset gate scales the candidate's recurrent product, which
    has its own bias b_hn (H,). x (N, D), a_prev (N, H) -> a (N, H), cache."""
    (W_xr, W_xz, W_xn), (W_hr, W_hz, W_hn), (b_r, b_z, b_n) = blocks(params, 3)
    r = sigmoid(x @ W_xr + a_prev @ W_hr + b_r)
    z = sigmoid(x @ W_xz + a_prev @ W_hz + b_z)
    h_n = a_prev @ W_hn + params["b_hn"]
    n = np.tanh(x @ W_xn + b_n + r * h_n)
    a = (1 - z) * n + z * a_prev                            # here z weighs the OLD state
    return a, (x, a_prev, r, z, n, h_n, params)


def gru_after_step_backward(da: Array, cache: tuple) -> tuple[Array, Array, dict]:
    """da (N, H) -> dx (N, D), da_prev (N, H), grads {W_x, W_h, b, b_hn}."""
    x, a_prev, r, z, n, h_n, params = cache
    _, (W_hr, W_hz, W_hn), _ = blocks(params, 3)
    dZ_n = da * (1 - z) * (1 - n**2)
    dZ_z = da * (a_prev - n) * z * (1 - z)
    dZ_r = dZ_n * h_n * r * (1 - r)
    dh_n = dZ_n * r                                         # gradient of a_prev @ W_hn + b_hn
    dZ = np.concatenate([dZ_r, dZ_z, dZ_n], axis=1)
    da_prev = da * z + dZ_r @ W_hr.T + dZ_z @ W_hz.T + dh_n @ W_hn.T
    grads = weight_grads(x, a_prev, dZ)
    grads["W_h"] = a_prev.T @ np.concatenate([dZ_r, dZ_z, dh_n], axis=1)
    grads["b_hn"] = dh_n.sum(0)
    return dZ @ params["W_x"].T, da_prev, grads


def lstm_step_forward(x: Array, a_prev: Array, c_prev: Array, params: dict
                      ) -> tuple[Array, Array, tuple]:
    """The article's LSTM. x (N, D), a_prev (N, H), c_prev (N, H) -> a (N, H), c (N, H), cache."""
    (W_xi, W_xf, W_xo, W_xg), (W_hi, W_hf, W_ho, W_hg), (b_i, b_f, b_o, b_g) = blocks(params, 4)
    i = sigmoid(x @ W_xi + a_prev @ W_hi + b_i)             # input gate
    f = sigmoid(x @ W_xf + a_prev @ W_hf + b_f)             # forget gate
    o = sigmoid(x @ W_xo + a_prev @ W_ho + b_o)             # output gate
    g = np.tanh(x @ W_xg + a_prev @ W_hg + b_g)             # candidate memory
    c = i * g + f * c_prev
    a = o * np.tanh(c)
    return a, c, (x, a_prev, c_prev, i, f, o, g, c, params)


def lstm_step_backward(da: Array, dc: Array, cache: tuple) -> tuple[Array, Array, Array, dict]:
    """da, dc (N, H): gradients reaching a and c -> dx (N, D), da_prev, dc_prev (N, H), grads."""
    x, a_prev, c_prev, i, f, o, g, c, params = cache
    tanh_c = np.tanh(c)
    dc = dc + da * o * (1 - tanh_c**2)                      # c reaches the loss directly and via a
    dZ_i = dc * g * i * (1 - i)
    dZ_f = dc * c_prev * f * (1 - f)
    dZ_o = da * tanh_c * o * (1 - o)
    dZ_g = dc * i * (1 - g**2)
    dZ = np.concatenate([dZ_i, dZ_f, dZ_o, dZ_g], axis=1)   # (N, 4H)
    return dZ @ params["W_x"].T, dZ @ params["W_h"].T, dc * f, weight_grads(x, a_prev, dZ)


STEPS = {"rnn": (rnn_step_forward, rnn_step_backward),
         "gru": (gru_step_forward, gru_step_backward),
         "gru_after": (gru_after_step_forward, gru_after_step_backward),
         "lstm": (lstm_step_forward, lstm_step_backward)}


# ------------------------------------------------------------------------------ the time loop
def reverse_within_lengths(X: Array, lengths: Array) -> Array:
    """(T, N, ...) -> each sequence reversed within its own length; padding stays where it is."""
    out = X.copy()
    for row, n in enumerate(lengths):
        out[:n, row] = X[:n, row][::-1]
    return out


def sequence_forward(X: Array, lengths: Array, params: dict, cell: str,
                     state0: tuple | None = None, reverse: bool = False) -> tuple[Array, tuple, dict]:
    """Run a cell over a right-padded batch.

    X (T, N, D), time-major; lengths (N,), each in [1, T], in any order; cell: rnn, gru, gru_after
    or lstm; state0: (a0,) or, for the lstm, (a0, c0), each (N, H), zeros when None; reverse: read
    each sequence from its last real step to its first (outputs come back in X's order).
    Returns outputs (T, N, H), zero at padded steps; the final states, each (N, H), which are the
    states at each sequence's last real step; and the cache for `sequence_backward`.
    """
    T, N, _ = X.shape
    H, lengths = params["W_h"].shape[0], np.asarray(lengths)
    step_forward = STEPS[cell][0]
    if reverse:
        X = reverse_within_lengths(X, lengths)
    if state0 is None:
        state0 = (np.zeros((N, H), X.dtype),) * (2 if cell == "lstm" else 1)
    a, c = state0[0], (state0[1] if cell == "lstm" else None)
    outputs, steps = [], []
    for t in range(T):
        mask = (t < lengths)[:, None].astype(X.dtype)      # (N, 1): 1 on a real step, 0 on padding
        # a padded step computes on its padding, then keeps the old state
        if cell == "lstm":
            a_new, c_new, step = step_forward(X[t], a, c, params)
            c = mask * c_new + (1 - mask) * c
        else:
            a_new, step = step_forward(X[t], a, params)
        a = mask * a_new + (1 - mask) * a
        outputs.append(mask * a)
        steps.append((mask, step))
    outputs = np.stack(outputs)
    if reverse:
        outputs = reverse_within_lengths(outputs, lengths)
    final = (a, c) if cell == "lstm" else (a,)
    cache = {"cell": cell, "params": params, "lengths": lengths, "reverse": reverse, "steps": steps}
    return outputs, final, cache


def sequence_backward(d_outputs: Array, d_final: tuple, cache: dict
                      ) -> tuple[Array, dict, tuple]:
    """Backpropagation through time for `sequence_forward`.

    d_outputs (T, N, H): gradient of the outputs; d_final: gradients of the final states, each
    (N, H). Returns dX (T, N, D), zero at padded steps; grads, the sum over timesteps of each
    step's weight gradients, with the keys of params; and the initial states' gradients, each (N, H).
    """
    cell, lengths, steps = cache["cell"], cache["lengths"], cache["steps"]
    step_backward = STEPS[cell][1]
    if cache["reverse"]:
        d_outputs = reverse_within_lengths(d_outputs, lengths)
    da = d_final[0]                             # the final state is the state after the last step
    dc = d_final[1] if cell == "lstm" else None
    dX = []
    grads = {k: np.zeros_like(p) for k, p in cache["params"].items()}
    for t in reversed(range(len(steps))):
        mask, step = steps[t]
        da = da + mask * d_outputs[t]
        # the step gets gradient only where it was real; a padded step passes it straight back
        if cell == "lstm":
            dx, da_prev, dc_prev, step_grads = step_backward(mask * da, mask * dc, step)
            dc = dc_prev + (1 - mask) * dc
        else:
            dx, da_prev, step_grads = step_backward(mask * da, step)
        da = da_prev + (1 - mask) * da
        dX.append(dx)
        for k in grads:                         # every step used the same weights: sum
            grads[k] += step_grads[k]
    dX = np.stack(dX[::-1])
    if cache["reverse"]:
        dX = reverse_within_lengths(dX, lengths)
    return dX, grads, ((da, dc) if cell == "lstm" else (da,))
