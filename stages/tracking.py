"""What an MLflow run logs, for the train, evaluate, pretrain and probe stages (which run, and the
model's logging: stages/mlstore.py).

One run per `train@<cell>`: settings, datasets (digest: their DVC md5), metrics by step and epoch,
system metrics, the gradient trace (step = distance from the last token) and the model as a pyfunc.
`evaluate@<cell>` finds that run by the model folder's digest (tag `model_digest`): no run id goes
into the folder, which stays byte-identical for identical training. Metric names suit MLflow's chart
view (one section per prefix before "/"). With `mlflow.enabled: false` nothing is logged and MLflow
is never imported. Tracking never stops training: a failing store is warned about once, what could
not be logged is counted in `lost` and `end()` reports it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rnn.train import TrainingInterrupted
from stages import outputs, settings
from stages.mlstore import (EXPERIMENT_NOTES, connect, continued_run, find_run, log_pyfunc_model, new_run,
                            one_line, warn)

# fit's per-step and per-epoch records, train.json (step 0) and binary_metrics (evaluate) -> metric
STEP_METRICS = {"loss": "train/step_loss", "grad_norm": "train/step_grad_norm",
                "grad_norm_clipped": "train/step_grad_norm_clipped", "clipped": "train/step_clipped"}
EPOCH_METRICS = {"train_accuracy": "accuracy/train", "val_accuracy": "accuracy/val", "val_perplexity": "perplexity/val",
                 "train_loss": "loss/train", "val_loss": "loss/val", "lr": "train/lr", "seconds": "train/epoch_seconds",
                 "tokens_per_s": "train/tokens_per_s", "grad_norm_mean": "train/grad_norm_mean",
                 "grad_norm_max": "train/grad_norm_max", "clipped_fraction": "train/clipped_fraction",
                 "val_seconds": "val/seconds"}
SUMMARY_METRICS = {"best_val_accuracy": "accuracy/val_best", "best_epoch": "train/best_epoch",
                   "epochs_run": "train/epochs_run", "stopped_early": "train/stopped_early", "steps": "train/steps",
                   "train_seconds": "train/seconds", "wall_seconds": "train/wall_seconds",
                   "num_parameters": "train/num_parameters", "resumed": "train/resumed"}
TEST_METRICS = {"accuracy": "accuracy/test", "log_loss": "loss/test", "f1": "test/f1",
                "precision": "test/precision", "recall": "test/recall", "roc_auc": "test/roc_auc"}
ACCURACY_BY_LENGTH = "test/accuracy_by_length"      # step = the bucket's shortest review (tokens)

DATASET_CONTEXT = {"train": "training", "val": "validation", "test": "testing"}
# MLflow's limits, and how many metrics wait for a failing store before the oldest are dropped (lost).
MAX_PARAM_VALUE, MAX_METRICS_PER_BATCH, MAX_PENDING_METRICS = 6000, 1000, 400_000


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


dvc_md5 = functools.partial(outputs.file_digest, algorithm="md5")     # what DVC 3 records in dvc.lock


class Off:
    """The tracker with `mlflow.enabled: false`: every Tracker method does nothing (MLflow is never imported)."""
    client = run_id = model_id = None

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None

    def __enter__(self) -> Off:
        return self

    def __exit__(self, *exc) -> None:
        pass


class Tracker:
    """One MLflow run written through an `MlflowClient` (no global active run). Step metrics go out in
    batches every `log_every_steps` steps and at each epoch end: one request per step would cost
    ~3-8 ms against SQLite and more over HTTP."""

    def __init__(self, client: Any, run: Any, cell: str, log_every_steps: int, resumed: bool = False,
                 continued: bool = False) -> None:
        self.client, self.cell, self.log_every_steps = client, cell, log_every_steps
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.tracking_uri = client.tracking_uri
        self.resumed = resumed            # another stage's run: its status is left alone
        self.continued = continued        # this stage's own run, from an interrupted attempt
        self.lost: Counter[str] = Counter()       # what could not be logged, by kind
        self.first_error: str | None = None
        models = run.outputs.model_outputs if run.outputs else []
        self.model_id: str | None = models[-1].model_id if models else None     # the run's logged model
        self.register_as: str | None = None       # registered model name for log_model, if any
        self.datasets: dict[str, tuple[str, str]] = {}    # split -> (name, digest) as logged
        self._pending: list = []          # mlflow.entities.Metric not yet sent
        self._failing = False             # after a failed flush only epoch ends and end() retry
        self._first_trace_logged = False
        self._monitor = None              # MLflow's SystemMetricsMonitor while training
        self._ended = False

    @classmethod
    def start(cls, params: settings.Params, cell: str, stage: str, run_hash: str | None = None,
              run_file: str | Path | None = None, resume: bool = False, seed: int | None = None) -> Tracker | Off:
        """The run of `stage` (e.g. "train@lstm-0"), tagged `params_hash` and `seed`. With `resume` the
        run named in run_file continues if the store has it; else a new run starts and run_file names
        it. Raises TrackingUnavailable when the store is unusable."""
        cfg = params["mlflow"]
        if not cfg["enabled"]:
            return Off()
        kind = stage.partition("@")[0] if stage.startswith(("probe@", "pretrain@")) else "train"
        client, experiment_id = connect(cfg.get(f"{kind}_experiment", cfg["experiment"]),
                                        {"mlflow.note.content": EXPERIMENT_NOTES[kind]})
        run = continued_run(client, Path(run_file)) if resume and run_file else None
        if run is not None:
            print(f"{cell}: continuing MLflow run {run.info.run_id}", flush=True)
            tracker = cls(client, run, cell, cfg["log_every_steps"], continued=True)
        else:
            tracker = cls(client, new_run(client, experiment_id, cell, stage, run_hash, seed), cell,
                          cfg["log_every_steps"])
            if stage.startswith("train@"):     # effective values (runs compare key by key), and the overrides
                tracker.log_params({**settings.flatten(settings.cell_settings(params, cell, seed), "train"),
                                    "train.overrides": params["train"]["overrides"].get(cell, {}),
                                    "train.workers": params["train"]["workers"]})
            if run_file is not None:
                from rnn.io import write_json
                write_json(run_file, {"run_id": tracker.run_id, "tracking_uri": tracker.tracking_uri,
                                      "experiment_id": experiment_id})
        if cfg["register"] and stage.startswith("train@"):
            tracker.register_as = f"{cfg['experiment']}-{cell}"
        every = cfg["system_metrics_every"]
        if every > 0 and not stage.startswith("evaluate@") and importlib.util.find_spec("psutil"):
            # MLflow's own monitor of CPU, memory, disk and network (psutil is optional in MLflow)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            tracker._monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=every, tracking_uri=
                                                    tracker.tracking_uri, resume_logging=tracker.continued)
            tracker._monitor.start()
        return tracker

    @classmethod
    def for_model(cls, params: settings.Params, model_dir: str | Path, stage: str) -> Tracker | Off:
        """The newest run tagged with the digest of the model in `model_dir` (the run that trained it);
        else, with a warning, a new run (tracking was off, another store, a copied model)."""
        cfg = params["mlflow"]
        if not cfg["enabled"]:
            return Off()
        cell, digest = stage.partition("@")[2] or stage, outputs.model_digest(model_dir)
        client, experiment_id = connect(cfg["experiment"])
        run = find_run(client, experiment_id, f"tags.model_digest = '{digest}'")
        if run is None:
            warn(f"no run in {client.tracking_uri} (experiment {cfg['experiment']!r}) trained the model in "
                 f"{model_dir} (tag model_digest = {digest[:12]}...); starting a new run")
            tracker = cls.start(params, cell, stage)
            tracker._set_tags({"model_digest": digest})
            return tracker
        tracker = cls(client, run, run.data.tags.get("cell", cell), cfg["log_every_steps"], resumed=True)
        stages = run.data.tags.get("dvc.stages", "")
        if stage not in stages.split(","):
            tracker._set_tags({"dvc.stages": f"{stages},{stage}" if stages else stage})
        return tracker

    def log_params(self, flat: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        items = [Param(str(k), _param_value(v)) for k, v in flat.items()]      # MLflow sends 100 a request
        self._call("params", len(items), self.client.log_batch, self.run_id, params=items)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Metrics, sent now (e.g. the test metrics); non-numbers raise TypeError."""
        self._add(metrics, step or 0)
        self._flush()

    def log_series(self, key: str, values: Sequence[float | None]) -> None:
        """A curve as log10 values with step = index (a gradient trace: the distance from the last token);
        None (a distance no sequence reached) and 0 (a norm flushed to zero) are left out."""
        for step, value in enumerate(values):
            if value is not None and value > 0:
                self._add({key: math.log10(value)}, step)
        self._flush()

    def log_datasets(self, root: Path, rows: Mapping[str, int]) -> None:
        """data/prepared/<split>.npz as inputs imdb-<split>, digest = the DVC md5: the data version."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        inputs = []
        for split, n in rows.items():
            rel = f"data/prepared/{split}.npz"
            name, digest = f"imdb-{split}", dvc_md5(root / rel)
            self.datasets[split] = (name, digest)
            dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": rel}),
                              profile=json.dumps({"num_rows": int(n), "dvc_md5": digest}))
            inputs.append(DatasetInput(dataset, [InputTag("mlflow.data.context", DATASET_CONTEXT[split])]))
        self._call("datasets", len(inputs), self.client.log_inputs, self.run_id, datasets=inputs)

    def on_step(self, info: Mapping[str, Any]) -> None:
        self._add({name: info[key] for key, name in STEP_METRICS.items()}, int(info["step"]))
        # Only step metrics wait between flushes (the others are sent at once): count steps by them.
        if len(self._pending) >= self.log_every_steps * len(STEP_METRICS) and not self._failing:
            self._flush()

    def on_epoch(self, info: Mapping[str, Any]) -> None:
        self._add({name: info[key] for key, name in EPOCH_METRICS.items() if key in info}, int(info["epoch"]))
        self._flush()
        if info.get("trace") and int(info["epoch"]) == 1:
            self._log_trace(info["trace"], "first_epoch")

    def log_summary(self, metrics: Mapping[str, Any], traces: Sequence[Mapping[str, list]]) -> None:
        """After `log_model`: train.json's figures (the best val accuracy linked to the model), the last
        epoch's gradient trace (the first's too if this run missed it)."""
        summary = {name: metrics[key] for key, name in SUMMARY_METRICS.items() if key in metrics}
        best = {"accuracy/val_best": summary.pop("accuracy/val_best")} if "accuracy/val_best" in summary else {}
        self._add(summary, 0)
        self._add(best, 0, model_id=self.model_id, dataset=self.datasets.get("val"))    # the model's score
        self._flush()
        if traces:
            if not self._first_trace_logged and not self.continued:
                self._log_trace(traces[0], "first_epoch")
            self._log_trace(traces[-1], "last_epoch")

    def log_test_metrics(self, scores: Mapping[str, Any], buckets: Sequence[Mapping[str, Any]]) -> None:
        numbers = {name: scores[key] for key, name in TEST_METRICS.items() if scores.get(key) is not None}
        self._add(numbers, 0, model_id=self.model_id, dataset=self.datasets.get("test"))
        for row in buckets:
            self._add({ACCURACY_BY_LENGTH: row["accuracy"]}, int(row["min_length"]))
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files, under `artifact_path`."""
        log = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        self._call("artifacts", 1, log, self.run_id, str(path), artifact_path)

    log_artifacts = log_artifact

    def set_model_digest(self, folder: Path) -> None:
        self._set_tags({"model_digest": outputs.model_digest(folder)})

    def log_model(self, folder: Path) -> None:
        """The folder as the run's pyfunc model, registered as <experiment>-<cell> with `mlflow.register`."""
        def log() -> None:
            tags = {"cell": self.cell, "model_digest": outputs.model_digest(folder)}
            self.model_id = log_pyfunc_model(self.client, self.run_id, self.experiment_id, Path(folder), tags,
                                             self.register_as)
        self._call("models", 1, log)

    def end(self, status: str = "FINISHED") -> None:
        """Send what is buffered, close the run (a resumed one keeps its status), report what could not
        be logged. Safe to call twice."""
        if self._ended:
            return
        self._ended = True
        if self._monitor is not None:
            self._monitor.finish()
        self._flush()
        if not self.resumed:
            self._call("status updates", 1, self.client.set_terminated, self.run_id, status)
        if +self.lost:      # (unary + drops the kinds counted 0)
            warn(f"could not log {', '.join(f'{v} {k}' for k, v in (+self.lost).items())} to run {self.run_id} "
                  f"at {self.tracking_uri} (first error: {self.first_error}); the local outputs are complete")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """The run ends FINISHED, KILLED (Ctrl-C, SIGTERM: fit saved a checkpoint) or FAILED."""
        from sweeps.pruning import Pruned     # a pruned sweep trial stopped it: not a failure

        stopped = exc_type is not None and issubclass(exc_type, (KeyboardInterrupt, TrainingInterrupted, Pruned))
        self.end("FINISHED" if exc_type is None else "KILLED" if stopped else "FAILED")

    def _log_trace(self, trace: Mapping[str, list], when: str) -> None:
        self._first_trace_logged |= when == "first_epoch"
        for state in sorted(trace):
            self.log_series(f"gradient/log10_dL_d{state}_{when}", trace[state])

    def _add(self, metrics: Mapping[str, Any], step: int, model_id: str | None = None,
             dataset: tuple[str, str] | None = None) -> None:
        from mlflow.entities import Metric
        now, (name, digest) = int(time.time() * 1000), dataset or (None, None)
        for key, value in metrics.items():
            if isinstance(value, str) or not hasattr(value, "__float__"):
                raise TypeError(f"metric {key} = {value!r} is not a number")
            self._pending.append(Metric(key, float(value), now, step, model_id=model_id,
                                        dataset_name=name, dataset_digest=digest))
        excess = len(self._pending) - MAX_PENDING_METRICS
        if excess > 0:
            del self._pending[:excess]
            self.lost["metrics"] += excess

    def _flush(self) -> None:
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            if not self._call("metrics", 0, self.client.log_batch, self.run_id, metrics=chunk):
                self._failing = True       # kept for a retry at the epoch end; lost at end()
                if self._ended:
                    self.lost["metrics"] += len(self._pending)
                    self._pending.clear()
                return
            del self._pending[:len(chunk)]
        self._failing = False

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag
        self._call("tags", len(tags), self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _call(self, kind: str, count: int, fn, *args, **kwargs) -> bool:
        """Run one store call; a failure is counted under `kind`, warned about once, not raised."""
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - no store failure may stop training
            self.lost[kind] += count
            if self.first_error is None:
                self.first_error = one_line(exc)
                warn(f"logging to {self.tracking_uri} failed ({self.first_error}); training goes on, "
                      "what cannot be logged is counted and reported at the end")
            return False
