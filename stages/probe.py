"""Stage `probe@<cell>`: how far back can the cell remember? And `probe_report`: plot all cells.

    python stages/probe.py <rnn|gru|lstm>   # train at every probe.distances, write its results
    python stages/probe.py report           # reports/probe_accuracy.png, reports/probe_gradients.png

For each distance d the cell is trained from scratch for a fixed budget of optimizer steps on fresh
batches of the synthetic task in rnn/probe.py (sequences of d + 1 + lead tokens), then scored on a
seeded test set, shared by all cells, whose decisive token sits exactly d steps before the end.
With train_distance "upto" the training batches draw each row's distance from 0..d: the short ones
teach what matters, the long ones whether the cell can hold it. ("exact" trains at d only: with the
default 300 steps no cell, gated or not, learned d = 50 that way.)

The per-timestep gradient norms dL/da<t> (and dL/dc<t> for the LSTM), by distance from the end, are
averaged over the first and over the last `trace_steps` steps: at initialisation and once trained.
`grad_ratio_*` is that norm on the memory state d steps back relative to the one on the final output:
how much of the error signal reaches the token the label depends on.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import time
from pathlib import Path

# Matrices of 64 x 32 are too small for BLAS threads to pay off: on the shared 2-core machine an LSTM
# training step took 0.26 ms per time step with one OpenBLAS thread and 1.5-1.9 ms with two.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from rnn.model import ModelConfig, SentimentModel  # noqa: E402
from rnn.optim import CLIP_MODES, OPTIMIZERS, clip_gradients, make_optimizer  # noqa: E402
from rnn.probe import VARIANTS, make_probe_data  # noqa: E402
from rnn.train import evaluate  # noqa: E402
from stages.common import (  # noqa: E402
    Field,
    ParamsError,
    atomic_path,
    load_params,
    project_root,
    run_stage,
    validate_section,
    write_json,
)

CELL_NAMES = ("rnn", "gru", "lstm")
SCHEMA = {
    "cells": Field(list, ["rnn", "gru", "lstm"]),
    "distances": Field(list, [5, 10, 25, 50, 100, 200]),
    "lead": Field(int, 20, min=0),
    "train_distance": Field(str, "upto", choices=("exact", "upto")),
    "variant": Field(str, "signal", choices=VARIANTS),
    "distractors": Field(int, 0, min=0),
    "vocab_size": Field(int, 20, min=7),
    "embed_dim": Field(int, 16, min=1),
    "hidden_size": Field(int, 32, min=1),
    "batch_size": Field(int, 64, min=1),
    "steps": Field(int, 300, min=1),
    "test_size": Field(int, 1000, min=2),
    "optimizer": Field(str, "adam", choices=OPTIMIZERS),
    "lr": Field(float, 0.01, min=0, min_exclusive=True),
    "clip_mode": Field(str, "norm", choices=CLIP_MODES),
    "clip_threshold": Field(float, 1.0, min=0, min_exclusive=True),
    "trace_steps": Field(int, 20, min=1),
    "seed": Field(int, 0),
}
# Per-distance figures in the metrics file (seconds last: it is not logged as a metric).
SCALARS = ("accuracy", "grad_ratio_first", "grad_ratio_last", "final_loss", "clipped_fraction", "seconds")


def load_config(params: dict) -> dict:
    """The validated probe section; list entries and cross-key constraints checked too."""
    cfg = validate_section(params, "probe", SCHEMA)
    source = getattr(params, "source", "params.yaml")
    for cell in cfg["cells"]:
        if cell not in CELL_NAMES:
            raise ParamsError(f"{source}: probe.cells: {cell!r} is not one of {', '.join(CELL_NAMES)}")
    d = cfg["distances"]
    if not d or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in d) or len(set(d)) < len(d):
        raise ParamsError(f"{source}: probe.distances = {d!r}: must be distinct integers >= 0")
    cfg["distances"] = sorted(d)
    earlier = cfg["distractors"] if cfg["variant"] == "signal" else 1
    if cfg["lead"] < earlier:
        raise ParamsError(f"{source}: probe.lead = {cfg['lead']}: must be >= {earlier}, the tokens "
                          f"placed before the decisive one (variant {cfg['variant']}, "
                          f"distractors {cfg['distractors']})")
    if cfg["trace_steps"] > cfg["steps"]:
        raise ParamsError(f"{source}: probe.trace_steps = {cfg['trace_steps']}: must be <= probe.steps")
    return cfg


def probe_distance(cell: str, d: int, cfg: dict) -> dict:
    """Train a fresh `cell` model at distance d; return test accuracy, traces and training figures.

    Three independent streams from (seed, d): the initial weights, the training batches and the test
    set, so every cell sees the same data at a given d. traces: {"first"|"last": {"a"[, "c"]: (T,)
    mean gradient norm by distance from the end over the first/last trace_steps steps}}.
    """
    T = d + 1 + cfg["lead"]
    init_rng, data_rng, test_rng = (np.random.default_rng([cfg["seed"], d, k]) for k in range(3))
    config = ModelConfig(vocab_size=cfg["vocab_size"], cell=cell, embed_dim=cfg["embed_dim"],
                         hidden_size=cfg["hidden_size"])
    model = SentimentModel.create(config, init_rng)
    optimizer = make_optimizer(cfg["optimizer"], cfg["lr"])
    n, steps = cfg["trace_steps"], cfg["steps"]
    sums: dict = {"first": {}, "last": {}}
    losses, clipped = [], 0
    for step in range(steps):
        dist = d if cfg["train_distance"] == "exact" else data_rng.integers(0, d + 1, cfg["batch_size"])
        batch = make_probe_data(cfg["batch_size"], T, dist, cfg["variant"], cfg["vocab_size"], data_rng,
                                cfg["distractors"])
        windows = [w for w, inside in (("first", step < n), ("last", step >= steps - n)) if inside]
        loss, grads, _, traces = model.loss(batch.ids, batch.lengths, batch.labels, trace=bool(windows))
        pre, _, was_clipped = clip_gradients(grads, cfg["clip_mode"], cfg["clip_threshold"])
        if not (np.isfinite(loss) and np.isfinite(pre)):
            raise ValueError(f"probe {cell}, distance {d}, step {step + 1}: loss {loss}, gradient norm "
                             f"{pre}; lower probe.lr or set probe.clip_mode")
        optimizer.step(model.params, grads)
        clipped += was_clipped
        if step >= steps - n:
            losses.append(loss)
        for w in windows:
            for name, (s, c) in traces.items():      # every row has length T: counts are all equal
                sums[w][name] = sums[w].get(name, 0) + s / c
    test = make_probe_data(cfg["test_size"], T, d, cfg["variant"], cfg["vocab_size"], test_rng,
                           cfg["distractors"])
    traces = {w: {name: s / n for name, s in by_name.items()} for w, by_name in sums.items()}
    return {"accuracy": evaluate(model, test)["accuracy"],
            "grad_ratio_first": grad_ratio(traces["first"], d),
            "grad_ratio_last": grad_ratio(traces["last"], d),
            "final_loss": float(np.mean(losses)),
            "clipped_fraction": clipped / steps,
            "traces": traces}


def grad_ratio(trace: dict[str, np.ndarray], d: int) -> float:
    """Gradient norm on the memory state d steps back, relative to the one on the final output.

    The memory is a for the RNN and GRU, c for the LSTM (its c receives no gradient at the last
    step itself, hence the shared denominator a[0]).
    """
    reached = trace["c"][d] if "c" in trace else trace["a"][d]
    return float(reached / trace["a"][0]) if trace["a"][0] > 0 else 0.0


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def run(cell: str, cfg: dict, root: Path, tracker=None) -> dict:
    """Probe `cell` at every distance; write metrics/probe/<cell>.json and plots/probe/<cell>*.csv.

    The trace file holds the run at the largest distance, the one whose trace spans the most steps.
    """
    start = time.perf_counter()
    results = {}
    for d in cfg["distances"]:
        t0 = time.perf_counter()
        results[d] = probe_distance(cell, d, cfg)
        results[d]["seconds"] = time.perf_counter() - t0
        r = results[d]
        print(f"probe {cell}: distance {d:4d}  accuracy {r['accuracy']:.3f}  grad ratio "
              f"{r['grad_ratio_first']:.1e} -> {r['grad_ratio_last']:.1e}  ({r['seconds']:.1f} s)", flush=True)
        if tracker is not None:
            tracker.log_metrics({f"probe_{k}": r[k] for k in SCALARS[:-1]}, step=d)
    settings = {k: v for k, v in cfg.items() if k != "cells"}
    metrics = {"cell": cell,
               **{key: {str(d): r[key] for d, r in results.items()}
                  for key in SCALARS},
               "settings": settings, "total_seconds": time.perf_counter() - start}
    write_json(root / f"metrics/probe/{cell}.json", metrics)
    write_csv(root / f"plots/probe/{cell}.csv", ["distance", "accuracy", "grad_ratio_first", "grad_ratio_last"],
              [[d, r["accuracy"], r["grad_ratio_first"], r["grad_ratio_last"]] for d, r in results.items()])
    traces = results[cfg["distances"][-1]]["traces"]
    columns = [(w, name) for w in traces for name in sorted(traces[w])]     # a, and c for the LSTM
    write_csv(root / f"plots/probe/{cell}_trace.csv", ["steps_from_end", *(f"{n}_{w}" for w, n in columns)],
              [[t, *(float(traces[w][n][t]) for w, n in columns)] for t in range(len(traces["first"]["a"]))])
    if tracker is not None:
        for path in (f"metrics/probe/{cell}.json", f"plots/probe/{cell}.csv", f"plots/probe/{cell}_trace.csv"):
            tracker.log_artifact(root / path)
    return metrics


def read_csv(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the probe stage for this cell first)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return {name: np.array([float(r[i]) for r in rows[1:]]) for i, name in enumerate(rows[0])}


def report(cells: list[str], root: Path) -> list[Path]:
    """Accuracy vs distance and gradient norm vs distance from the end, one line per cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = [root / "reports/probe_accuracy.png", root / "reports/probe_gradients.png"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for cell in cells:
        data = read_csv(root / f"plots/probe/{cell}.csv")
        ax.plot(data["distance"], data["accuracy"], marker="o", label=cell)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="distance of the decisive token from the end (steps)", ylabel="test accuracy",
           ylim=(0.4, 1.02), title="Memory probe: accuracy vs distance")
    ax.legend()
    _save(fig, out[0])

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, window in zip(axes, ("first", "last")):
        for cell in cells:
            data = read_csv(root / f"plots/probe/{cell}_trace.csv")
            # Zeros (gradients flushed to zero far back) cannot be drawn on a log scale.
            line, = ax.plot(data["steps_from_end"], _positive(data[f"a_{window}"]), label=f"{cell}: dL/da")
            if f"c_{window}" in data:
                ax.plot(data["steps_from_end"], _positive(data[f"c_{window}"]), color=line.get_color(),
                        linestyle="--", label=f"{cell}: dL/dc")
        ax.set(yscale="log", xlabel="steps from the end", title=f"{window} training steps")
    axes[0].set_ylabel("mean gradient norm")
    axes[0].legend()
    fig.suptitle("Gradient reaching each step back (run at the largest distance)")
    _save(fig, out[1])
    return out


def _positive(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, values, np.nan)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def start_tracker(params: dict, cell: str):
    """The MLflow run of probe@<cell> (stages/tracking.py; a no-op tracker when mlflow.enabled is
    false), or a context yielding None when that module is absent."""
    try:
        from stages.tracking import Tracker
    except ImportError:
        return contextlib.nullcontext()
    return Tracker.start(params, cell, f"probe@{cell}")


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in (*CELL_NAMES, "report"):
        raise ValueError(f"usage: python stages/probe.py <{'|'.join(CELL_NAMES)}|report>")
    root = project_root()
    params = load_params(root / "params.yaml")
    cfg = load_config(params)
    if sys.argv[1] == "report":
        for path in report(cfg["cells"], root):
            print(f"wrote {path}")
        return
    cell = sys.argv[1]
    with start_tracker(params, cell) as tracker:
        if tracker is not None:
            tracker.log_params({f"probe.{k}": v for k, v in cfg.items() if k != "cells"})
        metrics = run(cell, cfg, root, tracker)
    print(f"probe {cell}: {metrics['total_seconds']:.1f} s")


if __name__ == "__main__":
    run_stage(main)
