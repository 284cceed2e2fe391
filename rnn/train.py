"""The training loop: mini-batches, clipping, optimizer steps, validation, early stopping, and
checkpoints from which an interrupted run resumes to exactly the result of an uninterrupted one.

The loop reads the same for one process or several: it asks a runner (rnn.parallel) for the loss
and gradients of a batch, then clips and steps the optimizer. With `TrainConfig.workers` = 1 the
runner computes in this process; with more, worker processes compute shares of every batch.

Progress is reported through callbacks (any object with `on_step(info)` and/or `on_epoch(info)`),
so that a stage can plug in MLflow and a progress bar from outside.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import TrainConfig
from .data import batches
from .errors import InputError
from .io import load_arrays, save_arrays
from .losses import bce_with_logits
from .model import SentimentModel
from .optim import Optimizer, clip_gradients, group_norms
from .parallel import WorkerPool, make_runner, resolve_workers

CHECKPOINT = "checkpoint.npz"


class Dataset(NamedTuple):
    ids: np.ndarray        # (N, T) int, right-padded with 0
    lengths: np.ndarray    # (N,) >= 1
    labels: np.ndarray     # (N,) 0 or 1


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the run can be resumed."""


def evaluate(model, data: Dataset, batch_size: int = 256, workers: int | str = 1, runner=None
             ) -> dict[str, float]:
    """Scores on a dataset (no dropout), on `workers` processes or an open runner's: loss and
    accuracy of a classifier; loss (mean negative log-likelihood per prediction, full softmax) and
    perplexity of a language model."""
    if model.config.task == "language_model":
        workers = resolve_workers(workers)
        if runner is None and workers > 1:
            with WorkerPool(model, workers) as pool:
                return evaluate(model, data, batch_size, runner=pool)
        perplexity = model.perplexity(data.ids, data.lengths, min(batch_size, 64), runner)
        return {"loss": float(np.log(perplexity)), "perplexity": perplexity}
    logits = (runner.predict_logits(data.ids, data.lengths, batch_size) if runner is not None else
              model.predict_logits(data.ids, data.lengths, batch_size, workers))
    loss, _ = bce_with_logits(logits, data.labels)
    return {"loss": loss, "accuracy": float(np.mean((logits > 0) == (data.labels > 0.5)))}


