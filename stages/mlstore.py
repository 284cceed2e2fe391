"""Where MLflow runs go, and the connection to that store.

`MLFLOW_TRACKING_URI` when set (a server such as `http://host:5000`, or any store URI), else a SQLite
file `mlflow.db` with artifacts in `mlartifacts/` in the project root, also for queued experiments,
whose working copies DVC deletes afterwards. `connect` fails fast, in one line, when the store cannot
be used; what a run logs is in stages/tracking.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 5.0
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
LOCK_FILE = ".mlflow.lock"
QUEUED_EXP_DIR = "/.dvc/tmp/exps/"
# Marks the experiment as model training: MLflow 3's UI then opens it on its runs, charts and models
# (without it, a fresh browser shows the GenAI view of traces). A kind chosen in the UI is kept.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
FIX = "fix MLFLOW_TRACKING_URI, or set mlflow.enabled: false in params.yaml"

# MLflow's usage telemetry sets and removes an environment variable from a thread of its own while
# the HTTP client reads the environment for proxy settings; with a server under load a stage lost
# its params to "log-batch failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'" (seen in a sweep
# on two machines). The runs here never need it, and machines without internet cannot send it.
# Set before MLflow is first imported: every stage imports this module first.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


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


def check_store() -> str:
    """Check, cheaply and without importing MLflow, that the store `connect` would use is usable: a
    server answers, an SQLite file is a readable database in a writable folder. Returns its URI; a
    TrackingUnavailable in one line otherwise. What the check stage runs before any output is touched."""
    uri, _ = tracking_location(resolve_root())
    if uri.startswith(("http://", "https://")):
        _probe_http(uri)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(uri)
    return uri


def _check_sqlite(uri: str) -> Path:
    """The database file of a sqlite:/// URI, after checking it is a readable SQLite database (when it
    exists) in a folder this process may write to (SQLite writes a journal beside it)."""
    db = Path(uri[len("sqlite:///"):].partition("?")[0])
    folder = next(p for p in (db.parent, *db.parent.parents) if p.exists())
    if not folder.is_dir():
        raise TrackingUnavailable(f"MLflow store {uri}: {folder} is not a folder; {FIX}")
    if db.exists():
        if not db.is_file():
            raise TrackingUnavailable(f"MLflow store {uri}: {db} is not a file; {FIX}")
        try:
            with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)) as con:
                tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "experiments" in tables:
                    con.execute("SELECT count(*) FROM experiments").fetchone()
        except sqlite3.Error as exc:
            raise TrackingUnavailable(f"MLflow store {uri}: {db} is not a usable SQLite database "
                                      f"({one_line(exc)}); move it away, {FIX}") from None
    if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
        raise TrackingUnavailable(f"MLflow store {uri}: {db if db.exists() else folder} is not writable; {FIX}")
    return db


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
            f"MLflow tracking server {uri} is unreachable ({one_line(reason)}); start it, {FIX}") from None


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


def connect(experiment: str) -> tuple[Any, str, str]:
    """(MlflowClient, tracking URI, experiment id), creating the store and experiment if needed."""
    root = resolve_root()
    uri, artifact_location = tracking_location(root)
    if uri.startswith("sqlite:///"):
        db = _check_sqlite(uri)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(f"MLflow store {uri}: cannot create {db.parent} ({one_line(exc)}); {FIX}") \
                from None
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
        raise TrackingUnavailable(f"MLflow store {uri}: {one_line(exc)}") from None
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
            if EXPERIMENT_KIND[0] not in experiment.tags:     # made before the tag existed
                client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags=dict([EXPERIMENT_KIND]))
        except MlflowException as exc:
            # Another process (on another machine, for a server) created it in between.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            time.sleep(0.2)
    raise TrackingUnavailable(f"MLflow experiment {name!r}: could not be created or found")


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
