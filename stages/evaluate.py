"""Stage `evaluate@<cell>`: score the trained model on the held-out test split.

    python stages/evaluate.py <cell>

Writes metrics/<cell>/eval.json and plots/<cell>/{roc.csv, length_buckets.csv, confusion.csv,
roc.png, confusion.png}, and logs them to the MLflow run the train stage opened
(models/<cell>/mlflow_run.json).
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # why: see stages/train.py

import numpy as np  # noqa: E402

from rnn.io import load_arrays, read_model  # noqa: E402
from rnn.metrics import binary_metrics, roc_curve  # noqa: E402
from stages.common import (  # noqa: E402
    Field,
    ParamsError,
    load_params,
    project_root,
    run_stage,
    validate_section,
    write_json,
    write_text,
)
from stages.train import CELL_NAMES  # noqa: E402

SCHEMA = {
    "batch_size": Field(int, 256, min=1),
    "threshold": Field(float, 0.5, min=0, max=1),
    "length_edges": Field(list, [100, 200, 400]),
    "roc_points": Field(int, 200, min=2),
}


def check_edges(edges: list) -> list[int]:
    """`evaluate.length_edges`: strictly increasing positive integers."""
    ok = all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in edges)
    if not ok or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ParamsError(f"params.yaml: evaluate.length_edges = {edges!r}: must be strictly increasing "
                          "positive integers")
    return list(edges)


def length_buckets(lengths: np.ndarray, correct: np.ndarray, edges: list[int]) -> list[dict]:
    """Accuracy by review length: buckets [0, e0), [e0, e1), ..., [e_last, inf); empty ones left out.

    lengths, correct: (N,). Returns rows {bucket, min_length, max_length (exclusive, None = open),
    count, accuracy}.
    """
    bounds = [0, *edges, None]
    rows = []
    for lo, hi in zip(bounds, bounds[1:]):
        inside = (lengths >= lo) & (lengths < hi if hi is not None else True)
        n = int(inside.sum())
        if n == 0:
            continue
        label = f"<{hi}" if lo == 0 else (f">={lo}" if hi is None else f"{lo}-{hi}")
        rows.append({"bucket": label, "min_length": lo, "max_length": hi, "count": n,
                     "accuracy": float(correct[inside].mean())})
    return rows


def to_csv(header: list[str], rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def run(cell: str, cfg: dict, root: Path, tracker) -> dict:
    """Evaluate models/<cell> on the test split, write the outputs, log them; returns eval metrics."""
    t0 = time.perf_counter()
    model, _, _ = read_model(root / "models" / cell)
    test_path = root / "data/prepared/test.npz"
    if not test_path.is_file():
        raise FileNotFoundError(f"{test_path}: not found (run the prepare stage first)")
    test = load_arrays(test_path)
    missing = {"ids", "lengths", "labels"} - set(test)
    if missing:
        raise ValueError(f"{test_path}: missing arrays {', '.join(sorted(missing))}")
    labels = test["labels"].astype(np.int64)
    probs = model.predict_proba(test["ids"], test["lengths"], cfg["batch_size"])
    seconds = time.perf_counter() - t0

    scores = binary_metrics(labels, probs, cfg["threshold"])
    (tn, fp), (fn, tp) = scores.pop("confusion")
    # Length before truncation when prepare recorded it: that is the review's real length.
    length_key = "raw_lengths" if "raw_lengths" in test else "lengths"
    correct = (probs >= cfg["threshold"]) == (labels == 1)
    buckets = length_buckets(test[length_key], correct, cfg["length_edges"])
    metrics = {
        "cell": cell,
        **scores,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "accuracy_by_length": {row["bucket"]: row["accuracy"] for row in buckets},
        "length_source": length_key,
        "seconds": seconds,
    }
    fpr, tpr, thresholds = roc_curve(labels, probs, cfg["roc_points"])

    plots = root / "plots" / cell
    write_json(root / "metrics" / cell / "eval.json", metrics)
    write_text(plots / "roc.csv", to_csv(["fpr", "tpr", "threshold"], zip(fpr, tpr, thresholds)))
    write_text(plots / "length_buckets.csv",
               to_csv(["bucket", "min_length", "max_length", "count", "accuracy"],
                      ([r["bucket"], r["min_length"], "" if r["max_length"] is None else r["max_length"],
                        r["count"], r["accuracy"]] for r in buckets)))
    # One row per review: the layout DVC's confusion template counts.
    predicted = (probs >= cfg["threshold"]).astype(int)
    write_text(plots / "confusion.csv", to_csv(["actual", "predicted"], zip(labels, predicted)))

    from stages.plots import confusion_figure, roc_figure, save_figure

    save_figure(confusion_figure([[tn, fp], [fn, tp]], f"{cell}: test confusion matrix"),
                plots / "confusion.png")
    auc = scores["roc_auc"] if scores["roc_auc"] is not None else float("nan")
    save_figure(roc_figure(fpr, tpr, auc, f"{cell}: test ROC"), plots / "roc.png")

    tracker.log_metrics({f"test_{k}": float(v) for k, v in scores.items()
                         if isinstance(v, (int, float)) and k != "n"})
    for name in ("roc.csv", "length_buckets.csv", "roc.png", "confusion.png"):
        tracker.log_artifact(plots / name, "evaluation")
    tracker.log_artifact(root / "metrics" / cell / "eval.json", "evaluation")
    return metrics


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in CELL_NAMES:
        raise ValueError(f"usage: python stages/evaluate.py <cell>  (cell: {' | '.join(CELL_NAMES)})")
    cell = sys.argv[1]
    root = project_root()
    params = load_params(root / "params.yaml")
    cfg = validate_section(params, "evaluate", SCHEMA)
    check_edges(cfg["length_edges"])

    from stages.tracking import Tracker

    tracker = Tracker.resume(params, root / "models" / cell / "mlflow_run.json", f"evaluate@{cell}")
    try:
        metrics = run(cell, cfg, root, tracker)
    except BaseException:
        tracker.end(status="FAILED")
        raise
    tracker.end()
    print(f"{cell}: test accuracy {metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f}, "
          f"AUC {metrics['roc_auc']}, {metrics['seconds']:.1f}s")


if __name__ == "__main__":
    run_stage(main)
