"""The MLflow store: the connection, its experiments, the run a stage logs to and the models logged
there (what a run logs: stages/tracking.py). Where the store is and whether it answers is rnn/cli.py's, shared with `rnn runs`
and `rnn ui`; importing it turns MLflow's telemetry off before MLflow is first imported."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rnn.cli import TrackingUnavailable, check_store as check_uri, resolve_root, tracking_location
from stages import common

# Marks an experiment as model training: MLflow 3's UI then opens it on its runs, charts and models
# (without it, a fresh browser shows the GenAI view of traces). A kind chosen in the UI is kept.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MODEL_NAME = "model"         # `runs:/<run id>/model` loads the logged model
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE = ["A wonderful, moving film with a great cast.", "Two hours I will never get back."]
# The runs' colours in the UI (else hashed from the run id), as in reports/*.png (matplotlib's C0-C2).
CELL_COLORS = {"rnn": "#1f77b4", "gru": "#ff7f0e", "lstm": "#2ca02c"}
EXPERIMENT_NOTES = {     # the experiments' descriptions in the UI (set once; an edit made there is kept)
    "train": "One run per `train@<cell>` stage; `evaluate@<cell>` adds the test metrics to it. `gradient/`: "
             "log10 of the mean gradient norm by distance from the last token (the chart's step is the "
             "distance: the vanishing gradient). Sweeps: group by the tag `dvc.exp_name` or by a param.",
    "pretrain": "One run per `pretrain@<cell>` stage: the cell trained as a next-token language model. "
                "`perplexity/val` by epoch (full softmax), `loss/train` (sampled softmax), `train/` by step.",
    "probe": "One run per `probe@<cell>` stage: the memory probe. `probe/accuracy` by distance of the decisive "
             "token from the end (the chart's step), `probe/log10_dL_d*` the gradient by steps from the end.",
}


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
    with open(root / ".mlflow.lock", "a") as f:      # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


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
            found = client.get_experiment_by_name(experiment)
            if found is None:
                try:
                    return client, client.create_experiment(experiment, artifact_location, tags)
                except MlflowException as exc:      # another machine created it in between
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    found = client.get_experiment_by_name(experiment)
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


def find_run(client: Any, experiment_id: str, filter_string: str) -> Any:
    """The newest run of the experiment that matches (with its outputs: search results have none), or None."""
    try:
        runs = client.search_runs([experiment_id], filter_string=filter_string,
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return client.get_run(runs[0].info.run_id) if runs else None
    except Exception as exc:
        raise TrackingUnavailable(f"MLflow store {client.tracking_uri}: cannot search runs: {one_line(exc)}") from None


def new_run(client: Any, experiment_id: str, cell: str, stage: str, run_hash: str | None,
            seed: int | None = None) -> Any:
    """A new run of `stage` tagged with its cell, seed, colour, DVC stage and experiment, commit and sweep."""
    from mlflow.utils.git_utils import get_git_commit
    exp_name, base_rev = os.environ.get("DVC_EXP_NAME"), os.environ.get("DVC_EXP_BASELINE_REV")
    commit = get_git_commit(os.getcwd())    # in a queued experiment: the copy being run, at the baseline
    tags = {"cell": cell, "mlflow.runColor": CELL_COLORS.get(cell, "#7f7f7f"), "dvc.stage": stage,
            "dvc.stages": stage, "mlflow.source.type": "LOCAL", "mlflow.source.name": stage,
            "params_hash": run_hash, "dvc.exp_name": exp_name, "dvc.baseline_rev": base_rev,
            "mlflow.source.git.commit": commit or base_rev, "seed": None if seed is None else str(seed),
            "sweep.study": os.environ.get("RNN_SWEEP_STUDY"),
            "mlflow.user": os.environ.get("MLFLOW_TRACKING_USERNAME")}   # the account, on a server with logins
    if trial := json.loads(os.environ.get("RNN_SWEEP_TRIAL") or "{}"):      # a sweep worker's trial (sweeps/)
        tags["sweep.trial"] = str(trial.get("trial"))
        if stage.startswith(("train@", "baseline")):     # the study's parent run is in this experiment
            tags["mlflow.parentRunId"] = trial.get("mlflow_parent_run_id")
    # e.g. "lstm-1" (seed 1) beside "probe@lstm"
    name = (cell if seed is None else f"{cell}-{seed}") if stage.startswith(("train@", "baseline")) else stage
    try:
        return client.create_run(experiment_id, run_name=f"{name} ({exp_name})" if exp_name else name,
                                 tags={k: v for k, v in tags.items() if v})
    except Exception as exc:
        raise TrackingUnavailable(f"MLflow store {client.tracking_uri}: cannot create a run: {one_line(exc)}") from None


def continued_run(client: Any, run_file: Path) -> Any:
    """The run an interrupted training recorded in `run_file`, running again; else None, with a warning."""
    try:
        record = json.loads(run_file.read_text(encoding="utf-8"))
        if record["tracking_uri"] != client.tracking_uri:
            raise ValueError(f"its run was logged to {record['tracking_uri']}, not {client.tracking_uri}")
        run = client.get_run(record["run_id"])
        client.update_run(run.info.run_id, status="RUNNING")
        return run
    except Exception as exc:  # noqa: BLE001 - no usable record or run: a new run instead
        warn(f"{run_file}: cannot continue its run ({one_line(exc)}); the resumed training starts a new run")
        return None


def log_pyfunc_model(client: Any, run_id: str, experiment_id: str, folder: Path, tags: Mapping[str, str],
                     register_as: str | None) -> str:
    """The model folder as the run's pyfunc model (stages/pyfunc_model.py, a copy of `rnn` inside: text in,
    P(positive) out), registered as `register_as` if given, with the run's train.* params. Its model id."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import rnn
    mlflow.set_tracking_uri(client.tracking_uri)     # logging the files and registering read the global URI
    params = {k: v for k, v in client.get_run(run_id).data.params.items() if k.startswith("train.")}
    model = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id, params=params,
                                       tags=dict(tags), model_type="sentiment-classifier")
    with tempfile.TemporaryDirectory(prefix="rnn-code-") as tmp:
        code = shutil.copytree(Path(rnn.__file__).parent, Path(tmp) / "rnn",
                               ignore=shutil.ignore_patterns("__pycache__"))
        # No run_id: MLflow would copy every metric at step 0 onto the model (the gradient at
        # distance 0 too); the run is linked to the model below instead.
        mlflow.pyfunc.log_model(
            name=MODEL_NAME, model_id=model.model_id, python_model=str(PYFUNC_FILE),
            artifacts={"model_dir": str(folder)}, code_paths=[str(code)],
            signature=ModelSignature(Schema([ColSpec("string", "text")]), Schema([ColSpec("double", "p_positive")])),
            input_example=pd.DataFrame({"text": INPUT_EXAMPLE}), registered_model_name=register_as,
            pip_requirements=[f"{m.__name__}=={m.__version__}" for m in (mlflow, np, pd)])
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def warn(message: str) -> None:
    print(f"warning: mlflow: {message}", file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    return common.one_line(exc, limit=300)     # a server's error can be a page of HTML
