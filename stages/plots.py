"""The pipeline's shared figures, by matplotlib's object API (no pyplot: no global state, no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

STATE_LABELS = {"a": "dL/da (hidden state)", "c": "dL/dc (LSTM cell state)"}
# group label -> {state: (distance (K,), norm (K,)), or (distance, norm, low, high): a band of replicates}
Gradients = Mapping[str, Mapping[str, tuple[np.ndarray, ...]]]


def gradient_lines(ax: Axes, series: Gradients) -> None:
    """One colour per group (a cell, or an epoch), the hidden state solid, the LSTM cell state dashed,
    the replicates' range shaded; log y, so norms flushed to zero are dropped."""
    for i, (label, states) in enumerate(series.items()):
        for state, (distance, norm, *band) in sorted(states.items()):
            distance, norm = np.asarray(distance), np.asarray(norm, dtype=np.float64)
            ax.plot(distance[norm > 0], norm[norm > 0], color=f"C{i}", linestyle="--" if state == "c" else "-",
                    label=f"{label}: {STATE_LABELS.get(state, state)}")
            if band:
                low, high = (np.asarray(b, dtype=np.float64) for b in band)
                keep = low > 0
                ax.fill_between(distance[keep], low[keep], high[keep], color=f"C{i}", alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def grad_trace_figure(series: Gradients, title: str) -> Figure:
    """Gradient norm against the distance from the last token (the vanishing-gradient picture)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    gradient_lines(ax, series)
    ax.set(xlabel="distance from the last token (time steps)", ylabel="mean gradient norm", title=title)
    return fig


def curves_figure(series: Mapping[str, tuple[Sequence[float], ...]], xlabel: str, ylabel: str,
                  title: str, chance: float | None = None) -> Figure:
    """One line with markers per label: series label -> (x (K,), y (K,)), or (x, y, low, high) to
    shade the range of replicates; a dotted line at `chance`."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (label, (x, y, *band)) in enumerate(series.items()):
        ax.plot(x, y, marker="o", label=label, color=f"C{i}")
        if band:
            ax.fill_between(x, band[0], band[1], color=f"C{i}", alpha=0.2, linewidth=0)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if series:
        ax.legend()
    ax.grid(True, alpha=0.3)
    return fig
