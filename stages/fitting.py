"""What the train and pretrain stages share: checkpoint folders, the code digest in their keys,
how a training's end is reported, and the progress display."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rnn.train import TrainingDiverged, TrainingInterrupted
from stages import outputs

# What the MLflow logging loads (rnn/cli.py: where the store is): it changes what is logged, not the
# weights (nor a DVC dependency).
LOGGING_ONLY = {"tracking.py", "mlstore.py", "pyfunc_model.py", "cli.py"}


def checkpoint_folder(root: Path, cell: str, key: str) -> tuple[Path, bool]:
    """(checkpoints/<cell>/<key>/, whether it holds one to resume); the cell's other keys are removed."""
    folder = root / "checkpoints" / cell / key
    for stale in (root / "checkpoints" / cell).glob("*"):
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    resumed = (folder / "checkpoint.npz").is_file()
    if resumed:
        print(f"{cell}: resuming from {folder.relative_to(root)}", flush=True)
    return folder, resumed


def code_digest(stage_file: str) -> str:
    """Digest of every module of rnn/ and stages/ this process loaded, and `stage_file`: after a code
    change an interrupted run starts again rather than resume weights the old code produced."""
    project = Path(__file__).resolve().parents[1]
    files = sorted({Path(m.__file__).resolve() for m in list(sys.modules.values())
                    if getattr(m, "__file__", None) and Path(m.__file__).name not in LOGGING_ONLY
                    and Path(m.__file__).resolve().parent in (project / "rnn", project / "stages")}
                   | {Path(stage_file).resolve()})
    return hashlib.sha256("".join(outputs.file_digest(f) for f in files).encode()).hexdigest()[:12]


@contextmanager
def finishing(tracker, what: str, advice: str) -> Iterator[None]:
    """Close the MLflow run with the training's outcome. A diverged training exits 2, an interrupted
    one (checkpoint saved) 130, each with one line; `advice`: what to change when it diverges."""
    try:
        with tracker:
            yield
    except TrainingDiverged as exc:
        print(f"error: {what} diverged: {exc}; no model saved ({advice})", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as exc:
        print(f"error: {exc}; rerun the stage to resume", file=sys.stderr)
        sys.exit(130)


class Progress:
    """A tqdm bar per epoch (off without a terminal or with CI set) and one printed line per epoch."""

    def __init__(self, cell: str, epochs: int):
        self.cell, self.epochs = cell, epochs
        self.enabled = sys.stderr.isatty() and not os.environ.get("CI")
        self.bar = None

    def on_step(self, info: dict) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=info["batches"], initial=info["batch"] - 1, unit="batch", leave=False,
                            desc=f"{self.cell} epoch {info['epoch']}/{self.epochs}", disable=not self.enabled)
            self.t0, self.tokens, self.loss_sum, self.steps = time.perf_counter(), 0, 0.0, 0
        self.tokens += info["tokens"]
        self.loss_sum += info["loss"]
        self.steps += 1
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(loss=f"{self.loss_sum / self.steps:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        self.bar.update(1)

    def on_epoch(self, info: dict) -> None:
        self.close()
        train = (f"acc {info['train_accuracy']:.4f}" if "train_accuracy" in info else "(sampled softmax)")
        val = (f"acc {info['val_accuracy']:.4f}" if "val_accuracy" in info else
               f"perplexity {info['val_perplexity']:.1f}")
        print(f"{self.cell} epoch {info['epoch']}/{self.epochs}: train loss {info['train_loss']:.4f} {train} "
              f"| val loss {info['val_loss']:.4f} {val} | {info['tokens_per_s']:.0f} tokens/s, "
              f"{info['seconds']:.1f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
