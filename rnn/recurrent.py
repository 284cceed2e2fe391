"""The time loop: one recurrent layer over a padded batch, forward and backpropagation through time.

Layout is time-major: inputs X are (T, B, D), outputs (T, B, H). Sequences are right-padded and the
batch is sorted by length, longest first (`SentimentModel` sorts and unsorts). At step t only the
first `active[t]` rows are real, so the loop works on the prefix `[:active[t]]` and never touches a
padded step: padded steps neither change the state nor receive gradient, and a sequence's final
state is the one at its own last real token. This is what `torch.nn.utils.rnn.pack_padded_sequence`
does. The recurrent part skips padding; the input projection and its gradients run over all T*B
rows in a few large products (length-bucketed batches keep that waste small).

A reverse direction (bidirectional layers) runs the same loop on each sequence reversed within its
own length.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import numpy as np

from .cells import CELLS, add_blocks, from_gate_blocks, gate_blocks, recurrent_weight_grads


def active_rows(lengths: np.ndarray, T: int) -> np.ndarray:
    """(T,) how many sequences are still running at each step; lengths (B,) sorted, longest first."""
    if lengths.size and (lengths.min() < 1 or lengths.max() > T or np.any(np.diff(lengths) > 0)):
        raise ValueError("lengths must lie in [1, T] and be sorted longest first")
    return (lengths[None, :] > np.arange(T)[:, None]).sum(1)


def reverse_index(lengths: np.ndarray, T: int) -> np.ndarray:
    """(T, B) time index that reverses each sequence within its own length; padding stays put.

    Applying it twice gives the identity, so it also maps reversed outputs back.
    """
    t = np.arange(T)[:, None]
    return np.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


PROJ_STEPS = 16           # timesteps whose input projection is computed in one product
FLUSH_DENORMALS = True     # switch off only to measure what denormal arithmetic costs


def flush_threshold(dtype) -> float:
    """Below this, a backpropagated value is set to zero.

    Gradients that vanish through many steps reach float32's denormal range, where x86 arithmetic
    runs 10-100x slower; they no longer change any weight. The margin of one mantissa width keeps
    the next step's products normal too.
    """
    info = np.finfo(dtype)
    return float(info.tiny) * 2.0 ** (info.nmant + 1)


class BufferPool:
    """Large arrays kept from one call to the next and handed out again once nothing else refers
    to them.

    Every training step needs the same large buffers (a layer's gate values and the gradient of its
    pre-activations: 105 MB each for an LSTM share of 64 x 400 x 256); fresh ones cost the kernel
    page faults and zeroing, up to 0.5 s of system time a step at that size (measured, 2026-12-05).
    A buffer is handed out again only when the pool holds the last reference to its memory (every
    view of an array refers to it), so a cache its caller still keeps is never overwritten. A
    request larger than every free buffer replaces the largest of them, so the pool holds at most
    as many buffers as were ever in use at once. Arrays come uninitialised, like np.empty."""

    def __init__(self):
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()
        probe = [np.empty(1)]
        self._unused = sys.getrefcount(probe[0])      # references of an array only the list holds

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        dtype, size = np.dtype(dtype), int(np.prod(shape, dtype=np.int64))
        with self._lock:
            free = [k for k in range(len(self._buffers)) if self._buffers[k].dtype == dtype
                    and sys.getrefcount(self._buffers[k]) <= self._unused]
            fits = [k for k in free if self._buffers[k].size >= size]
            if fits:
                buf = self._buffers[min(fits, key=lambda k: self._buffers[k].size)]
            else:
                buf = np.empty(size, dtype)
                if free:                     # the largest free one is too small: replace it
                    self._buffers[max(free, key=lambda k: self._buffers[k].size)] = buf
                else:
                    self._buffers.append(buf)
            return buf[:size].reshape(shape)

    def clear(self) -> None:
        """Forget every buffer (the memory goes when the last view of it does)."""
        with self._lock:
            self._buffers = []


BUFFERS = BufferPool()          # the layers' buffers, reused step after step in this process


def clear_padding(arrays: list[np.ndarray], active: np.ndarray, offset: int) -> None:
    """Zero each (T', ..., B, H) array's rows past active[t] at time t + offset: the part of a
    padded batch that no step writes (a reused buffer holds the previous batch's values there)."""
    if not arrays:
        return
    B = arrays[0].shape[-2]
    for t in np.flatnonzero(active < B):
        for a in arrays:
            a[t + offset, ..., active[t]:, :] = 0


@dataclass
class LayerCache:
    kind: str
    X: np.ndarray            # (T, B, D) input, in the order the loop saw it
    lengths: np.ndarray      # (B,)
    active: np.ndarray       # (T,)
    buffers: tuple           # the cell's step tuple with a time axis (see `layer_buffers`)
    params: dict
    rev: np.ndarray | None   # reverse_index for a reverse direction, else None


def layer_buffers(kind: str, T: int, B: int, H: int, dtype, steps: int, active: np.ndarray | None = None
                  ) -> tuple:
    """The arrays a layer's forward steps write into: the cell's step tuple (rnn.cells) with a time
    axis. The state fields (a, and c for the LSTM) hold the history of T + 1 states, a<0> first and
    zero; the others hold `steps` steps (T, or 1 where no backward pass will read them), each
    (steps, B, H), but gates, (G, steps, B, H). They come from BUFFERS; where the loop will not
    write (a<0>, and with `active` (T,), the rows of padded steps), they are zero."""
    cell = CELLS[kind]
    buffers = cell.step(*(BUFFERS.empty((T + 1, B, H), dtype) if k < cell.states else
                          BUFFERS.empty((cell.gates, steps, B, H) if name == "gates" else (steps, B, H), dtype)
                          for k, name in enumerate(cell.step._fields)))
    for history in buffers[:cell.states]:
        history[0] = 0
    if active is not None:
        clear_padding(list(buffers[:cell.states]), active, 1)
        if steps == T:
            clear_padding([buf.swapaxes(0, 1) if name == "gates" else buf
                           for name, buf in zip(cell.step._fields[cell.states:], buffers[cell.states:])],
                          active, 0)
    return buffers


def step_slices(buffers: tuple, states: int, t: int, slot: int, n: int) -> tuple[tuple, tuple]:
    """Views of step t's first n rows within a layer's buffers: (the state before it, its step
    tuple), the per-step fields taken at `slot` (t, or 0 when only one step is kept)."""
    prev = tuple(history[t, :n] for history in buffers[:states])
    state = [history[t + 1, :n] for history in buffers[:states]]
    rest = [buf[:, slot, :n] if name == "gates" else buf[slot, :n]
            for name, buf in zip(buffers._fields[states:], buffers[states:])]
    return prev, type(buffers)(*state, *rest)


def sequence_forward(X: np.ndarray, lengths: np.ndarray, params: dict, kind: str,
                     state0: tuple | None = None, reverse: bool = False, keep_cache: bool = True
                     ) -> tuple[np.ndarray, tuple, LayerCache | None]:
    """Run one direction of one layer over a batch.

    X: (T, B, D); lengths: (B,) sorted longest first; params: W_x (D, G*H), W_h (H, G*H), b (G*H,)
    and, for kind 'gru_after', b_hn (H,); state0: initial (a0,) or (a0, c0), each (B, H), zeros
    when None. Returns the outputs (T, B, H) (zero at padded steps), the final states, each (B, H),
    taken at each sequence's last real step, and the cache for `sequence_backward` (None without
    `keep_cache`: inference then keeps one step of gate values instead of all of them).
    """
    cell = CELLS[kind]
    T, B, D = X.shape
    G, H = cell.gates, params["W_h"].shape[0]
    rev = reverse_index(lengths, T) if reverse else None
    if reverse:
        X = X[rev, np.arange(B)]
    active = active_rows(lengths, T)
    buffers = layer_buffers(kind, T, B, H, X.dtype, T if keep_cache else 1, active)
    for history, initial in zip(buffers[:cell.states], state0 or ()):
        history[0] = initial
    W_x, b, b_hn = gate_blocks(params["W_x"], G), params["b"].reshape(G, 1, H), params.get("b_hn")
    W_h = np.ascontiguousarray(gate_blocks(params["W_h"], G))
    halved = {}
    if cell.halved:          # sigmoid(z) = tanh(z/2)/2 + 1/2: the 1/2 in copies of the weights
        half = np.ones((G, 1, 1), X.dtype)
        half[:cell.halved] = 0.5
        W_x, b, W_h, halved = W_x * half, b * half, W_h * half, {"halved": True}
    # x W_x + b for PROJ_STEPS timesteps at a time: one large product, into a buffer that stays
    # in cache instead of a (G, T, B, H) array (the backward pass does not need it).
    x_proj = np.empty((G, min(T, PROJ_STEPS) * B, H), X.dtype)
    for t in range(T):
        if t % PROJ_STEPS == 0:
            chunk = X[t:t + PROJ_STEPS].reshape(-1, D)
            proj = x_proj[:, :len(chunk)]
            np.matmul(chunk, W_x, out=proj)
            proj += b
        n = active[t]
        prev, out = step_slices(buffers, cell.states, t, t if keep_cache else 0, n)
        row = (t % PROJ_STEPS) * B
        cell.step_forward(x_proj[:, row:row + n], prev, W_h, b_hn, out=out, **halved)
    rows = np.arange(B)
    final = tuple(history[lengths, rows] for history in buffers[:cell.states])
    outputs = buffers.a[1:]
    if reverse:
        outputs = outputs[rev, rows]
    cache = LayerCache(kind, X, lengths, active, buffers, params, rev) if keep_cache else None
    return outputs, final, cache


def sequence_backward(d_outputs: np.ndarray | None, d_final: tuple | None, cache: LayerCache,
                      trace: bool = False, input_grad: bool = True
                      ) -> tuple[np.ndarray | None, dict, tuple, dict | None]:
    """Backpropagation through time for `sequence_forward`.

    d_outputs: (T, B, H) gradient of the outputs, or None; d_final: gradients of the final states,
    each (B, H) (None entries or None for none). Returns dX (T, B, D), the parameter gradients
    (same keys as params), the initial-state gradients, each (B, H), and, when `trace` is set, the
    per-timestep gradient trace (see `align_trace`) of dL/da<t> and, for the LSTM, of the gradient
    reaching c<t> along the memory path from step t+1 (so it is zero at the last step of 'last'
    pooling, where only a<t> receives gradient).
    With `input_grad` off (a frozen embedding below), dX is None and its product is skipped.
    """
    cell, c = CELLS[cache.kind], cache
    T, B, D = c.X.shape
    G, H = cell.gates, c.params["W_h"].shape[0]
    rows = np.arange(B)
    if d_outputs is not None and c.rev is not None:
        d_outputs = d_outputs[c.rev, rows]
    d_state = np.zeros((cell.states, B, H), c.X.dtype)     # da (and dc), one array: one flush
    dX_proj = BUFFERS.empty((G, T, B, H), c.X.dtype)
    clear_padding([dX_proj.swapaxes(0, 1)], c.active, 0)    # steps and rows the loop skips
    scratch = np.empty((2 * G, B, H), c.X.dtype)            # the steps' intermediate values
    magnitude, small = np.empty_like(d_state), np.empty(d_state.shape, bool)
    norms = np.zeros((cell.states, T, B)) if trace else None
    tiny = flush_threshold(c.X.dtype) if FLUSH_DENORMALS else 0.0
    active = np.append(c.active, 0)
    W_h_T = np.ascontiguousarray(gate_blocks(c.params["W_h"], G).transpose(0, 2, 1))
    for t in range(T - 1, -1, -1):
        n, ending = active[t], active[t + 1]
        if n == 0:
            continue
        if d_final is not None and ending < n:                 # rows whose last step is t
            for k, d in enumerate(d_final):
                if d is not None:
                    d_state[k, ending:n] += d[ending:n]
        if d_outputs is not None:
            d_state[0, :n] += d_outputs[t, :n]
        d = d_state[:, :n]
        if trace:
            for k, dk in enumerate(d):
                norms[k, t, :n] = np.sqrt(np.einsum("ij,ij->i", dk, dk, dtype=np.float64))
        if tiny:
            np.abs(d, out=magnitude[:, :n])
            np.less(magnitude[:, :n], tiny, out=small[:, :n])
            np.copyto(d, 0, where=small[:, :n])
        prev, step = step_slices(c.buffers, cell.states, t, t, n)
        cell.step_backward(tuple(d), prev, step, W_h_T, out=dX_proj[:, t, :n], scratch=scratch[:, :n])
    dG = dX_proj.reshape(G, T * B, H)
    grads = {"W_x": from_gate_blocks(np.matmul(c.X.reshape(T * B, D).T, dG)),
             "b": dG.sum(1).reshape(G * H), **recurrent_weight_grads(c.kind, c.buffers, dG)}
    dX = None
    if input_grad:
        W_x_T = gate_blocks(c.params["W_x"], G).transpose(0, 2, 1)          # (G, H, D)
        dX = np.matmul(dG, W_x_T)                                          # (G, T*B, D)
        dX = (dX[0] if G == 1 else add_blocks(dX, out=dX[0])).reshape(T, B, D)
        if c.rev is not None:
            dX = dX[c.rev, rows]
    traces = None
    if trace:
        names = ("a", "c")[:cell.states]
        traces = {name: align_trace(norms[k], c.lengths) for k, name in enumerate(names)}
    return dX, grads, tuple(d_state), traces


def align_trace(norms: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-index per-step gradient norms by distance from each sequence's last real token.

    norms: (T, B) norm of the gradient at step t of row b (in the order the loop ran).
    Returns (sums, counts), each (T,): at distance d, the sum of the norms over the rows long enough
    to have one, and how many rows that is. Sums and counts add across batches; their ratio is the
    batch-mean norm. A zero norm far from the end means the gradient fell below `flush_threshold`.
    """
    T, B = norms.shape
    t = lengths[None, :] - 1 - np.arange(T)[:, None]        # (T distances, B): step at distance d
    valid = t >= 0
    vals = np.where(valid, norms[np.clip(t, 0, None), np.arange(B)], 0.0)
    return vals.sum(1), valid.sum(1)
