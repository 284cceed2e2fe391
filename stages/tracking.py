"""What an MLflow run logs, for the train, evaluate and probe stages (where runs go: stages/mlstore.py).

One MLflow run per `train@<cell>`: its settings, per-epoch and per-step metrics, the gradient trace
(table and figure) and the model folder. `evaluate@<cell>` reopens that run by the id the train
stage wrote to a run file and adds the test metrics, so one run holds everything about one model.

    tracker = Tracker.start(params, cell="lstm", stage="train@lstm", run_hash=...)
    fit(..., callbacks=[tracker])            # on_step / on_epoch
    tracker.log_artifacts(model_dir, "model")
    tracker.end()

`mlflow.enabled: false` gives a `NullTracker` with the same methods that does nothing (mlflow is
not even imported). Tracking never kills training: once a run has started, a failing store is
warned about once, what could not be logged is counted, and `end()` reports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rnn.errors import InputError
from stages import outputs, settings
from stages.mlstore import TrackingUnavailable, connect, one_line
from stages.plots import grad_trace_figure

STEP_METRICS = ("loss", "grad_norm", "grad_norm_clipped", "clipped")
# MLflow metric name -> key of rnn.train.fit's per-epoch record.
EPOCH_METRICS = {
    "train_loss": "train_loss",
    "train_accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
    "epoch_seconds": "seconds",
    "val_seconds": "val_seconds",
    "tokens_per_s": "tokens_per_s",
    "grad_norm_mean": "grad_norm_mean",
    "grad_norm_max": "grad_norm_max",
    "clipped_fraction": "clipped_fraction",
}
TRACE_DIR = "grad_trace"

# MLflow's limits (mlflow.utils.validation), repeated so that importing this module stays cheap.
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# Step metrics kept while the store is failing, before the oldest are dropped (and counted lost).
MAX_PENDING_METRICS = 400_000


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"train.clip.mode": "norm", ...} with MLflow-sized string values.

    Lists and scalars are JSON (`true`, `null`, `[64, 128]`); strings stay as they are.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = _param_value(value)
    return flat


def _git_commit(cwd: str | Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


class NullTracker:
    """What `Tracker.start`/`resume` return when `mlflow.enabled` is false: does nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None

    def log_params(self, flat: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def on_step(self, info: Mapping[str, Any]) -> None:
        pass

    def on_epoch(self, info: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

    def run_record(self) -> dict:
        """{run_id, tracking_uri, experiment_id}, the run file `Tracker.resume` reads; all null
        when tracking is off (still written, so a DVC stage declaring the file is satisfied)."""
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id}

    def end(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end(_exit_status(exc_type))


def _exit_status(exc_type) -> str:
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"


class Tracker(NullTracker):
    """One MLflow run, written through `MlflowClient` (no global active-run state).

    Per-step metrics are buffered and sent with `log_batch` every `log_every_steps` steps and at
    each epoch end: one request per call costs ~3-8 ms against SQLite and more over HTTP.
    """

    def __init__(self, client: Any, run_id: str, experiment_id: str, tracking_uri: str, cell: str,
                 log_every_steps: int, resumed: bool = False) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.cell = cell
        self.log_every_steps = log_every_steps
        self.resumed = resumed
        self.lost = {"metrics": 0, "params": 0, "tags": 0, "artifacts": 0, "status updates": 0}
        self.first_error: str | None = None
        self._pending: list = []          # mlflow.entities.Metric not yet sent
        self._steps_since_flush = 0
        self._failing = False             # after a failed flush only epoch ends / end() retry
        self._traces: dict[int, dict] = {}       # epoch -> fit's trace of that epoch
        self._ended = False

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def start(cls, params: settings.Params, cell: str, stage: str, run_hash: str | None = None) -> NullTracker:
        """Create the run of `stage` (e.g. "train@lstm") for `cell`, or a NullTracker if disabled.
        `run_hash` (settings.run_hash) becomes the `params_hash` tag: equal hash, same setup.

        Raises TrackingUnavailable (one line) when the store cannot be reached or used.
        """
        cfg = params["mlflow"]
        if not cfg["enabled"]:
            return NullTracker()
        client, uri, experiment_id = connect(cfg["experiment"])
        exp_name = os.environ.get("DVC_EXP_NAME") or None
        tags = {
            "cell": cell,
            "dvc.stage": stage,
            "dvc.stages": stage,
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": stage,
        }
        if run_hash:
            tags["params_hash"] = run_hash
        if exp_name:
            tags["dvc.exp_name"] = exp_name
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            tags["dvc.baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
        # The client API does not set it (only the fluent API's context providers do). Taken in
        # cwd: in a queued experiment that is the copy being run, whose HEAD is the baseline.
        commit = _git_commit(os.getcwd()) or os.environ.get("DVC_EXP_BASELINE_REV")
        if commit:
            tags["mlflow.source.git.commit"] = commit
        train_run = stage.startswith("train@")
        base_name = cell if train_run else stage          # e.g. "probe@lstm" beside "lstm"
        run_name = f"{base_name} ({exp_name})" if exp_name else base_name
        try:
            run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        except Exception as exc:
            raise TrackingUnavailable(f"MLflow store {uri}: cannot create a run: {one_line(exc)}") from None
        tracker = cls(client, run.info.run_id, experiment_id, uri, cell, cfg["log_every_steps"])
        if train_run:     # other stages (the probe) log their own settings
            # Effective values, so runs of different cells compare key by key; what this cell
            # overrides is kept as one param to show why its values differ.
            flat = flatten(settings.cell_settings(params, cell), "train")
            flat["train.overrides"] = _param_value(params["train"]["overrides"].get(cell, {}))
            flat["train.workers"] = _param_value(params["train"]["workers"])
            tracker.log_params(flat)
        return tracker

    @classmethod
    def resume(cls, params: settings.Params, run_file_path: str | Path, stage: str) -> NullTracker:
        """Reopen the run recorded in `run_file_path` (by `write_run_file`) to add to it.

        A run file without a run (tracking was off at train time) or a run that is not in the
        current store gives a new run instead, with a warning.
        """
        cfg = params["mlflow"]
        if not cfg["enabled"]:
            return NullTracker()
        path = Path(run_file_path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: MLflow run file not found (written by the train stage)") from None
        except json.JSONDecodeError:
            raise InputError(f"{path}: not a valid MLflow run file (invalid JSON)") from None
        if not isinstance(record, dict) or "run_id" not in record:
            raise InputError(f"{path}: not a valid MLflow run file (no run_id)")
        cell = stage.partition("@")[2] or stage
        run_id = record["run_id"]
        if run_id is None:
            _warn(f"{path} names no run (tracking was off when training); starting a new run")
            return cls.start(params, cell, stage)
        client, uri, experiment_id = connect(cfg["experiment"])
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise TrackingUnavailable(f"MLflow store {uri}: cannot read run {run_id}: {one_line(exc)}") from None
            _warn(f"run {run_id} from {path} is not in {uri}; starting a new run")
            return cls.start(params, cell, stage)
        cell = run.data.tags.get("cell", cell)
        tracker = cls(client, run_id, run.info.experiment_id, uri, cell, cfg["log_every_steps"], resumed=True)
        stages = run.data.tags.get("dvc.stages", "")
        if stage not in stages.split(","):
            tracker._set_tags({"dvc.stages": f"{stages},{stage}" if stages else stage})
        return tracker

    # -- logging ------------------------------------------------------------------------------

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log params (values made strings of at most 6000 chars), 100 per request."""
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            chunk = items[i:i + MAX_PARAMS_PER_BATCH]
            self._call("params", len(chunk), self.client.log_batch, self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics now (e.g. the test metrics); non-numbers raise TypeError."""
        self._add(metrics, step or 0)
        self._flush()

    def on_step(self, info: Mapping[str, Any]) -> None:
        """rnn.train.fit callback: buffer loss/grad_norm/grad_norm_clipped/clipped at the global step."""
        self._add({k: info[k] for k in STEP_METRICS}, int(info["step"]))
        self._steps_since_flush += 1
        if self._steps_since_flush >= self.log_every_steps and not self._failing:
            self._flush()

    def on_epoch(self, info: Mapping[str, Any]) -> None:
        """rnn.train.fit callback: epoch metrics (step = epoch), flush, and the gradient trace."""
        epoch = int(info["epoch"])
        self._add({name: info[key] for name, key in EPOCH_METRICS.items() if key in info}, epoch)
        self._flush()
        if info.get("trace"):
            self._traces[epoch] = dict(info["trace"])
            self._log_trace()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("artifacts", 1, self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._call("artifacts", 1, self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def _log_trace(self) -> None:
        """The traces so far as grad_trace/grad_trace.csv (schema: stages/outputs.py) and .png, so
        that a run stopped in a later epoch still shows them."""
        rows = outputs.trace_rows(self._traces)
        epochs = sorted({1, outputs.last_epoch(rows)})
        fig = grad_trace_figure({f"epoch {e}": outputs.trace_series(rows, e) for e in epochs},
                                f"{self.cell}: gradient norm by distance from the last token")
        with tempfile.TemporaryDirectory(prefix="rnn-trace-") as tmp:
            folder = Path(tmp) / TRACE_DIR
            folder.mkdir()
            (folder / "grad_trace.csv").write_text(outputs.trace_csv(rows), encoding="utf-8")
            fig.savefig(folder / "grad_trace.png", dpi=110, bbox_inches="tight")
            self.log_artifacts(folder, TRACE_DIR)

    def end(self, status: str = "FINISHED") -> None:
        """Send what is buffered, close the run (a resumed run keeps the train stage's status)
        and report on stderr anything that could not be logged. Safe to call twice."""
        if self._ended:
            return
        self._ended = True
        self._flush()
        if not self.resumed:
            self._call("status updates", 1, self.client.set_terminated, self.run_id, status)
        lost = {k: v for k, v in self.lost.items() if v}
        if lost:
            what = ", ".join(f"{v} {k}" for k, v in lost.items())
            _warn(f"could not log {what} to run {self.run_id} at {self.tracking_uri} "
                  f"(first error: {self.first_error}); the local outputs are complete")

    # -- internals ----------------------------------------------------------------------------

    def _add(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, str) or not hasattr(value, "__float__"):
                raise TypeError(f"metric {key} = {value!r} is not a number")
            self._pending.append(Metric(key, float(value), now, step))
        excess = len(self._pending) - MAX_PENDING_METRICS
        if excess > 0:
            del self._pending[:excess]
            self.lost["metrics"] += excess

    def _flush(self) -> None:
        self._steps_since_flush = 0
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            if not self._call("metrics", 0, self.client.log_batch, self.run_id, metrics=chunk):
                self._failing = True       # keep them; retried at the epoch end, lost at end()
                if self._ended:
                    self.lost["metrics"] += len(self._pending)
                    self._pending.clear()
                return
            del self._pending[:len(chunk)]
        self._failing = False

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("tags", len(tags), self.client.log_batch, self.run_id,
                   tags=[RunTag(k, v) for k, v in tags.items()])

    def _call(self, kind: str, count: int, fn, *args, **kwargs) -> bool:
        """Run one store call; a failure is counted under `kind`, warned about once, not raised."""
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - any store failure must not stop training
            self.lost[kind] += count
            if self.first_error is None:
                self.first_error = one_line(exc)
                _warn(f"logging to {self.tracking_uri} failed ({self.first_error}); training goes on, "
                      "what cannot be logged is counted and reported at the end")
            return False


def _warn(message: str) -> None:
    print(f"warning: mlflow: {message}", file=sys.stderr, flush=True)


