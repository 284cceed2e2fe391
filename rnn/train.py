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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import TrainConfig
from .data import batches
from .errors import InputError
from .io import load_arrays, save_arrays
from .losses import bce_with_logits
from .model import Model
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


@dataclass
class EpochSums:
    """The running sums of the epoch in progress, from which its record is made."""
    loss: float = 0.0            # sum over steps of the batch loss times its denominator
    n: int = 0                   # ... the denominators: examples, or the language model's predictions
    correct: int = 0             # a classifier's right answers
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    norm_sum: float = 0.0        # of the gradient norms before clipping
    norm_max: float = 0.0
    clipped: int = 0             # steps whose gradient was clipped
    trace: dict = field(default_factory=dict)    # name -> [sums (T,), counts (T,)] by distance


@dataclass
class TrainState:
    """Where a run stands: with the model's parameters, the optimizer's state and the rng's, all
    that fit carries from step to step, and so the checkpoint (`save`, `load`)."""
    best_params: dict                            # name -> array: the best epoch's parameters
    averaged: dict | None = None                 # name -> array: the weights' moving average (ema_decay)
    epoch: int = 0                               # epochs finished
    history: list = field(default_factory=list)  # per finished epoch: its record
    traces: list = field(default_factory=list)   # ... and its gradient trace means
    best_epoch: int = 0                          # 0: none yet
    best_score: float = -np.inf                  # the best epoch's validation accuracy, or -perplexity
    stopped_early: bool = False
    position: int = 0                            # batches of epoch `epoch + 1` done
    epoch_rng: dict | None = None                # the rng state that epoch's batch order came from
    sums: EpochSums | None = None                # that epoch's sums so far; None between epochs

    def save(self, path: Path, model, optimizer: Optimizer, rng: np.random.Generator) -> None:
        """Write the checkpoint: this state, every field of it, with the model's parameters, the
        optimizer's state and the rng's."""
        opt = optimizer.state_dict()
        arrays = {**{f"param/{k}": v for k, v in model.params.items()},
                  **{f"best/{k}": v for k, v in self.best_params.items()},
                  **{f"averaged/{k}": v for k, v in (self.averaged or {}).items()},
                  **{f"opt/{k}": v for k, v in opt["arrays"].items()}}
        state = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in ("best_params", "averaged")}
        state["sums"] = asdict(self.sums) if self.sums is not None else None
        meta = {"state": state, "optimizer_t": opt["t"], "rng": rng.bit_generator.state}
        text = json.dumps(meta, default=lambda a: a.tolist())     # the partial epoch's trace arrays
        arrays["meta_json"] = np.frombuffer(text.encode(), dtype=np.uint8)
        save_arrays(path, arrays)

    @classmethod
    def load(cls, path: Path, model, optimizer: Optimizer, rng: np.random.Generator) -> "TrainState":
        """The state saved in `path`, whose parameters, optimizer state and rng state are put into
        `model`, `optimizer` and `rng`. Everything is checked before anything is assigned: a bad
        checkpoint raises InputError and leaves them as they were."""
        try:
            arrays = load_arrays(path)
        except InputError as e:
            raise InputError(f"{e}; delete it to restart") from None
        try:
            meta = json.loads(arrays.pop("meta_json").tobytes())
            has_average = any(k.startswith("averaged/") for k in arrays)
            kinds = ("param", "best", "averaged") if has_average else ("param", "best")
            for k, p in model.params.items():
                for kind in kinds:
                    if arrays[f"{kind}/{k}"].shape != p.shape:
                        raise ValueError(f"{kind}/{k} has shape {arrays[f'{kind}/{k}'].shape}, not {p.shape}")
            opt_arrays = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
            for key, v in opt_arrays.items():
                if v.shape != model.params[key.rsplit("/", 1)[0]].shape:
                    raise ValueError(f"optimizer state {key} has shape {v.shape}")
            averaged = {k: arrays[f"averaged/{k}"] for k in model.params} if has_average else None
            state = cls(best_params={k: arrays[f"best/{k}"] for k in model.params}, averaged=averaged,
                        **meta["state"])
            if state.sums is not None:
                state.sums = EpochSums(**state.sums)
                state.sums.trace = {k: [np.array(s), np.array(c)] for k, (s, c) in state.sums.trace.items()}
            t = int(meta["optimizer_t"])
            np.random.default_rng().bit_generator.state = meta["rng"]     # a valid rng state?
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: not a usable checkpoint for this model ({e}); delete it to restart") \
                from None
        for k in model.params:
            model.params[k][...] = arrays[f"param/{k}"]
        optimizer.load_state_dict({"t": t, "arrays": opt_arrays})
        rng.bit_generator.state = meta["rng"]
        return state


