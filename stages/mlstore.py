"""The connection to the MLflow store (what a run logs: stages/tracking.py). Where the store is and
whether it answers is rnn/cli.py's, shared with `rnn runs` and `rnn ui`; importing it turns MLflow's
telemetry off before MLflow is first imported."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rnn.cli import TrackingUnavailable, check_store as check_uri, resolve_root, tracking_location

# Marks an experiment as model training: MLflow 3's UI then opens it on its runs, charts and models
# (without it, a fresh browser shows the GenAI view of traces). A kind chosen in the UI is kept.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def check_store() -> str:
    """The URI of the store `connect` would use, checked without importing MLflow (by the check stage,
    before any output is touched)."""
    uri = tracking_location(resolve_root())[0]
    check_uri(uri, writing=True)
    return uri


@contextlib.contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    """Exclusive lock across processes: creating a fresh SQLite store (its schema migrations) and
    the experiment concurrently fails, e.g. for train@rnn and train@gru in parallel."""
    with open(root / ".mlflow.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def connect(experiment: str, tags: Mapping[str, str] = {}) -> tuple[Any, str]:
    """(MlflowClient, experiment id), creating the store and the experiment if needed; `tags` (and
    EXPERIMENT_KIND) are set where the experiment lacks them."""
    root = resolve_root()
    uri, artifact_location = tracking_location(root)
    db = check_uri(uri, writing=True)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnavailable(f"MLflow store {uri}: cannot create {db.parent} ({one_line(exc)})") from None
    if uri.startswith(("http://", "https://")):
        # Once a run is going, a dead server must not stall training for minutes per request
        # (MLflow's default is 7 retries with exponential backoff); the user's setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tags = {**EXPERIMENT_KIND, **tags}
    try:
        with _store_lock(root):
            client = MlflowClient(tracking_uri=uri)   # a SQLite store is created/migrated here
            for _ in range(5):
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    try:
                        return client, client.create_experiment(experiment, artifact_location, tags)
                    except MlflowException as exc:      # another machine created it in between
                        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                            raise
                        time.sleep(0.2)
                        continue
                if found.lifecycle_stage == "deleted":
                    raise TrackingUnavailable(
                        f"MLflow experiment {experiment!r} is deleted; restore it (mlflow experiments restore "
                        f"--experiment-id {found.experiment_id}) or set another mlflow.experiment")
                for key in tags.keys() - found.tags.keys():
                    client.set_experiment_tag(found.experiment_id, key, tags[key])
                return client, found.experiment_id
    except TrackingUnavailable:
        raise
    except Exception as exc:
        raise TrackingUnavailable(f"MLflow store {uri}: {one_line(exc)}") from None
    raise TrackingUnavailable(f"MLflow experiment {experiment!r}: could not be created or found")


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
