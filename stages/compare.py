"""Stage `compare`: the cells' replicates and the baseline side by side, and what is known of them.

    python -m stages.compare

Reads, for each cell in `train.cells` and seed in `train.seeds`, metrics/<cell>/seed<k>/{train,eval}.json,
plots/<cell>/seed<k>/{history,grad_trace}.csv and data/predictions/<cell>/seed<k>.npz, the language
model's metrics/<cell>/pretrain.json when there is one, and the baseline's metrics/baseline/eval.json
and data/predictions/baseline.npz. Writes reports/summary.{md,csv,json}, reports/val_accuracy.png and
reports/grad_trace.png (mean over seeds with the seeds' range). The statistics are rnn/stats.py's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rnn import stats
from rnn.errors import InputError
from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage
from stages.plots import curves_figure, grad_trace_figure
from stages.summary import COLUMNS, NAMES, points, summary_markdown, summary_rows


def read_predictions(path: Path, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int, probabilities (N,) float) of a predictions file."""
    arrays = outputs.read_npz(path, stage, ("labels", "probabilities"))
    if arrays["labels"].shape != arrays["probabilities"].shape or arrays["labels"].ndim != 1:
        raise InputError(f"{path}: labels and probabilities must be two arrays of one length")
    return arrays["labels"].astype(np.int64), arrays["probabilities"].astype(np.float64)


def read_cell(root: Path, cell: str, seeds: list[int]) -> dict:
    """A cell's replicates: per-seed metrics, histories, traces and test probabilities (S, N)."""
    runs = []
    for seed in seeds:
        name, stage = settings.replicate_name(cell, seed), f"train@{cell}-{seed}"
        trace = outputs.read_csv(root / "plots" / name / "grad_trace.csv", stage, outputs.TRACE_COLUMNS)
        runs.append({"train": outputs.read_json(root / "metrics" / name / "train.json", stage),
                     "eval": outputs.read_json(root / "metrics" / name / "eval.json", f"evaluate@{cell}-{seed}"),
                     "history": outputs.read_csv(root / "plots" / name / "history.csv", stage, ["epoch", "val_accuracy"]),
                     "trace": outputs.trace_series(trace, outputs.last_epoch(trace)),
                     "predictions": read_predictions(root / "data/predictions" / f"{name}.npz", f"evaluate@{cell}-{seed}")})
    lm = root / "metrics" / cell / "pretrain.json"
    return {"runs": runs, "pretrain": outputs.read_json(lm, f"pretrain@{cell}") if lm.is_file() else None}


def interval_json(interval: stats.Interval, seeds: list[int]) -> dict:
    return {"mean": interval.mean, "sd": None if np.isnan(interval.sd) else interval.sd,   # JSON has no NaN
            "ci95": [interval.low, interval.high], "seeds": list(seeds)}


