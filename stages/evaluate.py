"""Stage `evaluate@<cell>`: score the trained model on the held-out test split.

    python -m stages.evaluate <cell> <seed>

Scores the replicate models/<cell>/seed<seed>/. Writes metrics/<cell>/seed<seed>/eval.json,
plots/<cell>/seed<seed>/{roc.csv, length_buckets.csv, confusion.csv, roc.png, confusion.png} and
data/predictions/<cell>/seed<seed>.npz (every test review's label and P(positive), in the order of
data/prepared/test.npz: compare pairs replicates review by review), and logs them to the MLflow
run the train stage opened.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from rnn.io import read_model
from rnn.errors import InputError
from rnn.metrics import binary_metrics, length_buckets, roc_curve
from rnn.parallel import resolve_workers
from rnn.text import encoder_difference
from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage


def main() -> None:
    root = project_root()
    params = settings.load(root / "params.yaml")
    cell, seed = settings.replicate_argument(sys.argv, params)
    replicate = settings.replicate_name(cell, seed)

    from stages.tracking import Tracker

    tracker = Tracker.for_model(params, root / "models" / replicate, f"evaluate@{cell}-{seed}")   # the run that trained it
    try:
        metrics = run(replicate, params["evaluate"], root, tracker, resolve_workers(params["train"]["workers"]))
    except BaseException:
        tracker.end(status="FAILED")
        raise
    tracker.end()
    print(f"{cell} seed {seed}: test accuracy {metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f}, "
          f"AUC {metrics['roc_auc']}, {metrics['seconds']:.1f}s")


def run(replicate: str, cfg: dict, root: Path, tracker, workers: int = 1) -> dict:
    """Evaluate models/<replicate> (`<cell>/seed<seed>`) on the test split (on `workers` processes;
    the scores do not depend on how many), write the outputs, log them; returns eval metrics."""
    t0 = time.perf_counter()
    cell = replicate.split("/")[0]
    model, encoder, _ = read_model(root / "models" / replicate)
    check_model_fits_data(root / "models" / replicate, encoder, root / "data/prepared/vocab.json")
    test = outputs.load_split(root / "data/prepared/test.npz")
    labels = test["labels"].astype(np.int64)
    probs = model.predict_proba(test["ids"], test["lengths"], cfg["batch_size"], workers)
    seconds = time.perf_counter() - t0

    scores = binary_metrics(labels, probs, cfg["threshold"])
    (tn, fp), (fn, tp) = scores.pop("confusion")
    predicted = (probs >= cfg["threshold"]).astype(int)
    # Length before truncation when prepare recorded it: that is the review's real length.
    length_key = "raw_lengths" if "raw_lengths" in test else "lengths"
    buckets = length_buckets(test[length_key], predicted == labels, cfg["length_edges"])
    metrics = {"cell": cell, **scores, "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
               "accuracy_by_length": {row["bucket"]: row["accuracy"] for row in buckets},
               "length_source": length_key, "seconds": seconds}
    fpr, tpr, thresholds = roc_curve(labels, probs, cfg["roc_points"])
    auc = scores["roc_auc"] if scores["roc_auc"] is not None else float("nan")

    plots = f"plots/{replicate}"
    with Outputs(root) as out:
        out.write_metrics(f"metrics/{replicate}/eval.json", metrics)
        out.save_npz(f"data/predictions/{replicate}.npz", labels=labels.astype(np.int8),
                         probabilities=probs.astype(np.float32))
        out.write_text(f"{plots}/roc.csv", outputs.csv_text(["fpr", "tpr", "threshold"], zip(fpr, tpr, thresholds)))
        out.write_text(f"{plots}/length_buckets.csv", outputs.csv_text(
            ["bucket", "min_length", "max_length", "count", "accuracy"],
            ([r["bucket"], r["min_length"], "" if r["max_length"] is None else r["max_length"], r["count"],
              r["accuracy"]] for r in buckets)))
        # One row per review: the layout DVC's confusion template counts.
        out.write_text(f"{plots}/confusion.csv", outputs.csv_text(["actual", "predicted"], zip(labels, predicted)))
        out.save_figure(f"{plots}/confusion.png", confusion_figure([[tn, fp], [fn, tp]], f"{replicate}: test confusion matrix"))
        out.save_figure(f"{plots}/roc.png", roc_figure(fpr, tpr, auc, f"{replicate}: test ROC"))

    tracker.log_datasets(root, {"test": len(labels)})
    tracker.log_test_metrics(scores, buckets)
    for name in ("roc.csv", "length_buckets.csv", "roc.png", "confusion.png"):
        tracker.log_artifact(root / plots / name, "evaluation")
    tracker.log_artifact(root / "metrics" / replicate / "eval.json", "evaluation")
    return metrics


def check_model_fits_data(model_folder: Path, encoder: dict | None, vocab_path: Path) -> None:
    """The model must have been trained on data encoded with the prepared vocab.json."""
    mine = model_folder / "encoder.json"
    if encoder is None:
        raise InputError(f"{mine}: missing, so the model cannot be matched with {vocab_path}; retrain it")
    if why := encoder_difference(encoder, outputs.load_vocab(vocab_path)):
        raise InputError(f"{mine} and {vocab_path} differ ({why}): the model was trained on other prepared "
                         "data; retrain it (dvc repro)")


def confusion_figure(matrix: Sequence[Sequence[int]], title: str,
                     labels: Sequence[str] = ("negative", "positive")) -> Figure:
    """Confusion matrix [[tn, fp], [fn, tp]] (rows: true class, columns: predicted) with counts."""
    m = np.asarray(matrix)
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues", vmin=0)  # colour from zero, so the text colour rule below matches it
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, str(int(count)), ha="center", va="center",
                color="white" if count > m.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return fig


def roc_figure(fpr: Sequence[float], tpr: Sequence[float], auc: float, title: str) -> Figure:
    """ROC curve with the chance diagonal."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    ax.grid(True, alpha=0.3)
    return fig


if __name__ == "__main__":
    run_stage(main)
