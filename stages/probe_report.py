"""Stage `probe_report`: the memory probe's results of every cell on one chart.

    python -m stages.probe_report           # reports/probe_accuracy.png, reports/probe_gradients.png
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage
from stages.plots import curves_figure, gradient_lines


def report(cells: list[str], root: Path) -> None:
    """reports/probe_accuracy.png and reports/probe_gradients.png: every cell on one chart."""
    def table(name: str) -> dict[str, np.ndarray]:
        rows = outputs.read_csv(root / f"probe/{name}.csv", f"probe@{name.split('_')[0]}")
        return {key: np.array([float(r[key]) for r in rows]) for key in (rows[0] if rows else {})}

    curves, traces = {c: table(c) for c in cells}, {c: table(f"{c}_trace") for c in cells}
    windows = {w: {c: {state: (t["steps_from_end"], t[f"{state}_{w}"]) for state in "ac" if f"{state}_{w}" in t}
                   for c, t in traces.items()} for w in ("first", "last")}
    with Outputs(root) as out:
        out.save_figure("reports/probe_accuracy.png", curves_figure(
            {c: (t["distance"], t["accuracy"]) for c, t in curves.items()}, "distance of the decisive token from "
            "the end (steps)", "test accuracy", "Memory probe: accuracy vs distance", chance=0.5))
        out.save_figure("reports/probe_gradients.png", probe_gradients_figure(windows))


def probe_gradients_figure(windows: dict) -> Figure:
    """Memory probe: gradient norm by steps from the end, one panel per window of training steps.
    windows: "first" | "last" -> the series of `grad_trace_figure`, one group per cell."""
    fig = Figure(figsize=(11, 4), layout="tight")
    axes = fig.subplots(1, len(windows), sharey=True)
    for ax, (window, series) in zip(axes, windows.items()):
        gradient_lines(ax, series)
        ax.set(xlabel="steps from the end", title=f"{window} training steps")
    axes[0].set_ylabel("mean gradient norm")
    fig.suptitle("Gradient reaching each step back (run at the largest distance)")
    return fig


def main() -> None:
    root = project_root()
    report(settings.load(root / "params.yaml")["probe"]["cells"], root)


if __name__ == "__main__":
    run_stage(main)