def summarize(cells: dict[str, dict], baseline: dict, seeds: list[int], cfg: dict, threshold: float) -> dict:
    """summary.json: per cell and for the baseline the test accuracy over seeds with its interval,
    the seeds' ensemble, and for each pair the paired-bootstrap difference and McNemar's test."""
    labels = baseline["predictions"][0]
    probabilities = {"baseline": baseline["predictions"][1][None]}
    for cell, c in cells.items():
        for (y, _), seed in zip((r["predictions"] for r in c["runs"]), seeds):
            if not np.array_equal(y, labels):
                raise InputError(f"data/predictions/{settings.replicate_name(cell, seed)}.npz: {cell}'s test labels "
                                 "differ from the baseline's (another test split: rerun evaluate and baseline)")
        probabilities[cell] = np.stack([r["predictions"][1] for r in c["runs"]])
    rng = np.random.default_rng(cfg["seed"])
    out = {"cells": {}, "pairs": {}, "threshold": threshold, "test_reviews": int(len(labels))}
    for cell, c in cells.items():
        runs = c["runs"]
        mean = lambda key, stage="train": float(np.mean([r[stage][key] for r in runs]))  # noqa: E731
        auc = None if any(r["eval"]["roc_auc"] is None for r in runs) else mean("roc_auc", "eval")
        out["cells"][cell] = {
            "test_accuracy": interval_json(stats.mean_interval([r["eval"]["accuracy"] for r in runs]), seeds),
            "val_accuracy": interval_json(stats.mean_interval([r["train"]["best_val_accuracy"] for r in runs]), seeds),
            "ensemble_accuracy": float(stats.correct_predictions(labels, stats.ensemble(probabilities[cell]), threshold).mean()),
            "test_f1": mean("f1", "eval"), "test_auc": auc, "epochs": mean("epochs_run"),
            "train_seconds": mean("train_seconds"), "parameters": runs[0]["train"]["num_parameters"],
            "lm_val_perplexity": c["pretrain"]["val_perplexity"] if c["pretrain"] else None}
    # The baseline is deterministic (sd 0 over seeds): its interval is a bootstrap over the test reviews.
    over_reviews = stats.bootstrap_accuracy(stats.correct_predictions(labels, probabilities["baseline"], threshold),
                                            rng, cfg["resamples"])
    out["baseline"] = {"test_accuracy": {**interval_json(over_reviews, [0]), "sd": 0.0}, "interval_over": "test reviews",
                       **{k: baseline["eval"][m] for k, m in (("test_f1", "f1"), ("test_auc", "roc_auc"),
                                                              ("train_seconds", "train_seconds"))}}
    names = list(cells)
    pairs = [(b, a) for i, a in enumerate(names) for b in names[i + 1:]] + [(c, "baseline") for c in names]
    for (a, b), (d, (only_a, only_b, p)) in stats.compare_models(probabilities, labels, pairs, rng,
                                                                 cfg["resamples"], threshold).items():
        out["pairs"][f"{a}-{b}"] = {"difference": d.difference, "ci95": [d.low, d.high], "p_value": d.p_value,
                                    "mcnemar": {"only_first_right": only_a, "only_second_right": only_b, "p_value": p},
                                    "shown": verdict(a, b, d)}
    return out


def verdict(a: str, b: str, d: stats.Difference) -> str:
    """A ranking only where the interval excludes zero."""
    if d.low > 0:
        return f"{NAMES[a]} better"
    if d.high < 0:
        return f"{NAMES[b]} better"
    return "no difference shown"


def figures(cells: dict[str, dict]) -> tuple:
    histories, traces = {}, {}
    for cell, c in cells.items():
        x, mean, lo, hi = stats.replicate_band([([int(r["epoch"]) for r in run["history"]],
                                   [float(r["val_accuracy"]) for r in run["history"]]) for run in c["runs"]])
        histories[cell] = (x, mean, lo, hi)
        states = c["runs"][0]["trace"]
        traces[cell] = {s: stats.replicate_band([run["trace"][s] for run in c["runs"]]) for s in states}
    n = len(next(iter(cells.values()))["runs"]) if cells else 0
    band = f"mean over {n} seeds, band: their range" if n > 1 else "one seed"
    return (curves_figure(histories, "epoch", "validation accuracy", f"Validation accuracy per epoch ({band})"),
            grad_trace_figure(traces, f"Gradient norm vs distance from the last token, last epoch ({band})"))


def main() -> None:
    root = project_root()
    params = settings.load(root / "params.yaml")
    seeds = params["train"]["seeds"]
    cells = {cell: read_cell(root, cell, seeds) for cell in params["train"]["cells"]}
    baseline = {"eval": outputs.read_json(root / "metrics/baseline/eval.json", "baseline"),
                "predictions": read_predictions(root / "data/predictions/baseline.npz", "baseline")}
    summary = summarize(cells, baseline, seeds, params["compare"], params["evaluate"]["threshold"])
    val_figure, trace_figure = figures(cells)
    with Outputs(root) as out:
        out.write_text("reports/summary.csv", outputs.csv_text(COLUMNS, ([r[c] for c in COLUMNS] for r in summary_rows(summary))))
        out.write_metrics("reports/summary.json", summary)
        out.write_text("reports/summary.md", summary_markdown(summary))
        out.save_figure("reports/val_accuracy.png", val_figure)
        out.save_figure("reports/grad_trace.png", trace_figure)
    for cell, s in summary["cells"].items():
        acc = s["test_accuracy"]
        print(f"{cell}: test accuracy {acc['mean']:.4f} 95% CI [{acc['ci95'][0]:.4f}, {acc['ci95'][1]:.4f}] "
              f"over seeds {acc['seeds']}, ensemble {s['ensemble_accuracy']:.4f}")
    for key, p in summary["pairs"].items():
        print(f"{key}: {points(p['difference'])} points, 95% CI [{points(p['ci95'][0])}, {points(p['ci95'][1])}]: {p['shown']}")


if __name__ == "__main__":
    run_stage(main)