def fit(model: Model, optimizer: Optimizer, train: Dataset, val: Dataset, cfg: TrainConfig,
        rng: np.random.Generator, checkpoint_dir: str | Path | None = None, callbacks=()) -> dict:
    """Train `model` in place and return the run's record.

    rng draws the data order and each step's seed (dropout masks); `checkpoint_dir`, when given,
    receives a checkpoint after every epoch (and on Ctrl-C / SIGTERM) and an existing one there is
    resumed. At the end the parameters of the epoch with the best validation score (accuracy of a
    classifier, perplexity of a language model) are restored. With cfg.ema_decay > 0 those are the
    moving average of the weights (which is what validation then scores), not the weights themselves.
    With cfg.workers > 1 one pool of worker processes serves the whole run, validation included;
    the result depends on the number of workers only through float rounding.

    Returns {"history": [per-epoch dicts], "traces": [per-epoch {"a": mean norm by distance, ...}],
    "best_epoch", "best_val_accuracy" (None for a language model), "stopped_early", "steps"}.
    """
    workers = resolve_workers(cfg.workers)
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        state = TrainState.load(ckpt, model, optimizer, rng)
    else:
        state = TrainState(best_params={k: v.copy() for k, v in model.params.items()})
    if cfg.ema_decay and state.averaged is None:
        state.averaged = {k: v.copy() for k, v in model.params.items()}

    base_lr = optimizer.lr           # the schedule follows from the epoch: resuming needs no state
    runner = make_runner(model, train._asdict(), workers)    # starts the worker processes, if any
    stop = {"requested": False}
    handlers = _catch_signals(stop)
    try:
        while state.epoch < cfg.epochs and not state.stopped_early:
            epoch = state.epoch + 1
            optimizer.lr = base_lr * cfg.lr_decay ** (epoch - 1)
            if not train_epoch(state, model, optimizer, runner, train, cfg, rng, stop, callbacks):
                if ckpt is not None:
                    state.save(ckpt, model, optimizer, rng)
                raise TrainingInterrupted(f"interrupted in epoch {epoch} after batch {state.position}"
                                          + (f"; checkpoint saved to {ckpt}" if ckpt else ""))
            with _swapped_in(model, state.averaged):      # validate (and keep) the average, if any
                record, trace_means = _finish_epoch(state.sums, epoch, optimizer, model, runner, val)
                _end_epoch(state, record, trace_means, model, cfg.patience)
            if ckpt is not None:
                state.save(ckpt, model, optimizer, rng)
            _call(callbacks, "on_epoch", {**record, "trace": trace_means})
    finally:
        runner.close()
        optimizer.lr = base_lr
        for sig, h in handlers.items():
            signal.signal(sig, h)
    for k, v in state.best_params.items():
        model.params[k][...] = v
    best = state.history[state.best_epoch - 1] if state.best_epoch else {}
    return {"history": state.history, "traces": state.traces, "best_epoch": state.best_epoch,
            "stopped_early": state.stopped_early, "best_val_accuracy": best.get("val_accuracy"),
            "steps": optimizer.t}


def train_epoch(state: TrainState, model, optimizer: Optimizer, runner, train: Dataset, cfg: TrainConfig,
                rng: np.random.Generator, stop: dict, callbacks=()) -> bool:
    """Train epoch `state.epoch + 1` from batch `state.position` on, for a classifier or a language
    model alike, adding each step to `state.sums`. Returns False when a stop was requested (see
    `_catch_signals`) before the epoch's last batch was done, True at the end of the epoch."""
    epoch = state.epoch + 1
    if state.sums is None:                       # a new epoch, not one resumed from a checkpoint
        state.epoch_rng, state.sums, state.position = rng.bit_generator.state, EpochSums(), 0
    now = rng.bit_generator.state
    rng.bit_generator.state = state.epoch_rng    # the batch order is drawn at the epoch's start
    order = batches(train.lengths, cfg.batch_size, rng)
    if state.position:
        rng.bit_generator.state = now
    epoch_lr = optimizer.lr
    for position in range(state.position, len(order)):
        t0 = time.perf_counter()
        if cfg.warmup_steps:         # small first updates: the new output layer's early gradients are
            ramp = min(1.0, (optimizer.t + 1) / cfg.warmup_steps)    # large and would undo pretraining
            optimizer.lr = epoch_lr * ramp
        idx = order[position]
        trace = cfg.trace and optimizer.t % cfg.trace_every == 0
        seed = int(rng.integers(2**63))          # the step's seed: its dropout masks come from it
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
        for k, a in (state.averaged or {}).items():
            a += (1.0 - cfg.ema_decay) * (model.params[k] - a)
        _accumulate(state.sums, loss, model, shares, train, idx, pre, clipped, time.perf_counter() - t0)
        state.position = position + 1
        info = {"epoch": epoch, "step": optimizer.t, "loss": loss, "grad_norm": pre,
                "grad_norm_clipped": post, "clipped": clipped, "group_norms": norms,
                "batch": position + 1, "batches": len(order), "tokens": int(train.lengths[idx].sum())}
        _call(callbacks, "on_step", info)
        if stop["requested"]:
            return False                     # fit raises, and puts the optimizer's own rate back
    optimizer.lr = epoch_lr                  # the epoch's record reports its rate, not the ramp's last step
    return True