def fit(model: SentimentModel, optimizer: Optimizer, train: Dataset, val: Dataset, cfg: TrainConfig,
        rng: np.random.Generator, checkpoint_dir: str | Path | None = None, callbacks=()) -> dict:
    """Train `model` in place and return the run's record.

    rng draws the data order and each step's seed (dropout masks); `checkpoint_dir`, when given,
    receives a checkpoint after every epoch (and on Ctrl-C / SIGTERM) and an existing one there is
    resumed. At the end the parameters of the epoch with the best validation score (accuracy of a
    classifier, perplexity of a language model) are restored.
    With cfg.workers > 1 one pool of worker processes serves the whole run, validation included;
    the result depends on the number of workers only through float rounding.

    Returns {"history": [per-epoch dicts], "traces": [per-epoch {"a": mean norm by distance, ...}],
    "best_epoch", "best_val_accuracy" (None for a language model), "stopped_early", "steps"}.
    """
    T = train.ids.shape[1]
    workers = resolve_workers(cfg.workers)
    run = {"history": [], "traces": [], "best_epoch": 0, "best_score": -np.inf,
           "stopped_early": False, "epoch": 0, "position": 0, "partial": None}
    best_params = {k: v.copy() for k, v in model.params.items()}
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        run, best_params = _load_checkpoint(ckpt, model, optimizer, rng)

    base_lr = optimizer.lr           # the schedule follows from the epoch: resuming needs no state
    runner = make_runner(model, train._asdict(), workers)    # starts the worker processes, if any
    stop = {"requested": False}
    handlers = _catch_signals(stop)
    try:
        while run["epoch"] < cfg.epochs and not run["stopped_early"]:
            epoch = run["epoch"] + 1
            optimizer.lr = base_lr * cfg.lr_decay ** (epoch - 1)
            epoch_start_rng = rng.bit_generator.state
            if run["partial"]:                            # resuming inside an epoch
                epoch_start_rng = run["partial"]["epoch_start_rng"]
                rng.bit_generator.state = epoch_start_rng
            order = batches(train.lengths, cfg.batch_size, rng)
            acc = run["partial"] or _new_epoch_sums(T, epoch_start_rng)
            if run["partial"]:
                rng.bit_generator.state = acc["rng_now"]
                acc["trace"] = {k: [np.array(s), np.array(c)] for k, (s, c) in acc["trace"].items()}
            run["partial"] = None
            for position in range(run["position"], len(order)):
                t0 = time.perf_counter()
                idx = order[position]
                trace = cfg.trace and optimizer.t % cfg.trace_every == 0
                seed = int(rng.integers(2**63))      # the step's seed: its dropout masks come from it
                loss, grads, shares = runner.gradients(idx, seed, trace)
                norms = group_norms(grads)
                pre = float(np.sqrt(sum(v * v for v in norms.values())))
                if not (np.isfinite(loss) and np.isfinite(pre)):
                    worst = max(norms, key=lambda k: norms[k] if np.isfinite(norms[k]) else np.inf)
                    raise TrainingDiverged(
                        f"epoch {epoch}, step {optimizer.t + 1}: loss {loss}, gradient norm {pre} "
                        f"(largest: {worst} = {norms[worst]}); the last saved checkpoint is kept")
                _, post, clipped = clip_gradients(grads, cfg.clip_mode, cfg.clip_threshold, norm=pre)
                optimizer.step(model.params, grads)
                _accumulate(acc, loss, model, shares, train, idx, pre, clipped, time.perf_counter() - t0)
                info = {"epoch": epoch, "step": optimizer.t, "loss": loss, "grad_norm": pre,
                        "grad_norm_clipped": post, "clipped": clipped, "group_norms": norms,
                        "batch": position + 1, "batches": len(order),
                        "tokens": int(train.lengths[idx].sum())}
                _call(callbacks, "on_step", info)
                if stop["requested"]:
                    run.update(position=position + 1, partial={**acc, "rng_now": rng.bit_generator.state})
                    if ckpt is not None:
                        _save_checkpoint(ckpt, run, model, optimizer, best_params, rng)
                    raise TrainingInterrupted(f"interrupted in epoch {epoch} after batch {position + 1}"
                                              + (f"; checkpoint saved to {ckpt}" if ckpt else ""))
            record, trace_means = _finish_epoch(acc, epoch, optimizer.t, optimizer.lr, model, runner, val)
            run["history"].append(record)
            run["traces"].append(trace_means)
            score = record["val_accuracy"] if "val_accuracy" in record else -record["val_perplexity"]
            if score > run["best_score"]:
                run["best_score"], run["best_epoch"] = score, epoch
                best_params = {k: v.copy() for k, v in model.params.items()}
            elif cfg.patience and epoch - run["best_epoch"] >= cfg.patience:
                run["stopped_early"] = True
            run.update(epoch=epoch, position=0)
            if ckpt is not None:
                _save_checkpoint(ckpt, run, model, optimizer, best_params, rng)
            _call(callbacks, "on_epoch", {**record, "trace": trace_means})
    finally:
        runner.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    optimizer.lr = base_lr
    for k, v in best_params.items():
        model.params[k][...] = v
    best = run["history"][run["best_epoch"] - 1] if run["best_epoch"] else {}
    return {k: run[k] for k in ("history", "traces", "best_epoch", "stopped_early")} | {
        "best_val_accuracy": best.get("val_accuracy"), "steps": optimizer.t}


def _call(callbacks, method: str, info: dict) -> None:
    for cb in callbacks:
        if hasattr(cb, method):
            getattr(cb, method)(info)


def _catch_signals(stop: dict) -> dict:
    """Turn Ctrl-C and SIGTERM into a request to stop after the current step (never mid-update)."""
    def handler(signum, frame):
        if stop["requested"]:              # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["requested"] = True
    try:
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:                     # not the main thread: no signals to catch
        return {}


def _new_epoch_sums(T: int, epoch_start_rng: dict) -> dict:
    return {"loss": 0.0, "correct": 0, "n": 0, "tokens": 0, "seconds": 0.0, "steps": 0,
            "norm_sum": 0.0, "norm_max": 0.0, "clipped": 0, "epoch_start_rng": epoch_start_rng,
            "trace": {}}


