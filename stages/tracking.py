"""What an MLflow run logs, for the train, evaluate, pretrain and probe stages (where runs go: stages/mlstore.py).

One MLflow run per `train@<cell>`: its settings, the datasets it read (with their DVC hashes), per-epoch
and per-step metrics, CPU and memory, the gradient trace (as metric series and as table and figure)
and the trained model as an MLflow model (stages/pyfunc_model.py: raw text in, P(positive) out).
`evaluate@<cell>` finds the run that produced models/<cell>/ by the folder's digest (tag
`model_digest`) and adds the test metrics to it, so one run holds everything about one model; no run
id is written into the model folder, which stays byte-identical for identical training.

    tracker = Tracker.start(params, cell="lstm", stage="train@lstm", run_hash=..., run_file=...)
    fit(..., callbacks=[tracker])            # on_step / on_epoch
    tracker.log_summary(metrics, traces); tracker.log_model(model_dir)
    tracker.end()

Metric names are chosen for MLflow's chart view, which makes one section per prefix before "/" and
sorts the sections by name, system metrics last (MLflow 3.17, RunsChartsCardConfig.
getBaseChartAndSectionConfigs): accuracy/ (test, and the train and val curves by epoch), gradient/
(log10 |dL/da| by distance from the last token: the three cells' curves overlay in one chart),
loss/, probe/, test/, train/ (per-step and per-epoch diagnostics), val/, system/.

`mlflow.enabled: false` gives a `NullTracker` with the same methods that does nothing (mlflow is
not even imported). Tracking never kills training: once a run has started, a failing store is
warned about once, what could not be logged is counted, and `end()` reports it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages import outputs, settings
from stages.mlstore import TrackingUnavailable, connect, one_line
from stages.plots import grad_trace_figure

# rnn.train.fit's per-step record -> metric (step = optimizer step).
STEP_METRICS = {"loss": "train/step_loss", "grad_norm": "train/step_grad_norm",
                "grad_norm_clipped": "train/step_grad_norm_clipped", "clipped": "train/step_clipped"}
# fit's per-epoch record -> metric (step = epoch): the learning curves first.
EPOCH_METRICS = {
    "train_accuracy": "accuracy/train",
    "val_accuracy": "accuracy/val",
    "val_perplexity": "perplexity/val",
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "train/lr",
    "seconds": "train/epoch_seconds",
    "tokens_per_s": "train/tokens_per_s",
    "grad_norm_mean": "train/grad_norm_mean",
    "grad_norm_max": "train/grad_norm_max",
    "clipped_fraction": "train/clipped_fraction",
    "val_seconds": "val/seconds",
}
# metrics/<cell>/train.json -> metric (step 0), when training ends.
SUMMARY_METRICS = {
    "best_val_accuracy": "accuracy/val_best",
    "best_epoch": "train/best_epoch",
    "epochs_run": "train/epochs_run",
    "stopped_early": "train/stopped_early",
    "steps": "train/steps",
    "train_seconds": "train/seconds",
    "wall_seconds": "train/wall_seconds",
    "num_parameters": "train/num_parameters",
    "resumed": "train/resumed",
}
# rnn.metrics.binary_metrics -> metric (step 0), logged by evaluate.
TEST_METRICS = {"accuracy": "accuracy/test", "log_loss": "loss/test", "f1": "test/f1",
                "precision": "test/precision", "recall": "test/recall", "roc_auc": "test/roc_auc"}
ACCURACY_BY_LENGTH = "test/accuracy_by_length"      # step = the bucket's shortest review (tokens)


def grad_metric(state: str, when: str) -> str:
    """Metric of log10 |dL/d<state>| by distance from the last token, e.g. gradient/log10_dL_da_last_epoch
    (state a: the hidden state; c: the LSTM's memory cell). when: first_epoch | last_epoch."""
    return f"gradient/log10_dL_d{state}_{when}"


# The UI draws a run in the colour of its `mlflow.runColor` tag, else in one hashed from its id (two
# cells may then share one). These are the cells' colours in reports/*.png (matplotlib's C0-C2).
RUN_COLOR = "mlflow.runColor"
CELL_COLORS = {"rnn": "#1f77b4", "gru": "#ff7f0e", "lstm": "#2ca02c"}
# The experiments' descriptions in the UI (set once; an edit made in the UI is kept).
NOTE = "mlflow.note.content"
EXPERIMENT_NOTES = {
    "train": "One run per `train@<cell>` stage of the DVC pipeline; `evaluate@<cell>` adds the test "
             "metrics to it. Chart sections: `accuracy/` and `loss/` by epoch (bars: test, best "
             "validation), `gradient/` log10 of the mean gradient norm by distance from the last token "
             "(the chart's step is the distance: the vanishing gradient), `test/`, `train/` by step and "
             "by epoch, system metrics. Sweeps: group by the tag `dvc.exp_name` or by a param.",
    "pretrain": "One run per `pretrain@<cell>` stage: the cell trained as a next-token language model "
                "on the training part and the unlabelled reviews. `perplexity/val` by epoch (full "
                "softmax on validation reviews), `loss/train` (sampled softmax), `train/` by step.",
    "probe": "One run per `probe@<cell>` stage: the memory probe. `probe/accuracy` by distance of the "
             "decisive token from the end (the chart's step is the distance), `probe/log10_dL_d*` the "
             "gradient by steps from the end at the largest distance, over the first and last steps.",
}
TRACE_DIR = "grad_trace"
MODEL_NAME = "model"         # `runs:/<run id>/model` loads the logged model of that name
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE = ["A wonderful, moving film with a great cast.", "Two hours I will never get back."]
DATASET_CONTEXT = {"train": "training", "val": "validation", "test": "testing"}

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


def model_digest(folder: str | Path) -> str:
    """sha256 over a model folder's file names and bytes: the `model_digest` tag of the run that
    trained it. Equal folders give equal digests on any machine (after `dvc pull` too)."""
    folder = Path(folder)
    lines = [f"{f.relative_to(folder).as_posix()} {outputs.file_digest(f)}\n"
             for f in sorted(folder.rglob("*")) if f.is_file()]
    if not lines:
        raise FileNotFoundError(f"{folder}: no model files")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def dvc_md5(path: str | Path) -> str:
    """md5 of a file's bytes: the hash DVC 3 records for it in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log10_series(values: Sequence[float | None]) -> list[tuple[int, float]]:
    """(index, log10 value) of the positive entries: a gradient trace by distance as metric points.
    Distances no sequence reached (None) and norms flushed to 0 have no logarithm and are left out."""
    return [(i, math.log10(v)) for i, v in enumerate(values) if v is not None and v > 0]


class NullTracker:
    """What `Tracker.start`/`for_model` return when `mlflow.enabled` is false: does nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    model_id: str | None = None

    def log_params(self, flat: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_series(self, key: str, values: Sequence[float | None]) -> None:
        pass

    def log_datasets(self, root: Path, rows: Mapping[str, int]) -> None:
        pass

    def on_step(self, info: Mapping[str, Any]) -> None:
        pass

    def on_epoch(self, info: Mapping[str, Any]) -> None:
        pass

    def log_summary(self, metrics: Mapping[str, Any], traces: Sequence[Mapping[str, list]]) -> None:
        pass

    def log_model(self, folder: Path) -> None:
        pass

    def log_test_metrics(self, scores: Mapping[str, Any], buckets: Sequence[Mapping[str, Any]]) -> None:
        pass

    def set_model_digest(self, folder: Path) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass

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
                 log_every_steps: int, resumed: bool = False, continued: bool = False) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.cell = cell
        self.log_every_steps = log_every_steps
        self.resumed = resumed            # another stage's run: its status is left alone
        self.continued = continued        # this stage's own run from an interrupted attempt
        self.lost = {"metrics": 0, "params": 0, "tags": 0, "artifacts": 0, "datasets": 0, "models": 0,
                     "status updates": 0}
        self.first_error: str | None = None
        self.model_id: str | None = None          # the run's logged model
        self.register_as: str | None = None       # registered model name for log_model, if any
        self.datasets: dict[str, tuple[str, str]] = {}    # split -> (name, digest) as logged
        self._pending: list = []          # mlflow.entities.Metric not yet sent
        self._steps_since_flush = 0
        self._failing = False             # after a failed flush only epoch ends / end() retry
        self._traces: dict[int, dict] = {}       # epoch -> fit's trace of that epoch
        self._monitor = None              # mlflow's SystemMetricsMonitor while training
        self._ended = False

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def start(cls, params: settings.Params, cell: str, stage: str, run_hash: str | None = None,
              run_file: str | Path | None = None, resume: bool = False) -> NullTracker:
        """The run of `stage` (e.g. "train@lstm") for `cell`, or a NullTracker if disabled.
        `run_hash` (settings.run_hash) becomes the `params_hash` tag: equal hash, same setup.

        run_file: where the run's id is kept (beside the training checkpoint). With `resume` (a
        checkpoint is being resumed) the run named there continues, if the current store has it;
        otherwise a new run starts and the file is (re)written.

        Raises TrackingUnavailable (one line) when the store cannot be reached or used.
        """
        cfg = params["mlflow"]
        if not cfg["enabled"]:
            return NullTracker()
        kind = stage.partition("@")[0] if stage.startswith(("probe@", "pretrain@")) else "train"
        experiment = {"probe": cfg["probe_experiment"], "pretrain": cfg["pretrain_experiment"]}.get(kind, cfg["experiment"])
        client, uri, experiment_id = connect(experiment)
        _describe(client, experiment_id, EXPERIMENT_NOTES[kind])
        tracker = None
        if resume and run_file is not None:
            tracker = cls._continue(client, uri, Path(run_file), cell, cfg["log_every_steps"])
        if tracker is None:
            tracker = cls._create(client, uri, experiment_id, params, cell, stage, run_hash)
            if run_file is not None:
                from rnn.io import write_json

                write_json(run_file, {"run_id": tracker.run_id, "tracking_uri": uri,
                                      "experiment_id": tracker.experiment_id})
        if cfg["register"] and stage.startswith("train@"):
            tracker.register_as = f"{cfg['experiment']}-{cell}"
        if stage.startswith(("train@", "probe@", "pretrain@")):
            tracker._start_system_metrics(cfg["system_metrics_every"])
        return tracker

    @classmethod
    def _create(cls, client: Any, uri: str, experiment_id: str, params: settings.Params, cell: str,
                stage: str, run_hash: str | None) -> "Tracker":
        exp_name = os.environ.get("DVC_EXP_NAME") or None
        tags = {
            "cell": cell,
            RUN_COLOR: CELL_COLORS.get(cell, "#7f7f7f"),
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
        tracker = cls(client, run.info.run_id, experiment_id, uri, cell, params["mlflow"]["log_every_steps"])
        if train_run:     # other stages (probe, pretrain) log their own settings
            # Effective values, so runs of different cells compare key by key; what this cell
            # overrides is kept as one param to show why its values differ.
            flat = flatten(settings.cell_settings(params, cell), "train")
            flat["train.overrides"] = _param_value(params["train"]["overrides"].get(cell, {}))
            flat["train.workers"] = _param_value(params["train"]["workers"])
            tracker.log_params(flat)
        return tracker

    @classmethod
    def _continue(cls, client: Any, uri: str, run_file: Path, cell: str, log_every_steps: int) -> "Tracker | None":
        """The run an interrupted training attempt recorded in `run_file`, set running again; None
        (with a warning) when there is no usable record or the store does not have that run."""
        try:
            record = json.loads(run_file.read_text(encoding="utf-8"))
            run_id = record["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            _warn(f"{run_file}: no usable run record; the resumed training starts a new run")
            return None
        if record.get("tracking_uri") != uri:
            _warn(f"run {run_id} was logged to {record.get('tracking_uri')}, not {uri}; the resumed "
                  "training starts a new run")
            return None
        try:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
        except Exception as exc:
            _warn(f"cannot continue run {run_id} ({one_line(exc)}); the resumed training starts a new run")
            return None
        print(f"{cell}: continuing MLflow run {run_id}", flush=True)
        return cls(client, run_id, run.info.experiment_id, uri, cell, log_every_steps, continued=True)

    @classmethod
    def for_model(cls, params: settings.Params, model_dir: str | Path, stage: str) -> NullTracker:
        """The run that trained the model in `model_dir` (the newest run tagged with its
        `model_digest`), to add to it; a new run with a warning when the store has none (tracking
        was off when training, another store, or a model folder from elsewhere)."""
        cfg = params["mlflow"]
        if not cfg["enabled"]:
            return NullTracker()
        cell = stage.partition("@")[2] or stage
        digest = model_digest(model_dir)
        client, uri, experiment_id = connect(cfg["experiment"])
        try:
            runs = client.search_runs([experiment_id], filter_string=f"tags.model_digest = '{digest}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        except Exception as exc:
            raise TrackingUnavailable(f"MLflow store {uri}: cannot search runs: {one_line(exc)}") from None
        if not runs:
            _warn(f"no run in {uri} (experiment {cfg['experiment']!r}) trained the model in {model_dir} "
                  f"(tag model_digest = {digest[:12]}...); starting a new run")
            tracker = cls.start(params, cell, stage)
            tracker._set_tags({"model_digest": digest})
            return tracker
        run = client.get_run(runs[0].info.run_id)       # search results carry no outputs
        tracker = cls(client, run.info.run_id, run.info.experiment_id, uri, run.data.tags.get("cell", cell),
                      cfg["log_every_steps"], resumed=True)
        outputs_ = run.outputs.model_outputs if run.outputs else []
        tracker.model_id = outputs_[-1].model_id if outputs_ else None
        stages = run.data.tags.get("dvc.stages", "")
        if stage not in stages.split(","):
            tracker._set_tags({"dvc.stages": f"{stages},{stage}" if stages else stage})
        return tracker

    def _start_system_metrics(self, every: float) -> None:
        """CPU, memory, disk and network every `every` seconds as system/... metrics, by MLflow's
        own monitor (a thread; it needs psutil and stops when the run ends)."""
        if every <= 0:
            return
        try:
            import logging

            import psutil  # noqa: F401 - the monitor's dependency, optional in MLflow
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every,
                                                 resume_logging=self.continued, tracking_uri=self.tracking_uri)
            self._monitor.start()
        except ImportError:
            self._monitor = None
        except Exception as exc:  # noqa: BLE001 - training goes on without system metrics
            self._monitor = None
            _warn(f"no system metrics: {one_line(exc)}")

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

    def log_series(self, key: str, values: Sequence[float | None]) -> None:
        """A curve as one metric with step = index, in log10 (see `log10_series`): e.g. a gradient
        trace with step = distance from the last token."""
        for step, value in log10_series(values):
            self._add({key: value}, step)
        self._flush()

    def log_datasets(self, root: Path, rows: Mapping[str, int]) -> None:
        """data/prepared/<split>.npz as the run's dataset inputs imdb-<split>, digest = the file's
        DVC hash: the run links to the data version (the same digest as in dvc.lock).
        rows: {split: number of reviews}."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for split, n in rows.items():
            rel = f"data/prepared/{split}.npz"
            name, digest = f"imdb-{split}", dvc_md5(root / rel)
            dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": rel}),
                              profile=json.dumps({"num_rows": int(n), "dvc_md5": digest}))
            inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", DATASET_CONTEXT[split])]))
            self.datasets[split] = (name, digest)
        self._call("datasets", len(inputs), self.client.log_inputs, self.run_id, datasets=inputs)

    def on_step(self, info: Mapping[str, Any]) -> None:
        """rnn.train.fit callback: buffer the step's loss, gradient norms and clipping (step = global step)."""
        self._add({name: info[key] for key, name in STEP_METRICS.items()}, int(info["step"]))
        self._steps_since_flush += 1
        if self._steps_since_flush >= self.log_every_steps and not self._failing:
            self._flush()

    def on_epoch(self, info: Mapping[str, Any]) -> None:
        """rnn.train.fit callback: epoch metrics (step = epoch), flush, and the gradient trace (the
        first epoch's also as metric series)."""
        epoch = int(info["epoch"])
        self._add({name: info[key] for key, name in EPOCH_METRICS.items() if key in info}, epoch)
        self._flush()
        if info.get("trace"):
            self._traces[epoch] = dict(info["trace"])
            if epoch == 1:
                self._log_trace_series(info["trace"], "first_epoch")
            self._log_trace()

    def log_summary(self, metrics: Mapping[str, Any], traces: Sequence[Mapping[str, list]]) -> None:
        """When training ends (after `log_model`): metrics/<cell>/train.json's figures, the best
        validation accuracy linked to the logged model, and the last epoch's gradient trace as
        metric series (the first epoch's too if this run missed it)."""
        summary = {name: metrics[key] for key, name in SUMMARY_METRICS.items() if key in metrics}
        best = {"accuracy/val_best": summary.pop("accuracy/val_best")} if "accuracy/val_best" in summary else {}
        self._add(summary, 0)
        self._add(best, 0, model_id=self.model_id, dataset=self.datasets.get("val"))    # the model's score
        self._flush()
        if traces:
            if 1 not in self._traces and not self.continued:
                self._log_trace_series(traces[0], "first_epoch")
            self._log_trace_series(traces[-1], "last_epoch")

    def log_model(self, folder: Path) -> None:
        """The model folder as this run's MLflow model "model": pyfunc from code (stages/pyfunc_model.py)
        with the folder as its artifact and the `rnn` package as its code, a signature (a `text`
        column in, P(positive) out) and an input example. Registered as <experiment>-<cell> when
        `mlflow.register` is set."""
        try:
            self._log_model(Path(folder))
        except Exception as exc:  # noqa: BLE001 - a model that cannot be logged must not fail training
            self._failed("models", 1, exc)

    def log_test_metrics(self, scores: Mapping[str, Any], buckets: Sequence[Mapping[str, Any]]) -> None:
        """evaluate's scores (rnn.metrics.binary_metrics) and accuracy by review length (step = the
        bucket's shortest length), linked to the run's model and the test dataset."""
        numbers = {name: scores[key] for key, name in TEST_METRICS.items() if scores.get(key) is not None}
        self._add(numbers, 0, model_id=self.model_id, dataset=self.datasets.get("test"))
        for row in buckets:
            self._add({ACCURACY_BY_LENGTH: row["accuracy"]}, int(row["min_length"]))
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("artifacts", 1, self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._call("artifacts", 1, self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def set_model_digest(self, folder: Path) -> None:
        """Tag the run with the digest of the model folder it wrote (how evaluate finds it)."""
        self._set_tags({"model_digest": model_digest(folder)})

    def _log_trace_series(self, trace: Mapping[str, list], when: str) -> None:
        for state in sorted(trace):
            self.log_series(grad_metric(state, when), trace[state])

    def _log_trace(self) -> None:
        """The traces so far as grad_trace/grad_trace.csv (schema: stages/outputs.py) and .png, so
        that a run stopped in a later epoch still shows them."""
        rows = outputs.trace_rows(self._traces)
        epochs = sorted({min(self._traces), outputs.last_epoch(rows)})
        fig = grad_trace_figure({f"epoch {e}": outputs.trace_series(rows, e) for e in epochs},
                                f"{self.cell}: gradient norm by distance from the last token")
        with tempfile.TemporaryDirectory(prefix="rnn-trace-") as tmp:
            folder = Path(tmp) / TRACE_DIR
            folder.mkdir()
            (folder / "grad_trace.csv").write_text(outputs.trace_csv(rows), encoding="utf-8")
            fig.savefig(folder / "grad_trace.png", dpi=110, bbox_inches="tight")
            self.log_artifacts(folder, TRACE_DIR)

    def _log_model(self, folder: Path) -> None:
        import mlflow
        import numpy as np
        import pandas as pd
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model, ModelSignature
        from mlflow.types import ColSpec, Schema

        import rnn

        mlflow.set_tracking_uri(self.tracking_uri)     # Model.log and registering read the global URI
        run = self.client.get_run(self.run_id)
        params = {k: v for k, v in run.data.params.items() if k.startswith("train.")}
        model = self.client.create_logged_model(
            self.experiment_id, name=MODEL_NAME, source_run_id=self.run_id, params=params,
            tags={"cell": self.cell, "model_digest": model_digest(folder)}, model_type="sentiment-classifier")
        signature = ModelSignature(inputs=Schema([ColSpec("string", "text")]),
                                   outputs=Schema([ColSpec("double", "p_positive")]))
        with tempfile.TemporaryDirectory(prefix="rnn-code-") as tmp:
            code = Path(tmp) / "rnn"
            shutil.copytree(Path(rnn.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
            # run_id left out on purpose: Model.log would copy every metric at step 0 onto the model
            # (gradient at distance 0 included); the run links to the model below instead.
            Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, model_id=model.model_id,
                      python_model=str(PYFUNC_FILE), artifacts={"model_dir": str(folder)},
                      code_paths=[str(code)], signature=signature,
                      input_example=pd.DataFrame({"text": INPUT_EXAMPLE}),
                      pip_requirements=[f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
                                        f"pandas=={pd.__version__}"],
                      registered_model_name=self.register_as)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=0)])
        self.model_id = model.model_id

    def end(self, status: str = "FINISHED") -> None:
        """Stop the system metrics, send what is buffered, close the run (a resumed run keeps the
        train stage's status) and report on stderr anything that could not be logged. Safe to
        call twice."""
        if self._ended:
            return
        self._ended = True
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._flush()
        if not self.resumed:
            self._call("status updates", 1, self.client.set_terminated, self.run_id, status)
        lost = {k: v for k, v in self.lost.items() if v}
        if lost:
            what = ", ".join(f"{v} {k}" for k, v in lost.items())
            _warn(f"could not log {what} to run {self.run_id} at {self.tracking_uri} "
                  f"(first error: {self.first_error}); the local outputs are complete")

    # -- internals ----------------------------------------------------------------------------

    def _add(self, metrics: Mapping[str, Any], step: int, model_id: str | None = None,
             dataset: tuple[str, str] | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        for key, value in metrics.items():
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, str) or not hasattr(value, "__float__"):
                raise TypeError(f"metric {key} = {value!r} is not a number")
            self._pending.append(Metric(key, float(value), now, step, model_id=model_id,
                                        dataset_name=name, dataset_digest=digest))
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
            self._failed(kind, count, exc)
            return False

    def _failed(self, kind: str, count: int, exc: BaseException) -> None:
        self.lost[kind] += count
        if self.first_error is None:
            self.first_error = one_line(exc)
            _warn(f"logging to {self.tracking_uri} failed ({self.first_error}); training goes on, "
                  "what cannot be logged is counted and reported at the end")


def _describe(client: Any, experiment_id: str, note: str) -> None:
    try:
        if NOTE not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, NOTE, note)
    except Exception as exc:  # noqa: BLE001 - a description is not worth failing a stage for
        _warn(f"cannot describe experiment {experiment_id}: {one_line(exc)}")


def _warn(message: str) -> None:
    print(f"warning: mlflow: {message}", file=sys.stderr, flush=True)
