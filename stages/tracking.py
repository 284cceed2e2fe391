"""MLflow tracking for the train and evaluate stages.

One MLflow run per `train@<cell>`: its params, per-epoch and per-step metrics, the gradient-trace
table and figure, and the model folder. `evaluate@<cell>` reopens that run by the id the train
stage wrote to a run file and adds the test metrics, so one run holds everything about one model.

    tracker = Tracker.start(params, cell="lstm", stage="train@lstm")
    tracker.log_params(data_stats)
    fit(..., callbacks=[tracker])            # on_step / on_epoch
    tracker.log_artifacts(model_dir, "model")
    tracker.write_run_file(run_file)
    tracker.end()

`mlflow.enabled: false` gives a `NullTracker` with the same methods that does nothing (mlflow is
not even imported). Tracking never kills training: once a run has started, a failing store is
warned about once, what could not be logged is counted, and `end()` reports it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from stages.common import Field, atomic_path, validate_section, write_json

SCHEMA = {
    "enabled": Field(bool, True),
    "experiment": Field(str, "imdb-sentiment"),
    "log_every_steps": Field(int, 200, min=1),  # per-step metrics are sent in batches this often
}

# Sections whose values decide what a train run computes; their hash tells identical setups apart.
HASHED_SECTIONS = ("data", "prepare", "embed")
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
TRACE_CSV = "grad_trace.csv"
TRACE_PNG = "grad_trace.png"

# MLflow's limits (mlflow.utils.validation), repeated so that importing this module stays cheap.
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# Step metrics kept while the store is failing, before the oldest are dropped (and counted lost).
MAX_PENDING_METRICS = 400_000
PROBE_TIMEOUT_S = 5.0

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
LOCK_FILE = ".mlflow.lock"
QUEUED_EXP_DIR = "/.dvc/tmp/exps/"


class TrackingUnavailable(ConnectionError):
    """The tracking store cannot be reached or used when a run should start."""


# ---------------------------------------------------------------------------------------------
# Where runs go


def resolve_root(environ: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> Path:
    """The absolute project root runs are stored under.

    `DVC_ROOT` when set, else the nearest directory upward from `cwd` holding params.yaml.

    Queued (`dvc exp run --queue` + `dvc queue start`) and `--temp` experiments run in a
    throw-away copy `<repo>/.dvc/tmp/exps/[standalone/]tmpXXXX` that is deleted afterwards.
    Checked with DVC 3.67 (a stage printing its environment): there DVC_ROOT is the real repo
    root (dvc/repo/experiments/queue/base.py overrides it on purpose) while the stage's cwd is
    the copy; DVC_EXP_NAME and DVC_EXP_BASELINE_REV are set for `dvc exp run` in all modes,
    plain `dvc repro` sets only DVC_ROOT and DVC_STAGE. Older DVC set DVC_ROOT to the copy, so a
    root inside `.dvc/tmp/exps/` is still mapped back to the repo, or runs would vanish with it.
    """
    environ = os.environ if environ is None else environ
    cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
    dvc_root = environ.get("DVC_ROOT")
    if dvc_root:
        root = (cwd / dvc_root).resolve()          # an absolute DVC_ROOT replaces cwd
        text = root.as_posix()
        if QUEUED_EXP_DIR in text + "/":
            root = Path(text[: (text + "/").index(QUEUED_EXP_DIR)] or "/")
        return root
    for d in (cwd, *cwd.parents):
        if (d / "params.yaml").is_file():
            return d
    raise FileNotFoundError(f"params.yaml not found in {cwd} or any parent directory")


def tracking_location(root: Path, environ: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the store's default).

    `MLFLOW_TRACKING_URI` wins; otherwise a SQLite file in the root. SQLite paths are made absolute
    (a relative one is taken from the root) and artifacts go beside the database: both would
    otherwise follow the cwd, which in a queued experiment is a copy deleted after the run.
    """
    environ = os.environ if environ is None else environ
    uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = f"sqlite:///{DEFAULT_DB}"
    if not uri.startswith("sqlite:///"):
        return uri, None
    path, query = uri[len("sqlite:///"):].partition("?")[::2]
    db = root / path if not path.startswith("/") else Path(path)
    return f"sqlite:///{db.as_posix()}" + (f"?{query}" if query else ""), (db.parent / DEFAULT_ARTIFACTS).as_uri()


# ---------------------------------------------------------------------------------------------
# Params


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


def _merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], value) if both else value
    return out


def cell_overrides(params: Mapping[str, Any], cell: str) -> dict:
    """`train.overrides.<cell>` as written, {} when absent."""
    train = params.get("train")
    overrides = train.get("overrides") if isinstance(train, Mapping) else None
    mine = overrides.get(cell) if isinstance(overrides, Mapping) else None
    return dict(mine) if isinstance(mine, Mapping) else {}


