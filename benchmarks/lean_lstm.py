#!/usr/bin/env python
"""A lean NumPy LSTM training step, as a yardstick for the project's (benchmarks/step_profile.py).

Embedding -> LSTM -> last state -> logit -> BCE, backward, Adam, float32, all sequences full
length, written as tight as NumPy allows and nothing else: every buffer allocated once and reused
from step to step, the input projection and every weight gradient one product per gate block after
or before the loop, the four gates' activations in one tanh call with the sigmoid's 1/2 folded into
copies of the weights (sigmoid(z) = tanh(z/2)/2 + 1/2; the parameters keep their meaning), gradients
below float32's normal range flushed, no lengths, no dropout, no pooling choices, no function per
step. The embedding gradient and the Adam step are the project's own (rnn.layers, rnn.optim), so
that the difference to step_profile.py is the recurrent layer's plumbing alone.

    python benchmarks/lean_lstm.py                       # 32x200x100x128: one worker's share of 64
    python benchmarks/lean_lstm.py --shape 64x200x100x128 --repeats 9

Prints each part's median CPU time (time.process_time) and wall time over --repeats steps, on one
BLAS thread, beside the GEMM floor of the same products (benchmarks/speed.py). It measures; it
asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.update(dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1"))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rnn.layers import embedding_backward  # noqa: E402
from rnn.optim import Adam  # noqa: E402
from rnn.recurrent import flush_threshold  # noqa: E402
from speed import gemm_floor, parse_shape, positive  # noqa: E402


def lean_step(B: int, T: int, E: int, H: int, vocab: int = 20_000, seed: int = 0):
    """A closure running one training step, and the dict its parts' (cpu, wall) times go to."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    params = {"embedding": rng.normal(0, E ** -0.5, (vocab, E)).astype(f32),
              "W_x": rng.uniform(-0.1, 0.1, (4, E, H)).astype(f32),
              "W_h": rng.uniform(-0.1, 0.1, (4, H, H)).astype(f32),
              "b": np.zeros((4, 1, H), f32), "fc": rng.uniform(-0.1, 0.1, (H,)).astype(f32)}
    params["b"][1] = 1.0
    ids = rng.integers(1, vocab, (T, B))
    labels = rng.integers(0, 2, B).astype(f32)
    half = np.array([0.5, 0.5, 0.5, 1.0], f32)[:, None, None]      # i, f, o (sigmoid), g (tanh)
    gates = np.empty((4, T, B, H), f32)
    a, c, tanh_c = np.zeros((T + 1, B, H), f32), np.zeros((T + 1, B, H), f32), np.empty((T, B, H), f32)
    dZ, work = np.empty((4, T, B, H), f32), np.empty((4, B, H), f32)
    d_state, magnitude = np.empty((2, B, H), f32), np.empty((2, B, H), f32)
    small, tiny = np.empty((2, B, H), bool), flush_threshold(f32)
    optimizer, times = Adam(lr=1e-3), {}

    def part(name, start):
        cpu, wall = time.process_time(), time.perf_counter()
        times.setdefault(name, []).append((cpu - start[0], wall - start[1]))
        return cpu, wall

    def step():
        p = params
        clock = time.process_time(), time.perf_counter()
        X = np.take(p["embedding"], ids, axis=0)                           # (T, B, E)
        W_x, W_h, b = p["W_x"] * half, p["W_h"] * half, p["b"] * half      # the 1/2 folded in
        np.matmul(X.reshape(T * B, E), W_x, out=gates.reshape(4, T * B, H))
        gates.reshape(4, T * B, H)[...] += b
        clock = part("input projection", clock)
        for t in range(T):
            g = gates[:, t]
            np.matmul(a[t], W_h, out=work)
            g += work
            np.tanh(g, out=g)
            sig = g[:3]
            sig *= 0.5
            sig += 0.5
            np.multiply(g[1], c[t], out=c[t + 1])
            np.multiply(g[0], g[3], out=tanh_c[t])
            c[t + 1] += tanh_c[t]
            np.tanh(c[t + 1], out=tanh_c[t])
            np.multiply(g[2], tanh_c[t], out=a[t + 1])
        clock = part("forward loop", clock)
        logits = a[T] @ p["fc"]
        d_logits = ((1 / (1 + np.exp(-logits)) - labels) / B).astype(f32)
        grads = {"fc": a[T].T @ d_logits}
        d_state[0] = d_logits[:, None] * p["fc"]
        d_state[1] = 0
        da, dc = d_state
        W_h_T = np.ascontiguousarray(p["W_h"].transpose(0, 2, 1))
        for t in range(T - 1, -1, -1):
            np.abs(d_state, out=magnitude)
            np.less(magnitude, tiny, out=small)
            np.copyto(d_state, 0, where=small)
            i, f, o, g = gates[:, t]
            dx, tc = dZ[:, t], tanh_c[t]
            np.multiply(tc, tc, out=dx[3])                   # dc += da o (1 - tanh(c)^2)
            np.subtract(1, dx[3], out=dx[3])
            dx[3] *= o
            dx[3] *= da
            dc += dx[3]
            np.multiply(dc, g, out=dx[0])
            np.multiply(dc, c[t], out=dx[1])
            np.multiply(da, tc, out=dx[2])
            np.subtract(1, gates[:3, t], out=work[:3])
            work[:3] *= gates[:3, t]
            dx[:3] *= work[:3]
            np.multiply(g, g, out=dx[3])
            np.subtract(1, dx[3], out=dx[3])
            dx[3] *= i
            dx[3] *= dc
            dc *= f
            np.matmul(dx, W_h_T, out=work)
            np.add(work[0], work[1], out=da)
            da += work[2]
            da += work[3]
        clock = part("backward loop", clock)
        dG = dZ.reshape(4, T * B, H)
        grads["W_x"] = np.matmul(X.reshape(T * B, E).T, dG)
        grads["W_h"] = np.matmul(a[:T].reshape(T * B, H).T, dG)
        grads["b"] = dG.sum(1, keepdims=True)
        dX = np.matmul(dG, p["W_x"].transpose(0, 2, 1))
        dX = (dX[0] + dX[1] + dX[2] + dX[3]).reshape(T, B, E)
        clock = part("products after the loop", clock)
        grads["embedding"] = embedding_backward(dX, ids, p["embedding"].shape)
        clock = part("embedding gradient", clock)
        optimizer.step(p, grads)
        part("Adam step", clock)

    return step, times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=parse_shape, default=parse_shape("32x200x100x128"))
    ap.add_argument("--repeats", type=positive, default=7)
    args = ap.parse_args(argv)
    for B, T, E, H in args.shape:
        step, times = lean_step(B, T, E, H)
        step()
        times.clear()
        totals = []
        for _ in range(args.repeats):
            cpu, wall = time.process_time(), time.perf_counter()
            step()
            totals.append((time.process_time() - cpu, time.perf_counter() - wall))
        floor, _ = gemm_floor(4, B, T, E, H, clock=time.process_time)
        print(f"lean lstm {B}x{T}x{E}x{H}, one BLAS thread, median of {args.repeats} steps: CPU ms, wall ms")
        for name, values in {"whole step": totals, **times}.items():
            cpu, wall = np.median(np.array(values), axis=0)
            extra = f"   {1e6 * cpu / T:6.1f} us a step" if name in ("forward loop", "backward loop") else ""
            print(f"  {name:34} {1e3 * cpu:8.2f} {1e3 * wall:8.2f}{extra}")
        print(f"  {'GEMM floor (training)':34} {1e3 * floor:8.2f}          "
              f"whole step / floor = {np.median([c for c, _ in totals]) / floor:.2f} (CPU times)")


if __name__ == "__main__":
    main()
