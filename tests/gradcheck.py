"""Numeric gradients by central differences, and the error measure the gradient checks use.

Everything here runs in float64 with the fourth-order central difference
(8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / 12h: with h = 1e-4 its truncation error (~h^4) and
rounding error (~eps |f| / h) are both near 1e-11 for losses of order one, so a relative error bound
of 1e-6 separates a correct hand-derived gradient from one with any real mistake (a wrong sign, a
missing term or a factor off by the batch size are all errors of order 1).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

H_STEP = 1e-4
TOLERANCE = 1e-6
# Below this size a gradient's relative error is dominated by the difference quotient's own error
# (~1e-11): the bound then acts as an absolute one, TOLERANCE * FLOOR = 1e-10.
FLOOR = 1e-4


def numeric_grad(f: Callable[[], float], x: np.ndarray, index=None, h: float = H_STEP) -> np.ndarray:
    """Fourth-order central-difference gradient of the scalar f() with respect to x, which f reads
    and which is perturbed in place (and restored). `index`: flat positions to check (default: all).

    Returns an array of x's shape, NaN at positions not checked."""
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need float64, got {x.dtype}")
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous so that it can be perturbed in place")
    out = np.full(x.shape, np.nan)
    out_flat = out.reshape(-1)
    for i in range(flat.size) if index is None else index:
        old = flat[i]
        values = []
        for step in (h, -h, 2 * h, -2 * h):
            flat[i] = old + step
            values.append(f())
        flat[i] = old
        out_flat[i] = (8 * (values[0] - values[1]) - (values[2] - values[3])) / (12 * h)
    return out


def rel_error(num: np.ndarray, ana: np.ndarray, floor: float = FLOOR) -> np.ndarray:
    """Per-element |num - ana| / max(|num| + |ana|, floor)."""
    return np.abs(num - ana) / np.maximum(np.abs(num) + np.abs(ana), floor)


def rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    """One number for a whole array: the largest |got - expected| relative to the largest |expected|
    (for results that must agree to rounding, where `rel_error`'s per-element measure is too strict
    on elements that cancel to almost nothing)."""
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-300))


def assert_grad_close(num: np.ndarray, ana: np.ndarray, name: str, tol: float = TOLERANCE,
                      floor: float = FLOOR) -> None:
    """Fail, naming the worst element, unless every checked (non-NaN) element of `num` agrees
    with `ana` to the relative error bound."""
    ana = np.asarray(ana, dtype=np.float64)
    assert ana.shape == num.shape, f"{name}: analytic shape {ana.shape} != {num.shape}"
    checked = ~np.isnan(num)
    assert checked.any(), f"{name}: nothing checked"
    assert np.all(np.isfinite(ana)), f"{name}: analytic gradient is not finite"
    err = np.where(checked, rel_error(np.where(checked, num, 0.0), ana, floor), 0.0)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err[worst] < tol, (f"{name}: relative error {err[worst]:.3g} at {tuple(map(int, worst))}: "
                              f"numeric {num[worst]!r} vs analytic {ana[worst]!r}")


def assert_sequence_grads_close(loss: Callable[[], float], params: dict, grads: dict, X: np.ndarray,
                                dX: np.ndarray, state0: tuple, d_state0: tuple, kind: str) -> None:
    """Check a sequence layer's analytic gradients (every parameter, the input X and each initial
    state: a0, and c0 for the LSTM) against central differences of `loss`."""
    assert set(grads) == set(params)
    for name, p in params.items():
        assert_grad_close(numeric_grad(loss, p), grads[name], f"{kind} d{name}")
    assert_grad_close(numeric_grad(loss, X), dX, f"{kind} dX")
    for k, s in enumerate(state0):
        assert_grad_close(numeric_grad(loss, s), d_state0[k], f"{kind} d{'ac'[k]}0")


def step_as_layer_buffers(cell, prev: tuple, step: tuple) -> tuple:
    """One forward step's arrays (rnn.cells) laid out as a sequence layer's buffers for T = 1:
    the state fields a history (2, N, H) of prev and the new state, the others a time axis of one.
    What `rnn.cells.recurrent_weight_grads` reads to sum the recurrent weight gradients."""
    return type(step)(*(np.stack([prev[k], v]) if k < cell.states else v[:, None] if name == "gates"
                        else v[None] for k, (name, v) in enumerate(zip(step._fields, step))))


def sample_index(size: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to k distinct flat positions out of `size`, always including the first and the last."""
    if size <= k:
        return np.arange(size)
    inner = rng.choice(np.arange(1, size - 1), size=k - 2, replace=False)
    return np.concatenate([[0], np.sort(inner), [size - 1]])


def directional_derivative(f: Callable[[], float], x: np.ndarray, v: np.ndarray,
                           h: float = H_STEP) -> float:
    """Fourth-order central difference of f along direction v (x is perturbed in place and
    restored): checks every element of a gradient at once, as <grad, v>."""
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need float64, got {x.dtype}")
    old = x.copy()
    values = []
    for step in (h, -h, 2 * h, -2 * h):
        np.add(old, step * v, out=x)
        values.append(f())
    x[...] = old
    return (8 * (values[0] - values[1]) - (values[2] - values[3])) / (12 * h)


def assert_directional_close(f: Callable[[], float], x: np.ndarray, ana: np.ndarray, name: str,
                             rng: np.random.Generator, tol: float = TOLERANCE,
                             floor: float = FLOOR, h: float = H_STEP) -> None:
    """Compare <ana, v> with the numeric derivative of f along a random direction v."""
    v = rng.normal(size=x.shape)
    num = directional_derivative(f, x, v, h)
    want = float(np.sum(np.asarray(ana, dtype=np.float64) * v))
    err = float(rel_error(np.float64(num), np.float64(want), floor))
    assert err < tol, f"{name}: directional derivative {num!r} vs analytic {want!r} (rel. error {err:.3g})"
