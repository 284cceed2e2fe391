"""Stage `train@<cell>`: train one recurrent cell on the prepared IMDB data.

    python stages/train.py <cell>        # cell: rnn | gru | lstm

Settings come from the params.yaml section `train`, with `train.overrides.<cell>` merged on top.
An interrupted run leaves a checkpoint in checkpoints/<cell>/<key>/ (key: a hash of the settings
and the input files, so a checkpoint from other settings or data is never resumed) and the next
run continues from it. Writes models/<cell>/ (weights, config, encoder, MLflow run id),
metrics/<cell>/train.json and plots/<cell>/{history.csv, grad_trace.csv, grad_trace.png}.
"""

from __future__ import annotations

import copy
import csv
import difflib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# One BLAS thread: OpenBLAS keeps the per-step products (64 x 128 x 512) on one thread anyway
# (measured: 94.8 us with one or two), a second thread did not speed up a training step
# (0.183 s vs 0.177-0.190 s, LSTM 64x200x100x128), and two spinning threads per process slow down
# queued experiments run side by side (`dvc queue start -j 2`). Set the variable to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from rnn.io import load_arrays, save_model  # noqa: E402
from rnn.model import POOLINGS, ModelConfig, SentimentModel  # noqa: E402
from rnn.optim import CLIP_MODES, OPTIMIZERS, make_optimizer  # noqa: E402
from rnn.train import Dataset, TrainConfig, TrainingDiverged, TrainingInterrupted, fit  # noqa: E402
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
from stages.tracking import params_hash  # noqa: E402  (stdlib only; mlflow is imported lazily)

CELL_NAMES = ("rnn", "gru", "lstm")

# The settings one cell trains with; `train.overrides.<cell>` may set any of them.
KNOBS: dict = {
    "epochs": Field(int, 5, min=1),
    "batch_size": Field(int, 64, min=1),
    "lr": Field(float, 0.002, min=0, min_exclusive=True),
    "optimizer": Field(str, "adam", choices=OPTIMIZERS),
    "weight_decay": Field(float, 0.0, min=0),
    "momentum": Field(float, 0.9, min=0, max=0.999),
    "hidden_size": Field(int, 128, min=1),
    "embed_dim": Field(int, 100, min=1),
    "num_layers": Field(int, 1, min=1),
    "bidirectional": Field(bool, False),
    "dropout": Field(float, 0.5, min=0, max=0.95),
    "pooling": Field(str, "last", choices=POOLINGS),
    "reset_after": Field(bool, False),
    "forget_bias": Field(float, 1.0),
    "freeze_embedding": Field(bool, False),
    "clip": {
        "mode": Field(str, "norm", choices=CLIP_MODES),
        "threshold": Field(float, 5.0, min=0, min_exclusive=True),
    },
    "lr_decay": Field(float, 0.5, min=0, max=1, min_exclusive=True),
    "patience": Field(int, 2, min=0),
    "trace": Field(bool, True),
    "trace_every": Field(int, 1, min=1),
    "seed": Field(int, 0),
}
SCHEMA: dict = {
    "cells": Field(list, list(CELL_NAMES)),
    **KNOBS,
    "overrides": {cell: KNOBS for cell in CELL_NAMES},
}

HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds",
                   "tokens_per_s", "grad_norm_mean", "grad_norm_max", "clipped_fraction")
TRACE_COLUMNS = ("epoch", "distance", "state", "grad_norm", "log10_grad_norm")


# ------------------------------------------------------------------------------------ params
def check_cells(cells: list, source: str = "params.yaml") -> list[str]:
    """`train.cells` as a list of distinct known cell names; one-line ParamsError otherwise."""
    def fail(why: str) -> ParamsError:
        return ParamsError(f"{source}: train.cells = {cells!r}: {why}")

    if not cells:
        raise fail("must list at least one of " + ", ".join(CELL_NAMES))
    for cell in cells:
        if cell not in CELL_NAMES:
            hint = difflib.get_close_matches(str(cell), CELL_NAMES, n=1)
            raise fail(f"unknown cell {cell!r}" + (f" (did you mean {hint[0]}?)" if hint else "")
                       + "; allowed: " + ", ".join(CELL_NAMES))
    if len(set(cells)) != len(cells):
        raise fail("lists a cell twice")
    return list(cells)


