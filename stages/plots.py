"""The pipeline's figures, drawn with matplotlib's object API (no pyplot: no global state, no display).

Each function returns a Figure; a stage saves it with `Outputs.save_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

STATE_LABELS = {"a": "dL/da (hidden state)", "c": "dL/dc (LSTM cell state)"}


def grad_trace_figure(series: Mapping[str, Mapping[str, tuple[np.ndarray, ...]]],
                      title: str) -> Figure:
    """Gradient norm against distance from the last token, log y.

    series: group label (a cell, or an epoch) -> {state "a" | "c": (distance (K,), norm (K,)), or
    (distance, norm, low, high) to shade the range of replicates}. One colour per group; the hidden
    state solid, the LSTM cell state dashed. Non-positive norms (flushed to zero) cannot sit on a
    log axis and are dropped.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (label, states) in enumerate(series.items()):
        for state, (distance, norm, *band) in sorted(states.items()):
            distance, norm = np.asarray(distance), np.asarray(norm, dtype=np.float64)
            keep = norm > 0
            ax.plot(distance[keep], norm[keep], color=f"C{i}", linestyle="--" if state == "c" else "-",
                    label=f"{label}: {STATE_LABELS.get(state, state)}")
            if band:
                low, high = (np.asarray(b, dtype=np.float64) for b in band)
                keep &= low > 0
                ax.fill_between(distance[keep], low[keep], high[keep], color=f"C{i}", alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.set_xlabel("distance from the last token (time steps)")
    ax.set_ylabel("mean gradient norm")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def curves_figure(series: Mapping[str, tuple[Sequence[float], ...]], xlabel: str,
                  ylabel: str, title: str) -> Figure:
    """One line with markers per label: series label -> (x (K,), y (K,)), or (x, y, low, high) to
    shade the range of replicates."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (label, (x, y, *band)) in enumerate(series.items()):
        ax.plot(x, y, marker="o", label=label, color=f"C{i}")
        if band:
            ax.fill_between(x, band[0], band[1], color=f"C{i}", alpha=0.2, linewidth=0)
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
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
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
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"ROC (AUC = {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(True, alpha=0.3)
    return fig


def probe_accuracy_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """Memory probe: test accuracy against the distance of the decisive token, one line per cell."""
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for cell, (distance, accuracy) in curves.items():
        ax.plot(distance, accuracy, marker="o", label=cell)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="distance of the decisive token from the end (steps)", ylabel="test accuracy",
           ylim=(0.4, 1.02), title="Memory probe: accuracy vs distance")
    ax.legend()
    return fig


def probe_gradients_figure(traces: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """Memory probe: gradient norm by steps from the end, in the first and the last training steps.

    traces: cell -> columns of its trace table (steps_from_end, a_first, a_last[, c_first, c_last])."""
    fig = Figure(figsize=(11, 4), layout="tight")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, window in zip(axes, ("first", "last")):
        for cell, data in traces.items():
            # Zeros (gradients flushed to zero far back) cannot be drawn on a log scale.
            line, = ax.plot(data["steps_from_end"], _positive(data[f"a_{window}"]), label=f"{cell}: dL/da")
            if f"c_{window}" in data:
                ax.plot(data["steps_from_end"], _positive(data[f"c_{window}"]), color=line.get_color(),
                        linestyle="--", label=f"{cell}: dL/dc")
        ax.set(yscale="log", xlabel="steps from the end", title=f"{window} training steps")
    axes[0].set_ylabel("mean gradient norm")
    axes[0].legend()
    fig.suptitle("Gradient reaching each step back (run at the largest distance)")
    return fig


def _positive(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, values, np.nan)
