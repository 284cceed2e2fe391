"""Stage `compare`: one table and two figures across the cells in `train.cells`.

Reads metrics/<cell>/{train,eval}.json and plots/<cell>/{history,grad_trace}.csv; writes
reports/summary.md, reports/summary.csv, reports/val_accuracy.png and reports/grad_trace.png (the
gradient norm against the distance from the last token: the vanishing-gradient picture).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from stages.common import load_params, project_root, run_stage, write_text  # noqa: E402
from stages.train import TRACE_COLUMNS, trace_series, train_section  # noqa: E402

COLUMNS = ("cell", "test_accuracy", "test_f1", "test_auc", "best_val_accuracy", "best_epoch",
           "epochs", "train_seconds", "parameters")
HEADINGS = ("cell", "test accuracy", "test F1", "test AUC", "best val accuracy", "best epoch",
            "epochs run", "training time (s)", "parameters")


def _read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the {stage} stage first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _read_csv(path: Path, stage: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the {stage} stage first)")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def summary_row(cell: str, train: dict, evaluation: dict) -> dict:
    """One table row from a cell's train.json and eval.json."""
    return {"cell": cell, "test_accuracy": evaluation["accuracy"], "test_f1": evaluation["f1"],
            "test_auc": evaluation["roc_auc"], "best_val_accuracy": train["best_val_accuracy"],
            "best_epoch": train["best_epoch"], "epochs": train["epochs_run"],
            "train_seconds": train["train_seconds"], "parameters": train["num_parameters"]}


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
        return f"{value:.1f}" if column == "train_seconds" else f"{value:.4f}"
    return str(value)


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


def last_epoch_trace(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{state: (distance, norm)} of the last epoch in grad_trace.csv rows; {} if there are none."""
    if not rows:
        return {}
    tuples = [tuple(r[c] for c in TRACE_COLUMNS) for r in rows]
    return trace_series(tuples, max(int(r["epoch"]) for r in rows))


def run(cells: list[str], root: Path) -> list[dict]:
    rows, histories, traces = [], {}, {}
    for cell in cells:
        train = _read_json(root / "metrics" / cell / "train.json", f"train@{cell}")
        evaluation = _read_json(root / "metrics" / cell / "eval.json", f"evaluate@{cell}")
        rows.append(summary_row(cell, train, evaluation))
        history = _read_csv(root / "plots" / cell / "history.csv", f"train@{cell}")
        histories[cell] = ([int(r["epoch"]) for r in history], [float(r["val_accuracy"]) for r in history])
        traces[cell] = last_epoch_trace(_read_csv(root / "plots" / cell / "grad_trace.csv", f"train@{cell}"))

    from stages.plots import curves_figure, grad_trace_figure, save_figure

    reports = root / "reports"
    write_text(reports / "summary.csv", summary_csv(rows))
    write_text(reports / "summary.md", summary_markdown(rows))
    save_figure(curves_figure(histories, "epoch", "validation accuracy", "Validation accuracy per epoch"),
                reports / "val_accuracy.png")
    save_figure(grad_trace_figure(traces, "Gradient norm vs distance from the last token (last epoch)"),
                reports / "grad_trace.png")
    return rows


def main() -> None:
    root = project_root()
    cells = train_section(load_params(root / "params.yaml"))["cells"]
    for row in run(cells, root):
        print(", ".join(f"{k} {_cell_text(k, v)}" for k, v in row.items()))


if __name__ == "__main__":
    run_stage(main)