def _end_epoch(state: TrainState, record: dict, trace_means: dict, model, patience: int) -> None:
    """Record a finished epoch; keep its parameters if it scored best, stop early if it is
    `patience` epochs since the best."""
    epoch = record["epoch"]
    state.history.append(record)
    state.traces.append(trace_means)
    score = (record["val_accuracy"] if model.config.task == "sentiment" else -record["val_perplexity"])
    if score > state.best_score:
        state.best_score, state.best_epoch = score, epoch
        state.best_params = {k: v.copy() for k, v in model.params.items()}
    elif patience and epoch - state.best_epoch >= patience:
        state.stopped_early = True
    state.epoch, state.position, state.epoch_rng, state.sums = epoch, 0, None, None


@contextmanager
def _swapped_in(model, params: dict | None):
    """Put `params` into the model's arrays (in place: worker processes share them) for the block's
    duration, then the model's own back; None: leave the model as it is."""
    if params is None:
        yield
        return
    own = {k: v.copy() for k, v in model.params.items()}
    for k, v in params.items():
        model.params[k][...] = v
    try:
        yield
    finally:
        for k, v in own.items():
            model.params[k][...] = v


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


def _accumulate(sums: EpochSums, loss, model, shares, data, idx, norm, clipped, seconds) -> None:
    """Add one step to the epoch's sums; shares: the runner's [(positions in the batch, extras)]."""
    n = model.loss_denominator(data.lengths[idx])     # the loss is a mean over n examples or predictions
    sums.loss += loss * n
    sums.n += n
    sums.tokens += int(data.lengths[idx].sum())
    sums.seconds += seconds
    sums.steps += 1
    sums.norm_sum += norm
    sums.norm_max = max(sums.norm_max, norm)
    sums.clipped += int(clipped)
    T = data.ids.shape[1]
    for positions, extras in shares:
        if model.config.task == "sentiment":           # a classifier: count its right answers
            labels = data.labels[idx[positions]]
            sums.correct += int(np.sum((extras["logits"] > 0) == (labels > 0.5)))
        for name, (step_sums, counts) in (extras["trace"] or {}).items():
            s, c = sums.trace.setdefault(name, [np.zeros(T), np.zeros(T, np.int64)])
            s[:len(step_sums)] += step_sums
            c[:len(counts)] += counts


def _finish_epoch(sums: EpochSums, epoch: int, optimizer: Optimizer, model, runner, val: Dataset
                  ) -> tuple[dict, dict]:
    """The epoch's record (its sums and the validation scores) and its gradient trace means."""
    t0 = time.perf_counter()
    scores = {f"val_{k}": v for k, v in evaluate(model, val, runner=runner).items()}
    if model.config.task == "sentiment":
        scores["train_accuracy"] = sums.correct / sums.n
    record = {"epoch": epoch, "step": optimizer.t, "train_loss": sums.loss / sums.n, **scores,
              "seconds": sums.seconds, "val_seconds": time.perf_counter() - t0,
              "tokens_per_s": sums.tokens / max(sums.seconds, 1e-9),
              "lr": optimizer.lr, "grad_norm_mean": sums.norm_sum / sums.steps, "grad_norm_max": sums.norm_max,
              "clipped_fraction": sums.clipped / sums.steps}
    means = {name: [float(s / c) if c else None for s, c in zip(*sc)]
             for name, sc in sums.trace.items()}
    return record, means
