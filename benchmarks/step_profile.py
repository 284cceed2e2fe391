#!/usr/bin/env python
"""Where one training step's time goes: one worker's share of a batch, part by part, in one process.

With --workers N (default 2) a worker computes the gradient of ceil(B / N) rows on one BLAS thread,
and the main process adds the shares and takes the Adam step. This script runs those parts in
this process, one after the other, and reports each part's median over --repeats steps as CPU time
(time.process_time: what the part itself costs, hardly changed by other processes sharing the
cores) and wall time (time.perf_counter), beside the GEMM floor of the share's matrix products
(benchmarks/speed.py: the same products timed alone, here in CPU time). It measures; it asserts nothing.

    python benchmarks/step_profile.py                   # lstm, 64x200x100x128, 2 workers
    python benchmarks/step_profile.py --cells lstm,gru --shape 128x400x128x256 --repeats 5

Parts: the worker's forward (input projection and loop; the cell's step calls alone), backward
(loop; step calls alone; the weight-gradient products after the loop), embedding lookup and
gradient, the rest of share_loss (sorting, dense layer, loss), inference of the share (forward
without caches); the main process's sum of N shares' gradients and Adam step.
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
import rnn.cells  # noqa: E402
import rnn.model  # noqa: E402
import rnn.recurrent  # noqa: E402
from rnn.layers import SparseRows  # noqa: E402
from rnn.model import ModelConfig, SentimentModel  # noqa: E402
from rnn.optim import Adam  # noqa: E402
from rnn.parallel import sum_sparse_rows  # noqa: E402
from speed import gemm_floor, parse_cells, parse_shape, positive  # noqa: E402


class Timers:
    """Accumulates (cpu, wall) seconds per name over one step; `wrap` times a function."""

    def __init__(self):
        self.step: dict[str, list[float]] = {}
        self.runs: dict[str, list[tuple[float, float]]] = {}
        self.inner = True         # whether the parts inside a measured call are recorded

    def wrap(self, name: str, fn, inner: bool = True):
        def timed(*args, **kwargs):
            if inner and not self.inner:
                return fn(*args, **kwargs)
            c, w = time.process_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc = self.step.setdefault(name, [0.0, 0.0])
                acc[0] += time.process_time() - c
                acc[1] += time.perf_counter() - w
        return timed

    def measure(self, name: str, fn, inner: bool = True):
        """Run fn() and record its time; the parts it calls are recorded only with `inner`."""
        self.inner = inner
        try:
            return self.wrap(name, fn, inner=False)()
        finally:
            self.inner = True

    def end_step(self) -> None:
        for name, (c, w) in self.step.items():
            self.runs.setdefault(name, []).append((c, w))
        self.step = {}

    def medians(self) -> dict[str, tuple[float, float]]:
        return {k: tuple(np.median(np.array(v), axis=0)) for k, v in self.runs.items()}


def instrument(timers: Timers, kind: str) -> None:
    """Time the parts where they are called from (module attributes replaced in place)."""
    cell = rnn.cells.CELLS[kind]
    rnn.cells.CELLS[kind] = cell._replace(step_forward=timers.wrap("  step calls (forward)", cell.step_forward),
                                          step_backward=timers.wrap("  step calls (backward)", cell.step_backward))
    rnn.recurrent.recurrent_weight_grads = timers.wrap(
        "  dW_h product after the loop", rnn.recurrent.recurrent_weight_grads)
    for name, label in (("sequence_forward", "forward (projection + loop)"),
                        ("sequence_backward", "backward (loop + products)"),
                        ("embedding_forward", "embedding lookup"),
                        ("embedding_backward", "embedding gradient")):
        setattr(rnn.model, name, timers.wrap(label, getattr(rnn.model, name)))


def profile(kind: str, cell: str, shape: tuple, workers: int, repeats: int) -> None:
    B, T, E, H = shape
    share = -(-B // workers)
    rng = np.random.default_rng(0)
    config = ModelConfig(vocab_size=20_000, cell=cell, embed_dim=E, hidden_size=H, reset_after=True)
    model = SentimentModel.create(config, rng)
    ids = rng.integers(1, 20_000, (B, T))
    lengths, labels = np.full(B, T), rng.integers(0, 2, B).astype(np.float32)
    parts = [np.arange(w * share, min(B, (w + 1) * share)) for w in range(workers)]
    optimizer, timers = Adam(lr=1e-3), Timers()
    instrument(timers, kind)
    for repeat in range(repeats + 1):
        rows = parts[0]
        _, grads, _, _ = timers.measure("worker: share_loss", lambda: model.loss(ids[rows], lengths[rows], labels[rows]))
        timers.measure("worker: inference of the share", lambda: model.logits(ids[rows], lengths[rows]),
                       inner=False)
        timers.inner = False                  # the other workers' shares, for the main process's sum
        shares = [grads, *(model.loss(ids[r], lengths[r], labels[r])[1] for r in parts[1:])]
        timers.inner = True

        def add_shares():
            total = {}
            for name, g in grads.items():
                if isinstance(g, SparseRows):
                    total[name] = sum_sparse_rows([s[name] for s in shares])
                else:
                    total[name] = g.copy()
                    for s in shares[1:]:
                        total[name] += s[name]
            return total

        total = timers.measure("main: add the shares", add_shares)
        timers.measure("main: Adam step", lambda: optimizer.step(model.params, total))
        if repeat:
            timers.end_step()
        else:
            timers.step = {}
    floor_train, floor_infer = gemm_floor({"rnn": 1, "gru": 3, "gru_after": 3, "lstm": 4}[kind], share, T, E, H,
                                          clock=time.process_time)
    print(f"{cell} {B}x{T}x{E}x{H}, share of {share} rows on one core ({workers} workers), "
          f"median of {repeats} steps: CPU ms, wall ms")
    per_share = timers.medians()
    for name in ("worker: share_loss", "forward (projection + loop)", "  step calls (forward)",
                 "backward (loop + products)", "  step calls (backward)", "  dW_h product after the loop",
                 "embedding lookup", "embedding gradient", "worker: inference of the share",
                 "main: add the shares", "main: Adam step"):
        if name in per_share:
            c, w = per_share[name]
            extra = f"   {1e6 * c / T:6.1f} us a step" if "step calls" in name else ""
            print(f"  {name:34} {1e3 * c:8.2f} {1e3 * w:8.2f}{extra}")
    c_loss = per_share["worker: share_loss"][0]
    print(f"  {'GEMM floor of the share (training)':34} {1e3 * floor_train:8.2f}          "
          f"share_loss / floor = {c_loss / floor_train:.2f} (CPU times)")
    print(f"  {'GEMM floor of the share (inference)':34} {1e3 * floor_infer:8.2f}          "
          f"inference / floor = {per_share['worker: inference of the share'][0] / floor_infer:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=parse_shape, default=parse_shape("default"))
    ap.add_argument("--cells", type=parse_cells, default=["lstm"])
    ap.add_argument("--workers", type=positive, default=2)
    ap.add_argument("--repeats", type=positive, default=7)
    args = ap.parse_args(argv)
    for shape in args.shape:
        for cell in args.cells:
            kind = "gru_after" if cell == "gru" else cell
            profile(kind, cell, shape, args.workers, args.repeats)


if __name__ == "__main__":
    main()
