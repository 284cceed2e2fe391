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

NAMES = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM", "baseline": "NBSVM"}
PUBLISHED = ("Published for NBSVM with uni- and bigrams on this test set: 91.22 % (Wang & Manning, 2012), "
             "91.2-91.6 % in later re-runs (Mesnil et al., 2015).")
COLUMNS = ("model", "seeds", "test_accuracy", "test_accuracy_sd", "ci95_low", "ci95_high", "ensemble_accuracy",
           "best_val_accuracy", "test_f1", "test_auc", "epochs", "train_seconds", "parameters", "lm_val_perplexity")


def read_predictions(path: Path, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int, probabilities (N,) float) of a predictions file."""
    arrays = outputs.load_arrays(path, stage, ("labels", "probabilities"))
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


def correct_matrix(named: dict[str, list[tuple[np.ndarray, np.ndarray]]], threshold: float) -> tuple[dict, np.ndarray]:
    """{model: (S, N) bool, review right per replicate}, and the labels they share (one-line error if not)."""
    labels, correct = None, {}
    for model, predictions in named.items():
        for y, _ in predictions:
            if labels is None:
                labels = y
            elif not np.array_equal(y, labels):
                raise InputError(f"data/predictions: {model}'s test labels differ from the others' "
                                 "(not the same test split: rerun evaluate and baseline)")
        correct[model] = np.stack([(p >= threshold) == (y == 1) for y, p in predictions])
    return correct, labels


def interval_json(interval: stats.Interval, seeds: list[int]) -> dict:
    nan_to_none = lambda v: None if v != v else v        # noqa: E731 - JSON has no NaN
    return {"mean": interval.mean, "sd": nan_to_none(interval.sd),
            "ci95": [interval.low, interval.high], "seeds": list(seeds)}


def summarize(cells: dict[str, dict], baseline: dict, seeds: list[int], cfg: dict, threshold: float) -> dict:
    """summary.json: per cell and for the baseline the test accuracy over seeds with its interval,
    the seeds' ensemble, and for each pair the paired-bootstrap difference and McNemar's test."""
    predictions = {cell: [r["predictions"] for r in c["runs"]] for cell, c in cells.items()}
    predictions["baseline"] = [baseline["predictions"]]
    correct, labels = correct_matrix(predictions, threshold)
    ensemble_right = {m: (stats.ensemble(np.stack([p for _, p in ps])) >= threshold) == (labels == 1)
                      for m, ps in predictions.items()}
    rng = np.random.default_rng(cfg["seed"])
    out = {"cells": {}, "pairs": {}, "threshold": threshold, "test_reviews": int(len(labels))}
    for cell, c in cells.items():
        runs = c["runs"]
        out["cells"][cell] = {
            "test_accuracy": interval_json(stats.mean_interval([r["eval"]["accuracy"] for r in runs]), seeds),
            "val_accuracy": interval_json(stats.mean_interval([r["train"]["best_val_accuracy"] for r in runs]), seeds),
            "ensemble_accuracy": float(ensemble_right[cell].mean()),
            "test_f1": float(np.mean([r["eval"]["f1"] for r in runs])),
            "test_auc": float(np.mean([r["eval"]["roc_auc"] or np.nan for r in runs])),
            "epochs": float(np.mean([r["train"]["epochs_run"] for r in runs])),
            "train_seconds": float(np.mean([r["train"]["train_seconds"] for r in runs])),
            "parameters": runs[0]["train"]["num_parameters"],
            "lm_val_perplexity": c["pretrain"]["val_perplexity"] if c["pretrain"] else None}
    # The baseline is deterministic: its interval is over the test reviews (a bootstrap), not seeds.
    over_reviews = stats.bootstrap_accuracy(correct["baseline"], rng, cfg["resamples"])
    out["baseline"] = {"test_accuracy": {**interval_json(over_reviews, [baseline["eval"].get("seed", 0)]), "sd": 0.0},
                       "interval_over": "test reviews", "test_f1": baseline["eval"]["f1"],
                       "test_auc": baseline["eval"]["roc_auc"], "train_seconds": baseline["eval"]["train_seconds"]}
    names = list(cells)
    pairs = [(b, a) for i, a in enumerate(names) for b in names[i + 1:]] + [(c, "baseline") for c in names]
    for a, b in pairs:
        d = stats.paired_bootstrap(correct[a], correct[b], rng, cfg["resamples"])
        only_a, only_b, p_mcnemar = stats.mcnemar(ensemble_right[a], ensemble_right[b])
        out["pairs"][f"{a}-{b}"] = {"difference": d.difference, "ci95": [d.low, d.high], "p_value": d.p_value,
                                    "mcnemar": {"only_first_right": only_a, "only_second_right": only_b,
                                                "p_value": p_mcnemar},
                                    "shown": verdict(a, b, d)}
    return out


def verdict(a: str, b: str, d: stats.Difference) -> str:
    """A ranking only where the interval excludes zero."""
    if d.low > 0:
        return f"{NAMES[a]} better"
    if d.high < 0:
        return f"{NAMES[b]} better"
    return "no difference shown"


def points(x: float) -> str:
    return f"{100 * x:+.2f}"


def summary_rows(summary: dict) -> list[dict]:
    rows = []
    for cell, s in summary["cells"].items():
        acc = s["test_accuracy"]
        rows.append({"model": cell, "seeds": len(acc["seeds"]), "test_accuracy": acc["mean"], "test_accuracy_sd": acc["sd"],
                     "ci95_low": acc["ci95"][0], "ci95_high": acc["ci95"][1], "ensemble_accuracy": s["ensemble_accuracy"],
                     "best_val_accuracy": s["val_accuracy"]["mean"], "test_f1": s["test_f1"], "test_auc": s["test_auc"],
                     "epochs": s["epochs"], "train_seconds": s["train_seconds"], "parameters": s["parameters"],
                     "lm_val_perplexity": s["lm_val_perplexity"]})
    b = summary["baseline"]
    rows.append({**dict.fromkeys(COLUMNS), "model": "baseline", "seeds": 1, "test_accuracy": b["test_accuracy"]["mean"],
                 "ci95_low": b["test_accuracy"]["ci95"][0], "ci95_high": b["test_accuracy"]["ci95"][1],
                 "test_f1": b["test_f1"], "test_auc": b["test_auc"], "train_seconds": b["train_seconds"]})
    return rows


def summary_markdown(summary: dict) -> str:
    """The tables as Markdown: accuracy over seeds with intervals, then each pair's difference."""
    def num(v, fmt="{:.4f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = ["# RNN vs GRU vs LSTM on IMDB, and a bag-of-bigrams baseline", "",
             f"Test accuracy on {summary['test_reviews']:,} reviews: mean ± sd over the seeds of each cell with a "
             "95 % Student-t interval over seeds; the seeds' ensemble averages their probabilities. The baseline "
             "is deterministic: its interval is a bootstrap over the test reviews.", "",
             "| model | seeds | test accuracy | 95 % CI | seeds' ensemble | best val accuracy | F1 | AUC | epochs | "
             "training s per seed | LM val perplexity |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary_rows(summary):
        sd = "" if r["test_accuracy_sd"] is None else f" ± {r['test_accuracy_sd']:.4f}"
        lines.append(f"| {NAMES[r['model']]} | {r['seeds']} | {r['test_accuracy']:.4f}{sd} | "
                     f"[{r['ci95_low']:.4f}, {r['ci95_high']:.4f}] | {num(r['ensemble_accuracy'])} | "
                     f"{num(r['best_val_accuracy'])} | {num(r['test_f1'])} | {num(r['test_auc'])} | "
                     f"{num(r['epochs'], '{:.1f}')} | {num(r['train_seconds'], '{:.0f}')} | "
                     f"{num(r['lm_val_perplexity'], '{:.1f}')} |")
    lines += ["", PUBLISHED, "", "## Differences in test accuracy (points)", "",
              "Paired bootstrap over the test reviews and the seeds (the same reviews for both models); McNemar's "
              "exact test on the two seeds' ensembles. A ranking is stated only where the interval excludes 0.", "",
              "| difference | points | 95 % CI | bootstrap p | McNemar p | shown |", "|---|---:|---:|---:|---:|---|"]
    for key, p in summary["pairs"].items():
        a, b = key.split("-")
        lines.append(f"| {NAMES[a]} − {NAMES[b]} | {points(p['difference'])} | [{points(p['ci95'][0])}, "
                     f"{points(p['ci95'][1])}] | {p['p_value']:.3g} | {p['mcnemar']['p_value']:.3g} | {p['shown']} |")
    lines += ["", "![validation accuracy per epoch](val_accuracy.png)", "",
              "![gradient norm vs distance from the last token](grad_trace.png)", ""]
    return "\n".join(lines)


def spread(series: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, low, high) over replicates' (x, y) curves, at the x values all of them reach."""
    common = sorted(set.intersection(*(set(np.asarray(x).tolist()) for x, _ in series)))
    ys = np.array([[dict(zip(np.asarray(x).tolist(), y))[v] for v in common] for x, y in series], dtype=np.float64)
    return np.array(common), ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def figures(cells: dict[str, dict]) -> tuple:
    histories, traces = {}, {}
    for cell, c in cells.items():
        x, mean, lo, hi = spread([([int(r["epoch"]) for r in run["history"]],
                                   [float(r["val_accuracy"]) for r in run["history"]]) for run in c["runs"]])
        histories[cell] = (x, mean, lo, hi)
        states = c["runs"][0]["trace"]
        traces[cell] = {s: spread([run["trace"][s] for run in c["runs"]]) for s in states}
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
        out.write_json("reports/summary.json", summary)
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