def effective_train(params: Mapping[str, Any], cell: str) -> dict:
    """The train section as `cell` sees it: `train.overrides.<cell>` merged on top; the list of
    cells and the other cells' overrides dropped, as they do not change this cell's run."""
    train = params.get("train")
    if not isinstance(train, Mapping):
        return {}
    base = {k: v for k, v in train.items() if k not in ("cells", "overrides")}
    return _merged(base, cell_overrides(params, cell))


def params_hash(params: Mapping[str, Any], cell: str) -> str:
    """sha256 of the canonical JSON of what decides `cell`'s train run: the data, prepare and
    embed sections, the train section as the cell sees it (see effective_train), and the cell."""
    relevant = {s: params.get(s) for s in HASHED_SECTIONS if s in params}
    relevant["train"] = effective_train(params, cell)
    relevant["cell"] = cell
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Gradient traces


def write_trace_csv(traces: Iterable[tuple[int, Mapping[str, list]]], path: str | Path) -> Path:
    """Write per-epoch traces as a long table `epoch,distance,<state>...` (empty = no data).

    traces: (epoch, {"a": [mean norm of dL/da<t> by distance from the last token], "c": ...}).
    """
    traces = [(int(e), t) for e, t in traces if t]
    states = sorted({name for _, t in traces for name in t})
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["epoch", "distance", *states])
        for epoch, trace in traces:
            columns = [list(trace.get(s) or ()) for s in states]
            for d in range(max(map(len, columns))):
                row = [c[d] if d < len(c) else None for c in columns]
                if any(v is not None for v in row):
                    out.writerow([epoch, d, *("" if v is None else repr(float(v)) for v in row)])
    return Path(path)


def read_trace_csv(path: str | Path) -> dict[str, dict[int, tuple[list[int], list[float]]]]:
    """{state: {epoch: (distances, mean norms)}} from a table written by `write_trace_csv`."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if fields[:2] != ["epoch", "distance"]:
            raise ValueError(f"{path}: not a gradient-trace table (header {','.join(fields)})")
        series: dict[str, dict[int, tuple[list[int], list[float]]]] = {s: {} for s in fields[2:]}
        for row in reader:
            for state in fields[2:]:
                if row[state]:
                    xs, ys = series[state].setdefault(int(row["epoch"]), ([], []))
                    xs.append(int(row["distance"]))
                    ys.append(float(row[state]))
    return series


def plot_trace(path: str | Path, png: str | Path, title: str = "") -> Path:
    """Render a trace table as a PNG: one panel per state, one line per epoch, log y-axis."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    series = read_trace_csv(path)
    fig = Figure(figsize=(7, 3.2 * max(1, len(series))), layout="constrained")
    axes = fig.subplots(max(1, len(series)), 1, squeeze=False)[:, 0]
    for ax, (state, by_epoch) in zip(axes, series.items()):
        epochs = sorted(by_epoch)
        for i, epoch in enumerate(epochs):
            xs, ys = by_epoch[epoch]
            # Zero norms (fully flushed denormals) cannot be drawn on a log axis.
            keep = [(x, y) for x, y in zip(xs, ys) if y > 0 and math.isfinite(y)]
            color = colormaps["viridis"](i / max(1, len(epochs) - 1))
            ax.plot([x for x, _ in keep], [y for _, y in keep], color=color, lw=1.2, label=f"epoch {epoch}")
        ax.set_yscale("log")
        ax.set_xlabel("distance from the last token (steps back in time)")
        ax.set_ylabel(f"mean ‖dL/d{state}⟨t⟩‖")
        ax.grid(True, which="both", alpha=0.3)
        if epochs:
            ax.legend(fontsize="small", ncols=2)
    if title:
        fig.suptitle(title)
    png = Path(png)
    fig.savefig(png, dpi=110)
    return png


# ---------------------------------------------------------------------------------------------
# Trackers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _probe_http(uri: str) -> None:
    """Fail fast when nothing answers at an http(s) tracking URI (any HTTP status is an answer)."""
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=probe"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({_one_line(reason)}); start it, "
            "fix MLFLOW_TRACKING_URI, or set mlflow.enabled: false in params.yaml") from None


