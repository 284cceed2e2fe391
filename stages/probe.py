"""Stage `probe@<cell>`: how far back can the cell remember? (`probe_report` plots all cells.)

    python -m stages.probe <rnn|gru|lstm>   # train at every probe.distances, write probe/<cell>*

For each distance d the cell is trained from scratch (rnn.probe.train_probe) for a fixed budget of
optimizer steps on fresh batches of the synthetic task (sequences of d + 1 + lead tokens), then
scored on a seeded test set, shared by all cells, whose decisive token sits exactly d steps before
the end.
With train_distance "upto" the training batches draw each row's distance from 0..d: the short ones
teach what matters, the long ones whether the cell can hold it. ("exact" trains at d only: with the
default 300 steps no cell, gated or not, learned d = 50 that way.)

The per-timestep gradient norms dL/da<t> (and dL/dc<t> for the LSTM), by distance from the end, are
averaged over the first and over the last `trace_steps` steps: at initialisation and once trained.
`grad_ratio_*` is that norm on the memory state d steps back relative to the one on the final output:
how much of the error signal reaches the token the label depends on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path

from rnn.errors import InputError
from rnn.probe import ProbeConfig, train_probe
from rnn.train import TrainingDiverged
from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage

# Per-distance figures in the metrics file (seconds last: it is not logged as a metric).
SCALARS = ("accuracy", "grad_ratio_first", "grad_ratio_last", "final_loss", "clipped_fraction", "seconds")


def probe_distance(cell: str, d: int, cfg: dict) -> dict:
    """rnn.probe.train_probe for `cell` at distance d with the probe settings `cfg`."""
    config = settings.model_config(cfg, cell, cfg["vocab_size"])
    try:
        return train_probe(config, d, ProbeConfig(**{f.name: cfg[f.name] for f in fields(ProbeConfig)}))
    except TrainingDiverged as exc:
        raise InputError(f"probe {exc}; lower probe.lr or set probe.clip_mode") from None


def run(cell: str, cfg: dict, root: Path, tracker=None) -> dict:
    """Probe `cell` at every distance; write probe/<cell>.json and probe/<cell>{,_trace}.csv.

    The trace file holds the run at the largest distance, the one whose trace spans the most steps.
    """
    start = time.perf_counter()
    results = {}
    for d in cfg["distances"]:
        t0 = time.perf_counter()
        results[d] = r = probe_distance(cell, d, cfg)
        r["seconds"] = time.perf_counter() - t0
        print(f"probe {cell}: distance {d:4d}  accuracy {r['accuracy']:.3f}  grad ratio "
              f"{r['grad_ratio_first']:.1e} -> {r['grad_ratio_last']:.1e}  ({r['seconds']:.1f} s)", flush=True)
        if tracker is not None:
            tracker.log_metrics({f"probe/{k}": r[k] for k in SCALARS[:-1]}, step=d)    # step = distance
    metrics = {"cell": cell, **{key: {str(d): r[key] for d, r in results.items()} for key in SCALARS},
               "settings": {k: v for k, v in cfg.items() if k != "cells"},
               "total_seconds": time.perf_counter() - start}
    traces = results[cfg["distances"][-1]]["traces"]
    columns = [(w, name) for w in traces for name in sorted(traces[w])]     # a, and c for the LSTM
    names = [f"probe/{cell}.json", f"probe/{cell}.csv", f"probe/{cell}_trace.csv"]
    with Outputs(root) as out:
        out.write_metrics(names[0], metrics)
        out.write_text(names[1], outputs.csv_text(
            ["distance", "accuracy", "grad_ratio_first", "grad_ratio_last"],
            ([d, r["accuracy"], r["grad_ratio_first"], r["grad_ratio_last"]] for d, r in results.items())))
        out.write_text(names[2], outputs.csv_text(
            ["steps_from_end", *(f"{n}_{w}" for w, n in columns)],
            ([t, *(float(traces[w][n][t]) for w, n in columns)] for t in range(len(traces["first"]["a"])))))
    if tracker is not None:
        for w, by_name in traces.items():     # log10 |dL/da| (and dL/dc) with step = steps from the end
            for name, norms in sorted(by_name.items()):
                tracker.log_series(f"probe/log10_dL_d{name}_{w}_steps", [float(v) for v in norms])
        for name in names:
            tracker.log_artifact(root / name)
    return metrics


def main() -> None:
    cell = settings.cell_argument(sys.argv)
    root = project_root()
    params = settings.load(root / "params.yaml")
    cfg = params["probe"]

    from stages.tracking import Tracker

    with Tracker.start(params, cell, f"probe@{cell}") as tracker:
        tracker.log_params({f"probe.{k}": v for k, v in cfg.items() if k != "cells"})
        metrics = run(cell, cfg, root, tracker)
    print(f"probe {cell}: {metrics['total_seconds']:.1f} s")


if __name__ == "__main__":
    run_stage(main)
