"""Stage `compare`: one table and two figures across the cells in `train.cells`.

    python -m stages.compare

Reads metrics/<cell>/{train,eval}.json and plots/<cell>/{history,grad_trace}.csv; writes
reports/summary.md, reports/summary.csv, reports/val_accuracy.png and reports/grad_trace.png (the
gradient norm against the distance from the last token: the vanishing-gradient picture), and
reports/summary.json, the metrics `dvc exp show` opens with (test and validation accuracy per cell).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage
from stages.plots import curves_figure, grad_trace_figure

COLUMNS = ("cell", "test_accuracy", "test_f1", "test_auc", "best_val_accuracy", "best_epoch",
           "epochs", "train_seconds", "parameters", "lm_val_perplexity")
HEADINGS = ("cell", "test accuracy", "test F1", "test AUC", "best val accuracy", "best epoch",
            "epochs run", "training time (s)", "parameters", "LM val perplexity")


def summary_row(cell: str, train: dict, evaluation: dict, pretrain: dict | None = None) -> dict:
    """One table row from a cell's train.json, eval.json and, if it was pretrained, pretrain.json."""
    return {"cell": cell, "test_accuracy": evaluation["accuracy"], "test_f1": evaluation["f1"],
            "test_auc": evaluation["roc_auc"], "best_val_accuracy": train["best_val_accuracy"],
            "best_epoch": train["best_epoch"], "epochs": train["epochs_run"],
            "train_seconds": train["train_seconds"], "parameters": train["num_parameters"],
            "lm_val_perplexity": pretrain["val_perplexity"] if pretrain else None}


def summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _cell_text(column: str, value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.1f}" if column in ("train_seconds", "lm_val_perplexity") else f"{value:.4f}"
    return str(value)


def summary_metrics(rows: list[dict]) -> dict:
    """{"test_accuracy": {cell: ...}, "val_accuracy": {cell: best ...}}: the three cells side by side."""
    return {"test_accuracy": {r["cell"]: r["test_accuracy"] for r in rows},
            "val_accuracy": {r["cell"]: r["best_val_accuracy"] for r in rows}}


def summary_markdown(rows: list[dict]) -> str:
    """The table as Markdown, the best test accuracy named, the figures linked."""
    lines = ["# RNN vs GRU vs LSTM on IMDB", "",
             "| " + " | ".join(HEADINGS) + " |",
             "|" + "|".join("---" if c == "cell" else "---:" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell_text(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    best = max(rows, key=lambda r: r["test_accuracy"])
    lines += ["", f"Best test accuracy: **{best['cell']}** ({best['test_accuracy']:.4f}).", "",
              "![validation accuracy per epoch](val_accuracy.png)", "",
              "![gradient norm vs distance from the last token](grad_trace.png)", ""]
    return "\n".join(lines)


def run(cells: list[str], root: Path) -> list[dict]:
    rows, histories, traces = [], {}, {}
    for cell in cells:
        train = outputs.read_json(root / "metrics" / cell / "train.json", f"train@{cell}")
        evaluation = outputs.read_json(root / "metrics" / cell / "eval.json", f"evaluate@{cell}")
        lm = root / "metrics" / cell / "pretrain.json"
        rows.append(summary_row(cell, train, evaluation, outputs.read_json(lm, f"pretrain@{cell}") if lm.is_file() else None))
        history = outputs.read_csv(root / "plots" / cell / "history.csv", f"train@{cell}", ["epoch", "val_accuracy"])
        histories[cell] = ([int(r["epoch"]) for r in history], [float(r["val_accuracy"]) for r in history])
        trace = outputs.read_csv(root / "plots" / cell / "grad_trace.csv", f"train@{cell}", outputs.TRACE_COLUMNS)
        traces[cell] = outputs.trace_series(trace, outputs.last_epoch(trace))

    with Outputs(root) as out:
        out.write_text("reports/summary.csv", summary_csv(rows))
        out.write_json("reports/summary.json", summary_metrics(rows))
        out.write_text("reports/summary.md", summary_markdown(rows))
        out.save_figure("reports/val_accuracy.png", curves_figure(
            histories, "epoch", "validation accuracy", "Validation accuracy per epoch"))
        out.save_figure("reports/grad_trace.png", grad_trace_figure(
            traces, "Gradient norm vs distance from the last token (last epoch)"))
    return rows


def main() -> None:
    root = project_root()
    cells = settings.load(root / "params.yaml")["train"]["cells"]
    for row in run(cells, root):
        print(", ".join(f"{k} {_cell_text(k, v)}" for k, v in row.items()))


if __name__ == "__main__":
    run_stage(main)