def _accumulate(acc, loss, model, shares, data, idx, norm, clipped, seconds) -> None:
    """Add one step to the epoch's sums; shares: the runner's [(positions in the batch, extras)]."""
    n = model.loss_denominator(data.lengths[idx])     # the loss is a mean over n examples or predictions
    acc["loss"] += loss * n
    acc["n"] += n
    acc["tokens"] += int(data.lengths[idx].sum())
    acc["seconds"] += seconds
    acc["steps"] += 1
    acc["norm_sum"] += norm
    acc["norm_max"] = max(acc["norm_max"], norm)
    acc["clipped"] += int(clipped)
    for positions, extras in shares:
        if "logits" in extras:                         # a classifier: count its right answers
            labels = data.labels[idx[positions]]
            acc["correct"] += int(np.sum((extras["logits"] > 0) == (labels > 0.5)))
        for name, (sums, counts) in (extras["trace"] or {}).items():
            T = data.ids.shape[1]
            s, c = acc["trace"].setdefault(name, [np.zeros(T), np.zeros(T, np.int64)])
            s[:len(sums)] += sums
            c[:len(counts)] += counts


def _finish_epoch(acc, epoch, step, lr, model, runner, val) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    scores = {f"val_{k}": v for k, v in evaluate(model, val, runner=runner).items()}
    if "val_accuracy" in scores:
        scores["train_accuracy"] = acc["correct"] / acc["n"]
    record = {"epoch": epoch, "step": step, "train_loss": acc["loss"] / acc["n"], **scores,
              "seconds": acc["seconds"], "val_seconds": time.perf_counter() - t0,
              "tokens_per_s": acc["tokens"] / max(acc["seconds"], 1e-9),
              "lr": lr, "grad_norm_mean": acc["norm_sum"] / acc["steps"], "grad_norm_max": acc["norm_max"],
              "clipped_fraction": acc["clipped"] / acc["steps"]}
    means = {name: [float(s / c) if c else None for s, c in zip(*sc)]
             for name, sc in acc["trace"].items()}
    return record, means


def _save_checkpoint(path: Path, run: dict, model, optimizer, best_params, rng) -> None:
    opt = optimizer.state_dict()
    arrays = {**{f"param/{k}": v for k, v in model.params.items()},
              **{f"best/{k}": v for k, v in best_params.items()},
              **{f"opt/{k}": v for k, v in opt["arrays"].items()}}
    meta = {"run": run, "optimizer_t": opt["t"], "rng": rng.bit_generator.state}
    text = json.dumps(meta, default=lambda a: a.tolist())     # the partial epoch's trace arrays
    arrays["meta_json"] = np.frombuffer(text.encode(), dtype=np.uint8)
    save_arrays(path, arrays)


def _load_checkpoint(path: Path, model, optimizer, rng) -> tuple[dict, dict]:
    """Everything is checked before anything is assigned: a bad checkpoint leaves the model as it was."""
    try:
        arrays = load_arrays(path)
    except InputError as e:
        raise InputError(f"{e}; delete it to restart") from None
    try:
        meta = json.loads(arrays.pop("meta_json").tobytes())
        for k, p in model.params.items():
            for kind in ("param", "best"):
                if arrays[f"{kind}/{k}"].shape != p.shape:
                    raise ValueError(f"{kind}/{k} has shape {arrays[f'{kind}/{k}'].shape}, not {p.shape}")
        opt_arrays = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
        for key, v in opt_arrays.items():
            if v.shape != model.params[key.rsplit("/", 1)[0]].shape:
                raise ValueError(f"optimizer state {key} has shape {v.shape}")
        run, t = meta["run"], int(meta["optimizer_t"])
        rng_probe = np.random.default_rng()
        rng_probe.bit_generator.state = meta["rng"]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a usable checkpoint for this model ({e}); delete it to restart") \
            from None
    for k in model.params:
        model.params[k][...] = arrays[f"param/{k}"]
    optimizer.load_state_dict({"t": t, "arrays": opt_arrays})
    rng.bit_generator.state = meta["rng"]
    return run, {k: arrays[f"best/{k}"] for k in model.params}