def _given(validated: dict, raw: dict) -> dict:
    """The part of a validated override that the user actually wrote (not filled-in defaults)."""
    out = {}
    for key, value in raw.items():
        out[key] = _given(validated[key], value or {}) if isinstance(validated[key], dict) else validated[key]
    return out


def _merge(base: dict, over: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return merged


def train_section(params: dict) -> dict:
    """The whole `train` section validated, with defaults filled in and `cells` checked."""
    section = validate_section(params, "train", SCHEMA)
    check_cells(section["cells"], getattr(params, "source", "params.yaml"))
    return section


def raw_override(params: dict, cell: str) -> dict:
    """`train.overrides.<cell>` exactly as written (unvalidated); {} if absent."""
    return ((params.get("train") or {}).get("overrides") or {}).get(cell) or {}


def cell_config(params: dict, cell: str) -> dict:
    """The settings `cell` trains with: the `train` knobs with `train.overrides.<cell>` on top."""
    if cell not in CELL_NAMES:
        raise ValueError(f"unknown cell {cell!r}: expected one of {', '.join(CELL_NAMES)}")
    section = train_section(params)
    raw = raw_override(params, cell)
    base = {key: section[key] for key in KNOBS}
    return _merge(base, _given(section["overrides"][cell], raw))


def config_hash(cfg: dict) -> str:
    """Short stable hash of a cell's merged settings (part of its checkpoint key)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def code_digest() -> str:
    """Digest of the code a checkpoint was trained with (rnn/ and this stage): after a code change
    an interrupted run starts again rather than resume weights the old code produced."""
    here = Path(__file__).resolve()
    files = sorted((here.parents[1] / "rnn").glob("*.py")) + [here]
    return hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_config(cfg: dict, cell: str, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, cell=cell, embed_dim=cfg["embed_dim"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"], dropout=cfg["dropout"],
        pooling=cfg["pooling"],
        # Meaningless for rnn/lstm; kept off there so their saved config does not claim it.
        reset_after=cfg["reset_after"] and cell == "gru",
        forget_bias=cfg["forget_bias"], freeze_embedding=cfg["freeze_embedding"])


def train_config(cfg: dict) -> TrainConfig:
    return TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch_size"], clip_mode=cfg["clip"]["mode"],
                       clip_threshold=cfg["clip"]["threshold"], lr_decay=cfg["lr_decay"],
                       patience=cfg["patience"],
                       trace=cfg["trace"], trace_every=cfg["trace_every"])


# ------------------------------------------------------------------------------------ inputs
def load_split(path: Path) -> Dataset:
    """A prepared split (ids (N, T), lengths (N,), labels (N,)) from an .npz file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the prepare stage first)")
    arrays = load_arrays(path)
    missing = {"ids", "lengths", "labels"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: missing arrays {', '.join(sorted(missing))}")
    if len(arrays["labels"]) == 0:
        raise ValueError(f"{path}: no examples")
    return Dataset(arrays["ids"], arrays["lengths"], arrays["labels"])


def load_inputs(root: Path, embed_dim: int, embed_key: str) -> dict:
    """Prepared train/val splits, the encoder dict and the embedding matrix (V, embed_dim).

    embed_key names the params key embed_dim came from, for the error when the widths differ."""
    prepared = root / "data/prepared"
    vocab_path, emb_path = prepared / "vocab.json", root / "data/embeddings.npy"
    for path, stage in ((vocab_path, "prepare"), (emb_path, "embed")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run the {stage} stage first)")
    try:
        encoder = json.loads(vocab_path.read_text(encoding="utf-8"))
        vocab_size = len(encoder["tokens"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{vocab_path}: not a valid vocabulary file ({exc})") from None
    embeddings = np.load(emb_path, allow_pickle=False)
    if embeddings.ndim != 2 or embeddings.shape[0] != vocab_size:
        raise ValueError(f"{emb_path}: shape {embeddings.shape} does not fit the vocabulary of "
                         f"{vocab_size} words in {vocab_path}; rerun the embed stage")
    if embeddings.shape[1] != embed_dim:
        raise ParamsError(f"params.yaml: {embed_key} = {embed_dim}: must equal the width {embeddings.shape[1]} "
                          f"of {emb_path} (train.embed_dim, which the embed stage uses)")
    inputs = {"train": load_split(prepared / "train.npz"), "val": load_split(prepared / "val.npz"),
              "encoder": encoder, "embeddings": embeddings}
    # Identifies the data a checkpoint was made from (together with the settings).
    inputs["digest"] = hashlib.sha256("".join(
        file_digest(p) for p in (prepared / "train.npz", prepared / "val.npz", vocab_path, emb_path)
    ).encode()).hexdigest()[:16]
    return inputs


# ----------------------------------------------------------------------------------- outputs
def history_csv(history: list[dict]) -> str:
    """CSV text of the per-epoch records, one row per epoch, columns HISTORY_COLUMNS."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for record in history:
        writer.writerow([record[c] for c in HISTORY_COLUMNS])
    return buf.getvalue()


def grad_trace_rows(traces: list[dict]) -> list[tuple]:
    """Long-format rows (epoch, distance, state, grad_norm, log10_grad_norm) of fit's traces.

    traces: per epoch {state: [mean norm at distance d from the last token, or None]}. Distances
    no sequence reached (None) are skipped; a norm flushed to exactly 0 is kept, with an empty log10.
    """
    rows = []
    for epoch, states in enumerate(traces, 1):
        for state in sorted(states):
            for distance, norm in enumerate(states[state]):
                if norm is None:
                    continue
                rows.append((epoch, distance, state, norm, math.log10(norm) if norm > 0 else ""))
    return rows


def grad_trace_csv(rows: list[tuple]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TRACE_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def trace_series(rows: list[tuple], epoch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{state: (distance, norm)} of one epoch from grad_trace_rows-style rows (or their CSV strings)."""
    out: dict[str, tuple[list, list]] = {}
    for e, distance, state, norm, _ in rows:
        if int(e) == epoch:
            d, n = out.setdefault(state, ([], []))
            d.append(int(distance))
            n.append(float(norm))
    return {s: (np.array(d), np.array(n)) for s, (d, n) in out.items()}


def train_metrics(cell: str, result: dict, model: SentimentModel, wall_seconds: float,
                  resumed: bool) -> dict:
    history = result["history"]
    last = history[-1]
    return {
        "cell": cell,
        "best_val_accuracy": result["best_val_accuracy"],
        "best_epoch": result["best_epoch"],
        "epochs_run": len(history),
        "stopped_early": result["stopped_early"],
        "steps": result["steps"],
        # Summed over epochs, so a resumed run still reports its whole training time.
        "train_seconds": sum(r["seconds"] + r["val_seconds"] for r in history),
        "wall_seconds": wall_seconds,
        "tokens_per_s": sum(r["tokens_per_s"] for r in history) / len(history),
        "num_parameters": model.num_parameters(),
        "final_train_loss": last["train_loss"],
        "final_train_accuracy": last["train_accuracy"],
        "final_val_loss": last["val_loss"],
        "final_val_accuracy": last["val_accuracy"],
        "resumed": resumed,
    }


class Progress:
    """Per-epoch tqdm bar with running loss and tokens/s, plus one printed line per epoch.

    The bar is off when stderr is not a terminal or the CI variable is set (logs stay readable).
    """

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
        print(f"{self.cell} epoch {info['epoch']}/{self.epochs}: train loss {info['train_loss']:.4f} "
              f"acc {info['train_accuracy']:.4f} | val loss {info['val_loss']:.4f} "
              f"acc {info['val_accuracy']:.4f} | {info['tokens_per_s']:.0f} tokens/s, "
              f"{info['seconds']:.1f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# -------------------------------------------------------------------------------------- run
def run(cell: str, params: dict, root: Path, tracker) -> dict:
    """Train `cell`, write its outputs, log to `tracker`; returns the train metrics."""
    t_start = time.perf_counter()
    cfg = cell_config(params, cell)
    overridden = "embed_dim" in raw_override(params, cell)
    inputs = load_inputs(root, cfg["embed_dim"],
                         f"train.overrides.{cell}.embed_dim" if overridden else "train.embed_dim")
    checkpoint_dir = root / "checkpoints" / cell / f"{config_hash(cfg)}-{inputs['digest']}-{code_digest()}"
    for stale in (root / "checkpoints" / cell).glob("*"):
        if stale != checkpoint_dir:  # other settings or data: never to be resumed
            shutil.rmtree(stale, ignore_errors=True)
    resumed = (checkpoint_dir / "checkpoint.npz").is_file()
    if resumed:
        print(f"{cell}: resuming from {checkpoint_dir.relative_to(root)}", flush=True)

    # Model initialisation and training draw from separate streams of the same seed.
    config = model_config(cfg, cell, inputs["embeddings"].shape[0])
    model = SentimentModel.create(config, np.random.default_rng(cfg["seed"]), inputs["embeddings"])
    optimizer = make_optimizer(cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["momentum"])
    train, val = inputs["train"], inputs["val"]
    # Tracker.start logged the train section itself; these are what the data made of it.
    tracker.log_params({"data.train_size": len(train.labels), "data.val_size": len(val.labels),
                        "data.max_len": train.ids.shape[1], "data.vocab_size": config.vocab_size,
                        "model.num_parameters": model.num_parameters()})
    progress = Progress(cell, cfg["epochs"])
    try:
        result = fit(model, optimizer, train, val, train_config(cfg), np.random.default_rng([cfg["seed"], 1]),
                     checkpoint_dir=checkpoint_dir, callbacks=[progress, tracker])
    finally:
        progress.close()

    metrics = train_metrics(cell, result, model, time.perf_counter() - t_start, resumed)
    model_dir = root / "models" / cell
    # The same hash as the MLflow run's params_hash tag: a model folder leads to its run.
    metadata = {"cell": cell, "params_hash": params_hash(params, cell), "best_epoch": result["best_epoch"],
                "best_val_accuracy": result["best_val_accuracy"], "train": cfg}
    save_model(model_dir, model, encoder=inputs["encoder"], metadata=metadata)
    write_json(root / "metrics" / cell / "train.json", metrics)
    plots = root / "plots" / cell
    write_text(plots / "history.csv", history_csv(result["history"]))
    rows = grad_trace_rows(result["traces"])
    write_text(plots / "grad_trace.csv", grad_trace_csv(rows))

    from stages.plots import grad_trace_figure, save_figure

    figure_epochs = sorted({1, len(result["history"])})
    save_figure(grad_trace_figure({f"epoch {e}": trace_series(rows, e) for e in figure_epochs},
                                  f"{cell}: gradient norm vs distance from the last token"),
                plots / "grad_trace.png")

    tracker.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.log_artifacts(model_dir, "model")
    # The gradient trace went to the run epoch by epoch (Tracker.on_epoch).
    tracker.log_artifact(plots / "history.csv", "plots")
    tracker.write_run_file(model_dir / "mlflow_run.json")
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics


def main() -> None:
    if len(sys.argv) != 2:
        raise ValueError(f"usage: python stages/train.py <cell>  (cell: {' | '.join(CELL_NAMES)})")
    cell = sys.argv[1]
    root = project_root()
    params = load_params(root / "params.yaml")
    cell_config(params, cell)  # bad settings fail here, before a tracking run is opened

    from stages.tracking import Tracker

    tracker = Tracker.start(params, cell, f"train@{cell}")
    try:
        metrics = run(cell, params, root, tracker)
    except TrainingDiverged as exc:
        tracker.end(status="FAILED")
        print(f"error: {cell} training diverged: {exc}; no model saved (try a lower train.lr or "
              f"train.clip)", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as exc:
        tracker.end(status="KILLED")
        print(f"error: {exc}; rerun the stage to resume", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        tracker.end(status="FAILED")
        raise
    tracker.end()
    print(f"{cell}: best val accuracy {metrics['best_val_accuracy']:.4f} at epoch {metrics['best_epoch']}, "
          f"{metrics['train_seconds']:.1f}s, {metrics['num_parameters']} parameters")


if __name__ == "__main__":
    run_stage(main)
