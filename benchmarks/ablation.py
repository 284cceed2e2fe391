"""Compare the test predictions of two runs of the pipeline, cell by cell: does a setting help?

    python benchmarks/ablation.py BASE NEW [--cells lstm gru] [--resamples 2000]

BASE and NEW are project folders (a clone, or a `dvc exp apply`-ed copy) whose evaluate stages wrote
data/predictions/<cell>/seed<k>.npz over the same test reviews. For each cell present in both, it
prints each run's mean accuracy over its seeds with the seeds' Student-t interval, and NEW - BASE
with the paired bootstrap over reviews and seeds (rnn.stats.paired_bootstrap, the compare stage's
test). A setting is adopted when that interval excludes 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rnn.io import load_arrays  # noqa: E402
from rnn.stats import correct_predictions, mean_interval, paired_bootstrap  # noqa: E402


def seed_predictions(root: Path, cell: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels (N,), P(positive) (seeds, N)) of a cell's replicates in `root`, or None if it has none."""
    files = sorted((root / "data/predictions" / cell).glob("seed*.npz"))
    if not files:
        return None
    arrays = [load_arrays(f) for f in files]
    labels = arrays[0]["labels"]
    if any(not np.array_equal(a["labels"], labels) for a in arrays):
        raise SystemExit(f"{root}: the seeds of {cell} were scored on different reviews")
    return labels, np.stack([a["probabilities"] for a in arrays])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"])
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"{'cell':5} {'base mean [95% CI]':>26} {'new mean [95% CI]':>26} {'new - base, points [95% CI]':>30}  p")
    for cell in args.cells:
        base, new = seed_predictions(args.base, cell), seed_predictions(args.new, cell)
        if base is None or new is None:
            continue
        if not np.array_equal(base[0], new[0]):
            raise SystemExit(f"{cell}: the two runs scored different test reviews")
        correct = [correct_predictions(base[0], probs) for _, probs in (base, new)]
        means = [mean_interval(c.mean(axis=1)) for c in correct]
        d = paired_bootstrap(correct[1], correct[0], np.random.default_rng(args.seed), args.resamples)
        cols = [f"{m.mean:.4f} [{m.low:.4f}, {m.high:.4f}] n={len(c)}" for m, c in zip(means, correct)]
        print(f"{cell:5} {cols[0]:>26} {cols[1]:>26} "
              f"{100 * d.difference:+6.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}]{'':8} {d.p_value:.3f}")


if __name__ == "__main__":
    main()