@contextlib.contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    """Exclusive lock across processes: creating a fresh SQLite store (its schema migrations)
    and the experiment concurrently fails, e.g. for train@rnn and train@gru in parallel."""
    with open(root / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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

    def log_figure_trace(self, trace_csv_path: str | Path) -> None:
        pass

    def write_run_file(self, path: str | Path) -> None:
        """Atomic JSON {run_id, tracking_uri, experiment_id}, read by `Tracker.resume`; all null
        when tracking is off, still written so a DVC stage declaring it as an output is satisfied."""
        write_json(path, {"run_id": self.run_id, "tracking_uri": self.tracking_uri,
                          "experiment_id": self.experiment_id})

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
        self._traces: list[tuple[int, dict]] = []
        self._ended = False

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def start(cls, params: Mapping[str, Any], cell: str, stage: str) -> NullTracker:
        """Create the run of `stage` (e.g. "train@lstm") for `cell`, or a NullTracker if disabled.

        Raises TrackingUnavailable (one line) when the store cannot be reached or used.
        """
        cfg = validate_section(params, "mlflow", SCHEMA)
        if not cfg["enabled"]:
            return NullTracker()
        client, uri, experiment_id = _connect(cfg["experiment"])
        exp_name = os.environ.get("DVC_EXP_NAME") or None
        tags = {
            "cell": cell,
            "dvc.stage": stage,
            "dvc.stages": stage,
            "params_hash": params_hash(params, cell),
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": stage,
        }
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
            raise TrackingUnavailable(f"MLflow store {uri}: cannot create a run: {_one_line(exc)}") from None
        tracker = cls(client, run.info.run_id, experiment_id, uri, cell, cfg["log_every_steps"])
        if train_run:     # other stages (the probe) log their own settings
            # Effective values, so runs of different cells compare key by key; what this cell
            # overrides is kept as one param to show why its values differ.
            flat = flatten(effective_train(params, cell), "train")
            flat["train.overrides"] = _param_value(cell_overrides(params, cell))
            tracker.log_params(flat)
        return tracker

    @classmethod
    def resume(cls, params: Mapping[str, Any], run_file_path: str | Path, stage: str) -> NullTracker:
        """Reopen the run recorded in `run_file_path` (by `write_run_file`) to add to it.

        A run file without a run (tracking was off at train time) or a run that is not in the
        current store gives a new run instead, with a warning.
        """
        cfg = validate_section(params, "mlflow", SCHEMA)
        if not cfg["enabled"]:
            return NullTracker()
        path = Path(run_file_path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: MLflow run file not found (written by the train stage)") from None
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not a valid MLflow run file (invalid JSON)") from None
        if not isinstance(record, dict) or "run_id" not in record:
            raise ValueError(f"{path}: not a valid MLflow run file (no run_id)")
        cell = stage.partition("@")[2] or stage
        run_id = record["run_id"]
        if run_id is None:
            _warn(f"{path} names no run (tracking was off when training); starting a new run")
            return cls.start(params, cell, stage)
        client, uri, experiment_id = _connect(cfg["experiment"])
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise TrackingUnavailable(f"MLflow store {uri}: cannot read run {run_id}: {_one_line(exc)}") from None
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
            self._traces.append((epoch, dict(info["trace"])))
            with tempfile.TemporaryDirectory(prefix="rnn-trace-") as tmp:
                self.log_figure_trace(write_trace_csv(self._traces, Path(tmp) / TRACE_CSV))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("artifacts", 1, self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self._call("artifacts", 1, self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def log_figure_trace(self, trace_csv_path: str | Path) -> None:
        """Log a trace table (see write_trace_csv) and its log-scale figure under grad_trace/."""
        with tempfile.TemporaryDirectory(prefix="rnn-trace-") as tmp:
            folder = Path(tmp) / TRACE_DIR
            folder.mkdir()
            table = folder / TRACE_CSV
            table.write_bytes(Path(trace_csv_path).read_bytes())
            plot_trace(table, folder / TRACE_PNG, title=f"{self.cell}: gradient norm by distance from the last token")
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
                self.first_error = _one_line(exc)
                _warn(f"logging to {self.tracking_uri} failed ({self.first_error}); training goes on, "
                      "what cannot be logged is counted and reported at the end")
            return False


def _warn(message: str) -> None:
    print(f"warning: mlflow: {message}", file=sys.stderr, flush=True)


def _connect(experiment: str) -> tuple[Any, str, str]:
    """(MlflowClient, tracking URI, experiment id), creating the store and experiment if needed."""
    root = resolve_root()
    uri, artifact_location = tracking_location(root)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):].partition("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith(("http://", "https://")):
        _probe_http(uri)
        # Once a run is going, a dead server must not stall training for minutes per request
        # (MLflow's default is 7 retries with exponential backoff); the user's setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow import MlflowClient

    try:
        with _store_lock(root):
            client = MlflowClient(tracking_uri=uri)   # a SQLite store is created/migrated here
            experiment_id = _get_or_create_experiment(client, experiment, artifact_location)
    except TrackingUnavailable:
        raise
    except Exception as exc:
        raise TrackingUnavailable(f"MLflow store {uri}: {_one_line(exc)}") from None
    return client, uri, experiment_id


def _get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    for _ in range(5):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackingUnavailable(
                    f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
                    f"--experiment-id {experiment.experiment_id}) or set another mlflow.experiment")
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            # Another process (on another machine, for a server) created it in between.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            time.sleep(0.2)
    raise TrackingUnavailable(f"MLflow experiment {name!r}: could not be created or found")
