"""Matplotlib figures for the train, evaluate and compare stages (Agg backend: no display needed).

Each function returns a Figure; `save_figure` writes it atomically as PNG and closes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from stages.common import atomic_path  # noqa: E402

STATE_LABELS = {"a": "dL/da (hidden state)", "c": "dL/dc (LSTM cell state)"}


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write `fig` to `path` as PNG (atomically) and free it."""
    try:
        with atomic_path(path) as tmp:
            # The temp name has no .png suffix, so the format must be explicit.
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def grad_trace_figure(series: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                      title: str) -> Figure:
    """Gradient norm against distance from the last token, log y.

    series: group label (a cell, or an epoch) -> {state "a" | "c": (distance (K,), norm (K,))}.
    One colour per group; the hidden state solid, the LSTM cell state dashed. Non-positive norms
    (flushed to zero) cannot sit on a log axis and are dropped.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, states) in enumerate(series.items()):
        for state, (distance, norm) in sorted(states.items()):
            distance, norm = np.asarray(distance), np.asarray(norm, dtype=np.float64)
            keep = norm > 0
            ax.plot(distance[keep], norm[keep], color=f"C{i}", linestyle="--" if state == "c" else "-",
                    label=f"{label}: {STATE_LABELS.get(state, state)}")
    ax.set_yscale("log")
    ax.set_xlabel("distance from the last token (time steps)")
    ax.set_ylabel("mean gradient norm")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def curves_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
                  ylabel: str, title: str) -> Figure:
    """One line with markers per label: series label -> (x (K,), y (K,))."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend()
    ax.grid(True, alpha=0.3)
    return fig


def confusion_figure(matrix: Sequence[Sequence[int]], title: str,
                     labels: Sequence[str] = ("negative", "positive")) -> Figure:
    """Confusion matrix [[tn, fp], [fn, tp]] (rows: true class, columns: predicted) with counts."""
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(m, cmap="Blues", vmin=0)  # colour from zero, so the text colour rule below matches it
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, str(int(count)), ha="center", va="center",
                color="white" if count > m.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return fig


def roc_figure(fpr: Sequence[float], tpr: Sequence[float], auc: float, title: str) -> Figure:
    """ROC curve with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(True, alpha=0.3)
    return fig
