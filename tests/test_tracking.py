"""stages/tracking.py: MLflow runs from the train, evaluate and probe stages, into SQLite and a real
server, checked through MLflow's own API: names, datasets, the logged model (predicting and serving),
continuing an interrupted run, and finding a model's run by its folder's digest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

import rnn  # noqa: E402
from rnn.io import save_model  # noqa: E402
from rnn.model import ModelConfig, SentimentModel  # noqa: E402
from rnn.config import MAX_REVIEW_BYTES  # noqa: E402
from stages import evaluate, outputs, settings, train  # noqa: E402
from stages.mlstore import TrackingUnavailable, resolve_root, tracking_location  # noqa: E402
from stages.outputs import model_digest  # noqa: E402
from stages.tracking import Tracker, dvc_md5  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXTS = ["good good film", "bad bad film", "film"]


def make_params(log_every_steps: int = 200, **mlflow) -> settings.Params:
    return settings.validate({
        "data": {"limit": 100},
        "prepare": {"max_len": 12},
        "train": {"cells": ["gru", "lstm"], "lr": 0.001, "optimizer": "adam",
                  "clip": {"mode": "norm", "threshold": 5.0},
                  "overrides": {"lstm": {"lr": 0.0005, "clip": {"threshold": 1.0}}, "gru": {"lr": 9.0}}},
        "mlflow": {"log_every_steps": log_every_steps, "system_metrics_every": 0, **mlflow},
    })


def model_folder(path: Path, cell: str = "lstm") -> Path:
    """A small trained-looking model folder with a text encoder, as the train stage writes it."""
    tokens = ["<pad>", "<unk>", "good", "bad", "film"]
    model = SentimentModel.create(ModelConfig(vocab_size=len(tokens), cell=cell, embed_dim=4, hidden_size=3),
                                  np.random.default_rng(0))
    save_model(path, model, encoder={"tokens": tokens, "max_len": 8, "truncate": "both"}, metadata={"cell": cell})
    return path


def write_prepared(root: Path, sizes: dict[str, int]) -> None:
    """data/prepared/<split>.npz files (contents do not matter to the tracker, only their bytes)."""
    for split, n in sizes.items():
        path = root / "data" / "prepared" / f"{split}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=np.full((n, 4), len(split)), lengths=np.full(n, 4), labels=np.arange(n) % 2)


def simulate_fit(tracker, epochs: int = 3, steps_per_epoch: int = 250, T: int = 12) -> list[dict]:
    """Call the callbacks the way rnn.train.fit does (same info keys), without any training; returns
    the per-epoch gradient traces, as fit's result holds them."""
    step, traces = 0, []
    for epoch in range(1, epochs + 1):
        for b in range(steps_per_epoch):
            step += 1
            norm = 10.0 / step
            tracker.on_step({"epoch": epoch, "step": step, "loss": 0.7 - step * 1e-4, "grad_norm": norm,
                             "grad_norm_clipped": min(norm, 5.0), "clipped": norm > 5.0,
                             "group_norms": {"fc.W": norm}, "batch": b + 1,
                             "batches": steps_per_epoch, "tokens": 640})
        # a: decays with distance, no data beyond T-2; c only for lstm.
        trace = {"a": [0.5 ** (d + epoch) for d in range(T - 2)] + [None, None],
                 "c": [0.9 ** d for d in range(T)]}
        tracker.on_epoch({"epoch": epoch, "step": step, "lr": 0.01 / epoch, "train_loss": 0.6,
                          "train_accuracy": 0.5 + epoch / 10,
                          "val_loss": 0.65, "val_accuracy": 0.5 + epoch / 20, "seconds": 1.5,
                          "val_seconds": 0.2, "tokens_per_s": 1e5, "grad_norm_mean": 1.0,
                          "grad_norm_max": 10.0, "clipped_fraction": 0.01, "trace": trace})
        traces.append(trace)
    return traces


@pytest.fixture
def fast_tmp(tmp_path):
    """A tmp dir on tmpfs when there is one: creating an SQLite store runs dozens of schema
    migrations that each fsync, ~8 s on this machine's disk against ~2 s in memory."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="test-tracking-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def store_template(tmp_path_factory):
    """An empty, fully migrated MLflow SQLite store, created once and copied per test."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as d:
        MlflowClient(f"sqlite:///{d}/mlflow.db").search_experiments()
        shutil.copy(Path(d) / "mlflow.db", path)
    return path


@pytest.fixture
def project(fast_tmp, store_template, monkeypatch):
    """A project dir as DVC runs a stage in an experiment: DVC_* set, cwd a git checkout, and an
    (empty) store already there - creating one fresh is covered by the parallel test."""
    root = fast_tmp / "proj"
    root.mkdir()
    shutil.copy(store_template, root / "mlflow.db")
    (root / "params.yaml").write_text("mlflow: {}\n")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc12")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    return root, commit


def count_log_batch(monkeypatch) -> list:
    """Record (number of metrics, number of params) of every MlflowClient.log_batch call."""
    calls = []
    original = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), **kw):
        calls.append((len(metrics or ()), len(params or ())))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    return calls


# ------------------------------------------------------------------------------------------
# (a) a whole simulated train + evaluate run into the default SQLite store


SUMMARY = {"best_val_accuracy": 0.7, "best_epoch": 2, "epochs_run": 3, "stopped_early": False, "steps": 750,
           "train_seconds": 5.0, "wall_seconds": 6.0, "num_parameters": 123, "resumed": False}


def test_training_run_lands_in_sqlite_store_and_evaluate_adds_to_it(project, monkeypatch):
    root, commit = project
    write_prepared(root, {"train": 64, "val": 16, "test": 40})
    calls = count_log_batch(monkeypatch)
    params = make_params()
    run_file = root / "checkpoints" / "lstm" / "key" / "mlflow_run.json"
    tracker = Tracker.start(params, cell="lstm", stage="train@lstm", run_hash=settings.run_hash(params, "lstm"),
                            run_file=run_file)
    tracker.log_params({"data.train_reviews": 900, "data.vocab_size": 20000, "note": "x" * 7000})
    tracker.log_datasets(root, {"train": 64, "val": 16})
    calls.clear()
    traces = simulate_fit(tracker, epochs=3, steps_per_epoch=250)
    # Buffering: 750 steps x 4 metrics went out in 2 requests per epoch (200 steps, then the rest
    # with the epoch metrics), each within MLflow's 1000-metric limit - not one per step - and the
    # first epoch's gradient trace in one request per state.
    metric_calls = [m for m, _ in calls if m]
    assert len(metric_calls) == 3 * 2 + 2 and max(metric_calls) <= 1000
    assert sum(metric_calls) == 750 * 4 + 3 * 11 + 10 + 12
    folder = model_folder(root / "models" / "lstm")
    tracker.set_model_digest(folder)
    tracker.log_model(folder)
    tracker.log_summary(SUMMARY, traces)
    tracker.end()
    assert tracker.lost == dict.fromkeys(tracker.lost, 0)

    record = json.loads(run_file.read_text())          # kept beside the checkpoint, for a resume
    assert record == {"run_id": tracker.run_id, "tracking_uri": f"sqlite:///{root}/mlflow.db",
                      "experiment_id": tracker.experiment_id}
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "lstm (exp-abc12)" and run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "imdb-sentiment"
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    # What makes MLflow 3's UI open the experiment on runs and models, not on GenAI traces.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "distance from the last token" in experiment.tags["mlflow.note.content"]

    tags = run.data.tags
    assert tags["cell"] == "lstm" and tags["dvc.stage"] == "train@lstm"
    assert tags["dvc.exp_name"] == "exp-abc12" and tags["dvc.baseline_rev"] == "b" * 40
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["params_hash"] == settings.run_hash(params, "lstm")
    assert tags["model_digest"] == model_digest(folder)
    assert tags["mlflow.runColor"] == "#2ca02c"            # each cell its colour, as in reports/

    logged = run.data.params
    # The values lstm trained with: its overrides on top, other cells' overrides left out.
    assert logged["train.lr"] == "0.0005" and logged["train.clip.threshold"] == "1.0"
    assert logged["train.clip.mode"] == "norm" and logged["train.optimizer"] == "adam"
    assert logged["train.overrides"] == '{"clip": {"threshold": 1.0}, "lr": 0.0005}'
    assert not any(k.startswith(("train.cells", "train.overrides.")) for k in logged)
    assert logged["train.workers"] == "auto" and logged["data.vocab_size"] == "20000"
    assert len(logged["note"]) == 6000 and logged["note"].endswith("...")

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    # Sections of the chart view, in MLflow's (alphabetical) order: the learning curves first.
    sections = sorted({key.split("/")[0] for key in run.data.metrics})
    assert sections == ["accuracy", "gradient", "loss", "train", "val"]
    assert [s for s, _ in history("accuracy/val")] == [1, 2, 3] == [s for s, _ in history("loss/train")]
    assert history("accuracy/train")[0] == (1, 0.6) and len(history("train/lr")) == 3
    assert len(history("train/step_loss")) == 750 and history("train/step_clipped")[0] == (1, 1.0)
    assert [s for s, _ in history("train/step_grad_norm")] == list(range(1, 751))
    assert run.data.metrics["accuracy/val_best"] == 0.7 and run.data.metrics["train/epochs_run"] == 3
    # The gradient trace as curves with step = distance from the last token (log10 of the norm).
    first, last = history("gradient/log10_dL_da_first_epoch"), history("gradient/log10_dL_da_last_epoch")
    assert [s for s, _ in first] == list(range(10)) and np.allclose([v for _, v in first], -np.arange(1, 11) * np.log10(2))
    assert np.allclose([v for _, v in last], -np.arange(3, 13) * np.log10(2))
    assert [s for s, _ in history("gradient/log10_dL_dc_last_epoch")] == list(range(12))

    # The datasets, with the files' DVC hashes as digests.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["imdb-train", "imdb-val"]
    assert inputs["imdb-train"].dataset.digest == dvc_md5(root / "data/prepared/train.npz")
    assert [t.value for t in inputs["imdb-val"].tags] == ["validation"]
    assert json.loads(inputs["imdb-val"].dataset.profile)["num_rows"] == 16

    # The model: a logged model of the run, predicting on raw text what rnn.load_model predicts.
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.source_run_id == run.info.run_id and model.tags["cell"] == "lstm"
    assert model.params["train.lr"] == "0.0005"
    assert [(m.key, m.value, m.dataset_name) for m in model.metrics] == [("accuracy/val_best", 0.7, "imdb-val")]
    files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "input_example.json", "pyfunc_model.py", "code", "artifacts"} <= files
    import mlflow.pyfunc
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", record["tracking_uri"])
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert pyfunc.metadata.get_input_schema().input_names() == ["text"]
    expected = rnn.load_model(folder).predict_proba(TEXTS)
    assert np.array_equal(np.asarray(pyfunc.predict(pd.DataFrame({"text": TEXTS}))), expected)

    # evaluate@lstm finds the run by the model folder's digest: test metrics go to the same run and model.
    evaluation = Tracker.for_model(make_params(), folder, "evaluate@lstm")
    assert (evaluation.run_id, evaluation.model_id) == (run.info.run_id, model.model_id)
    evaluation.log_datasets(root, {"test": 40})
    evaluation.log_test_metrics({"n": 40, "accuracy": 0.85, "f1": 0.84, "roc_auc": None, "log_loss": 0.4,
                                 "precision": 0.8, "recall": 0.9, "confusion": [[1, 2], [3, 4]]},
                                [{"min_length": 0, "accuracy": 0.9}, {"min_length": 100, "accuracy": 0.8}])
    evaluation.end()
    run = client.get_run(run.info.run_id)
    assert run.data.metrics["accuracy/test"] == 0.85 and run.data.metrics["loss/test"] == 0.4
    assert "test/roc_auc" not in run.data.metrics                   # None: one class only
    assert history("test/accuracy_by_length") == [(0, 0.9), (100, 0.8)]
    assert run.data.tags["dvc.stages"] == "train@lstm,evaluate@lstm" and run.info.status == "FINISHED"
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["imdb-test", "imdb-train", "imdb-val"]
    model = client.get_logged_model(model.model_id)
    assert {(m.key, m.dataset_name) for m in model.metrics} >= {("accuracy/test", "imdb-test"), ("test/f1", "imdb-test")}
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_store_failure_during_training_is_counted_not_raised(project, monkeypatch, capfd):
    tracker = Tracker.start(make_params(log_every_steps=50), cell="gru", stage="train@gru")
    capfd.readouterr()
    from mlflow.exceptions import MlflowException

    def down(*args, **kwargs):
        raise MlflowException("API request failed: Connection refused")

    monkeypatch.setattr(tracker.client, "log_batch", down)
    monkeypatch.setattr(tracker.client, "log_artifacts", down)
    monkeypatch.setattr(tracker.client, "create_logged_model", down)
    traces = simulate_fit(tracker, epochs=2, steps_per_epoch=100)      # must not raise
    folder = model_folder(project[0] / "model")
    tracker.log_model(folder)
    tracker.log_artifacts(folder, "model_files")
    tracker.log_summary(SUMMARY, traces)
    tracker.end()
    err = capfd.readouterr().err
    assert err.count("warning: mlflow") == 2                  # once when it broke, once at the end
    assert "Connection refused" in err and "could not log" in err
    # Unsent metrics are kept for a retry at each epoch end and counted once, at the end: steps,
    # epoch metrics, the first epoch's gradient trace, the summary and the last epoch's trace.
    assert tracker.lost["metrics"] == 200 * 4 + 2 * 11 + 22 + len(SUMMARY) + 22
    assert tracker.lost["artifacts"] == 1 and tracker.lost["models"] == 1


def test_metric_buffer_survives_a_temporary_outage(project, monkeypatch):
    tracker = Tracker.start(make_params(log_every_steps=50), cell="rnn", stage="train@rnn")
    original = tracker.client.log_batch
    outage = {"on": True}

    def flaky(*args, **kwargs):
        if outage["on"]:
            raise ConnectionError("down")
        return original(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", flaky)
    for step in range(1, 121):
        tracker.on_step({"step": step, "loss": 0.5, "grad_norm": 1.0, "grad_norm_clipped": 1.0, "clipped": False})
    outage["on"] = False
    tracker.end()
    assert tracker.lost["metrics"] == 0
    assert len(tracker.client.get_metric_history(tracker.run_id, "train/step_loss")) == 120


def test_log_metrics_rejects_non_numbers(project):
    tracker = Tracker.start(make_params(), cell="rnn", stage="train@rnn")
    with pytest.raises(TypeError, match="test/f1"):
        tracker.log_metrics({"test/f1": None})
    tracker.end()


def test_resumed_training_continues_its_run(project, capfd):
    root, _ = project
    run_file = root / "checkpoints" / "gru" / "k" / "mlflow_run.json"
    first = Tracker.start(make_params(), "gru", "train@gru", run_file=run_file)
    for step in (1, 2):
        first.on_step({"step": step, "loss": 0.5, "grad_norm": 1.0, "grad_norm_clipped": 1.0, "clipped": False})
    first.end("KILLED")                                # the interrupted attempt
    again = Tracker.start(make_params(), "gru", "train@gru", run_file=run_file, resume=True)
    assert again.run_id == first.run_id and again.client.get_run(again.run_id).info.status == "RUNNING"
    again.on_step({"step": 3, "loss": 0.4, "grad_norm": 1.0, "grad_norm_clipped": 1.0, "clipped": False})
    again.end()
    run = again.client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in again.client.get_metric_history(run.info.run_id, "train/step_loss")] == [1, 2, 3]
    assert "continuing MLflow run" in capfd.readouterr().out
    # Not resuming (no checkpoint), or a run the store does not have: a new run, the file rewritten.
    fresh = Tracker.start(make_params(), "gru", "train@gru", run_file=run_file)
    fresh.end()
    assert fresh.run_id != first.run_id and json.loads(run_file.read_text())["run_id"] == fresh.run_id
    run_file.write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": fresh.tracking_uri}))
    other = Tracker.start(make_params(), "gru", "train@gru", run_file=run_file, resume=True)
    other.end()
    assert other.run_id not in (fresh.run_id, "0" * 32) and "starts a new run" in capfd.readouterr().err
    assert len(other.client.search_runs([other.experiment_id])) == 3


def test_evaluate_without_a_training_run_starts_one_that_the_next_evaluate_finds(project, capfd):
    folder = model_folder(project[0] / "models" / "gru", "gru")
    tracker = Tracker.for_model(make_params(), folder, "evaluate@gru")
    tracker.end()
    assert "no run in" in capfd.readouterr().err and tracker.model_id is None
    run = tracker.client.get_run(tracker.run_id)
    assert run.data.tags["cell"] == "gru" and run.data.tags["model_digest"] == model_digest(folder)
    assert Tracker.for_model(make_params(), folder, "evaluate@gru").run_id == tracker.run_id
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")   # another model
    assert model_digest(folder) != run.data.tags["model_digest"]


def test_probe_runs_go_to_their_own_experiment_with_step_as_distance(project):
    tracker = Tracker.start(make_params(), "gru", "probe@gru")
    for d in (5, 50):
        tracker.log_metrics({"probe/accuracy": 1.0 - d / 100}, step=d)
    tracker.log_series("probe/log10_dL_da_last_steps", [1.0, 0.1, 0.0, 0.01])
    tracker.end()
    run = tracker.client.get_run(tracker.run_id)
    assert tracker.client.get_experiment(run.info.experiment_id).name == "memory-probe"
    assert run.info.run_name == "probe@gru (exp-abc12)"
    history = tracker.client.get_metric_history(run.info.run_id, "probe/log10_dL_da_last_steps")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, -1.0), (3, -2.0)]   # 0 has no log
    assert sorted(m.step for m in tracker.client.get_metric_history(run.info.run_id, "probe/accuracy")) == [5, 50]


def test_system_metrics_are_logged_while_training(project):
    pytest.importorskip("psutil")
    tracker = Tracker.start(make_params(system_metrics_every=0.05), "rnn", "train@rnn")
    time.sleep(0.5)                        # a few samples (the monitor is a thread of this process)
    tracker.end()
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


# ------------------------------------------------------------------------------------------
# (b) where runs go


def test_root_maps_queued_experiment_copies_back_to_the_repo(tmp_path):
    repo = tmp_path / "repo"
    for copy in (".dvc/tmp/exps/tmpab12cd", ".dvc/tmp/exps/standalone/tmpxyz/sub"):
        assert resolve_root({"DVC_ROOT": str(repo / copy)}) == repo
    assert resolve_root({"DVC_ROOT": str(repo)}) == repo
    # Relative DVC_ROOT is taken from cwd; the result is always absolute.
    assert resolve_root({"DVC_ROOT": "repo"}, cwd=tmp_path) == repo
    assert resolve_root({"DVC_ROOT": "repo/.dvc/tmp/exps/tmp1"}, cwd=tmp_path) == repo
    # Without DVC: the nearest directory holding params.yaml, from a subdirectory too.
    (repo / "stages").mkdir(parents=True)
    (repo / "params.yaml").write_text("{}")
    assert resolve_root({}, cwd=repo / "stages") == repo
    with pytest.raises(FileNotFoundError, match="params.yaml"):
        resolve_root({}, cwd=tmp_path)


def test_tracking_location_default_is_absolute_and_env_uri_wins(tmp_path):
    uri, artifacts = tracking_location(tmp_path, {})
    assert uri == f"sqlite:///{tmp_path}/mlflow.db" and uri.startswith("sqlite:////")
    assert artifacts == f"file://{tmp_path}/mlartifacts"
    assert tracking_location(tmp_path, {"MLFLOW_TRACKING_URI": "http://h:5000"}) == ("http://h:5000", None)
    assert tracking_location(tmp_path, {"MLFLOW_TRACKING_URI": " "}) == (uri, artifacts)
    # A SQLite URI from the environment: relative paths from the root, artifacts beside the file.
    other = tmp_path / "elsewhere"
    assert tracking_location(tmp_path, {"MLFLOW_TRACKING_URI": f"sqlite:///{other}/t.db?timeout=30"}) == (
        f"sqlite:///{other}/t.db?timeout=30", f"file://{other}/mlartifacts")
    assert tracking_location(tmp_path, {"MLFLOW_TRACKING_URI": "sqlite:///runs/t.db"}) == (
        f"sqlite:///{tmp_path}/runs/t.db", f"file://{tmp_path}/runs/mlartifacts")


# ------------------------------------------------------------------------------------------
# (c) a real tracking server over HTTP, which then goes away mid-training


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(fast_tmp):
    tmp_path = fast_tmp
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{base}/health", proc, tmp_path / "server.log", "mlflow server")
        yield base, proc
    finally:
        stop_group(proc)
        log.close()


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, what: str, seconds: float = 120) -> None:
    """Poll url until it answers; fail with the end of `log` if proc exits or `seconds` pass
    (~10 s idle, much more on a loaded 2-core machine)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)


def stop_group(proc: subprocess.Popen) -> None:
    """Kill the server and its uvicorn worker (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    deadline = time.monotonic() + 10             # the worker goes with it (reaped shortly after)
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "mlflow server worker survived"
        time.sleep(0.1)


def test_runs_logged_over_http_are_found_through_the_rest_api(project, mlflow_server, monkeypatch, capfd):
    base, proc = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    tracker = Tracker.start(make_params(), cell="gru", stage="train@gru")
    simulate_fit(tracker, epochs=2, steps_per_epoch=60)
    folder = model_folder(project[0] / "models" / "gru", "gru")
    tracker.set_model_digest(folder)
    tracker.log_model(folder)           # its files go through the server (mlflow-artifacts:)
    tracker.log_artifacts(folder, "model_files")
    tracker.end()
    assert tracker.lost == dict.fromkeys(tracker.lost, 0)

    experiment = rest(base, "experiments/get-by-name", experiment_name="imdb-sentiment")["experiment"]
    runs = rest(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [tracker.run_id]
    run = runs[0]
    assert run["info"]["run_name"] == "gru (exp-abc12)" and run["info"]["status"] == "FINISHED"
    assert {"key": "train.clip.mode", "value": "norm"} in run["data"]["params"]
    assert {"key": "cell", "value": "gru"} in run["data"]["tags"]
    loss = rest(base, "metrics/get-history", run_id=tracker.run_id, metric_key="train/step_loss")["metrics"]
    assert len(loss) == 120
    # Another machine sharing the server finds the run by the model folder (after `dvc pull`).
    assert Tracker.for_model(make_params(), folder, "evaluate@gru").run_id == tracker.run_id
    assert len(rest(base, "logged-models/search", {"experiment_ids": [experiment["experiment_id"]]})["models"]) == 1
    files = rest(base, "artifacts/list", run_id=tracker.run_id, path="model_files")["files"]
    assert {f["path"] for f in files} == {f"model_files/{f.name}" for f in folder.iterdir()}
    local = MlflowClient(f"sqlite:///{project[0]}/mlflow.db")
    assert local.get_experiment_by_name("imdb-sentiment") is None      # nothing went to the local store

    # The server goes away in the middle of training: training goes on, losses are reported.
    tracker = Tracker.start(make_params(log_every_steps=10), cell="gru", stage="train@gru")
    for step in range(1, 21):
        tracker.on_step({"step": step, "loss": 0.5, "grad_norm": 1.0, "grad_norm_clipped": 1.0, "clipped": False})
    stop_group(proc)
    t0 = time.monotonic()
    simulate_fit(tracker, epochs=1, steps_per_epoch=30)
    tracker.log_artifacts(folder, "model_files")
    tracker.end()
    assert time.monotonic() - t0 < 20
    assert tracker.lost["metrics"] == 30 * 4 + 11 + 22 and tracker.lost["artifacts"] == 1
    assert "could not log" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------
# (d) nothing listening


def test_unreachable_server_fails_fast_with_one_line(project, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        Tracker.start(make_params(), cell="lstm", stage="train@lstm")
    assert time.monotonic() - t0 < 3
    message = str(info.value)
    assert uri in message and "unreachable" in message and "mlflow.enabled: false" in message
    assert "\n" not in message and isinstance(info.value, OSError)   # run_stage prints it as one line


# ------------------------------------------------------------------------------------------
# (e) parallel train stages against a fresh project


PARALLEL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from stages.tracking import Tracker
import mlflow  # imported before the barrier so both processes reach Tracker.start together
cell, barrier = sys.argv[1], Path(sys.argv[2])
(barrier / cell).touch()
while len(list(barrier.iterdir())) < 2:
    time.sleep(0.01)
from stages import settings
t = Tracker.start(settings.validate({{"train": {{"lr": 0.1}}}}), cell, "train@" + cell)
t.log_metrics({{"val_accuracy": 0.5}}, step=1)
t.end()
print(t.run_id, sum(t.lost.values()))
"""


def test_parallel_starts_on_a_fresh_store_both_land(fast_tmp):
    tmp_path = fast_tmp
    root = tmp_path / "proj"
    barrier = tmp_path / "barrier"
    root.mkdir()
    barrier.mkdir()
    script = tmp_path / "start.py"
    script.write_text(PARALLEL_SCRIPT.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    env["DVC_ROOT"] = str(root)
    procs = [subprocess.Popen([sys.executable, str(script), cell, str(barrier)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cell in ("rnn", "lstm")]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
        assert out.split()[1] == "0", err[-2000:]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("imdb-sentiment")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["cell"] for r in runs) == ["lstm", "rnn"]
    assert {r.info.run_id for r in runs} == {out.split()[0] for out, _ in outputs}
    assert all(r.data.metrics["val_accuracy"] == 0.5 for r in runs)


# ------------------------------------------------------------------------------------------
# (f) tracking off


def test_disabled_tracking_creates_no_store_and_imports_no_mlflow(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from stages import settings
        from stages.tracking import Tracker
        params = settings.validate({{"mlflow": {{"enabled": False}}, "train": {{"lr": 0.1}}}})
        t = Tracker.start(params, "lstm", "train@lstm", run_file="run.json")
        assert t.client is None and t.run_id is None
        t.log_params({{"a": 1}}); t.log_metrics({{"m": 1.0}}, step=1); t.log_series("s", [1.0])
        t.log_datasets(Path("."), {{"train": 1}}); t.on_step({{}}); t.on_epoch({{}})
        t.set_model_digest(Path("x")); t.log_model(Path("x")); t.log_summary({{}}, [])
        t.log_test_metrics({{}}, []); t.log_artifact("x"); t.log_artifacts("x"); t.end()
        assert Tracker.for_model(params, "x", "evaluate@lstm").client is None
        with Tracker.start(params, "lstm", "probe@lstm") as t:     # what the probe stage does
            t.log_metrics({{"m": 1.0}})
        print("mlflow" in sys.modules)
    """)
    env = {**os.environ, "DVC_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert list(tmp_path.iterdir()) == []                  # no store, no run file


def test_stages_turn_off_mlflow_telemetry_before_importing_mlflow(tmp_path):
    """Its thread sets and removes an environment variable while requests reads the environment:
    a sweep lost a run's params to "log-batch failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'"."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import stages.tracking
        import mlflow
        from mlflow.telemetry.client import get_telemetry_client
        from mlflow.telemetry.utils import _is_ci_env_or_testing, is_telemetry_disabled
        print(_is_ci_env_or_testing(), is_telemetry_disabled(), get_telemetry_client())
    """)
    # MLflow also stays quiet under pytest and in CI (PYTEST_CURRENT_TEST, CI, ...), which is why
    # no test saw the race: the stage must run as it does for a user (the script checks that).
    quiet = {"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS",
             "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER",
             "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION",
             "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID"}
    env = {k: v for k, v in os.environ.items() if k not in quiet}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "None"]


# ------------------------------------------------------------------------------------------
# (g) the stages with tracking on, and the logged model served over HTTP


@pytest.fixture
def stage_project(project, monkeypatch):
    """`project` with tiny synthetic prepared data and embeddings, and params for a tiny rnn."""
    root, _ = project
    rng = np.random.default_rng(0)
    V, T = 20, 10
    tokens = ["<pad>", "<unk>"] + [f"w{i}" for i in range(2, V)]
    for split, n in (("train", 48), ("val", 16), ("test", 24)):
        lengths = rng.integers(2, T + 1, n)
        ids = np.where(np.arange(T) < lengths[:, None], rng.integers(2, V, (n, T)), 0).astype(np.int32)
        labels = (ids == 2).any(1).astype(np.int8)
        path = root / "data" / "prepared" / f"{split}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, ids=ids, lengths=lengths.astype(np.int32), labels=labels)
    (root / "data/prepared/vocab.json").write_text(json.dumps({"tokens": tokens, "max_len": T, "truncate": "head"}))
    np.save(root / "data/embeddings.npy", rng.normal(0, 0.3, (V, 4)).astype(np.float32))
    params = {"train": {"cells": ["rnn"], "epochs": 2, "batch_size": 16, "hidden_size": 3, "embed_dim": 4,
                        "workers": 1, "init": "embeddings"},
              "mlflow": {"system_metrics_every": 0}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.delenv("DVC_EXP_NAME")
    return root


def run_stage(module, *argv: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()


def test_identical_training_writes_identical_model_folders_and_evaluate_finds_the_newest_run(
        stage_project, monkeypatch):
    root = stage_project
    folders = []
    for _ in range(2):
        run_stage(train, "rnn", "0", monkeypatch=monkeypatch)
        folder = root / "models" / "rnn" / "seed0"
        folders.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
        time.sleep(2.1)                      # zip timestamps (2 s steps) or a clock in a file would differ
    assert sorted(folders[0]) == ["config.json", "encoder.json", "weights.npz"]      # no run id
    assert folders[0] == folders[1], "same code, params and data must give the same bytes (DVC dedupes)"
    run_stage(evaluate, "rnn", "0", monkeypatch=monkeypatch)

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("imdb-sentiment")
    older, newer = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert older.data.tags["model_digest"] == newer.data.tags["model_digest"] == model_digest(root / "models/rnn/seed0")
    assert "accuracy/test" in newer.data.metrics and "accuracy/test" not in older.data.metrics
    expected = json.loads((root / "metrics/rnn/seed0/eval.json").read_text())["accuracy"]
    assert newer.data.metrics["accuracy/test"] == expected
    assert newer.data.metrics["accuracy/val_best"] == json.loads((root / "metrics/rnn/seed0/train.json").read_text())[
        "best_val_accuracy"]
    assert newer.data.tags["dvc.stages"] == "train@rnn-0,evaluate@rnn-0" and newer.info.status == "FINISHED"
    datasets = {d.dataset.name: d.dataset.digest for d in newer.inputs.dataset_inputs}
    assert datasets == {f"imdb-{s}": dvc_md5(root / f"data/prepared/{s}.npz") for s in ("train", "val", "test")}
    # The gradient trace as table and figure (the stage's plots/rnn/seed0/grad_trace.*).
    names = {a.path for a in client.list_artifacts(newer.info.run_id, "grad_trace")}
    assert names == {"grad_trace/grad_trace.csv", "grad_trace/grad_trace.png"}
    local = Path(client.download_artifacts(newer.info.run_id, "grad_trace", str(root / "dl")))
    assert (local / "grad_trace.png").read_bytes()[:8] == PNG_MAGIC
    rows = outputs.read_csv(local / "grad_trace.csv", "train", outputs.TRACE_COLUMNS)
    assert {r["epoch"] for r in rows} == {"1", "2"} and {r["state"] for r in rows} == {"a"}


def test_register_setting_makes_each_trained_model_a_registered_version(project):
    for version in ("1", "2"):                # one version per training run
        tracker = Tracker.start(make_params(register=True), "gru", "train@gru")
        tracker.log_model(model_folder(project[0] / "models" / "gru", "gru"))
        tracker.end()
        registered = tracker.client.get_model_version("imdb-sentiment-gru", version)
        assert (registered.run_id, registered.source) == (tracker.run_id, f"models:/{tracker.model_id}")
    plain = Tracker.start(make_params(), "rnn", "train@rnn")            # off by default
    plain.log_model(model_folder(project[0] / "models" / "rnn", "rnn"))
    plain.end()
    assert plain.client.search_registered_models(filter_string="name = 'imdb-sentiment-rnn'") == []


def test_logged_model_answers_invocations_on_loopback(project, tmp_path):
    root, _ = project
    tracker = Tracker.start(make_params(), "lstm", "train@lstm")
    folder = model_folder(root / "models" / "lstm")
    tracker.log_model(folder)
    tracker.end()
    assert tracker.model_id is not None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DVC_ROOT")}
    # uvicorn is looked up on PATH; the model's own copy of `rnn` is what it loads.
    env.update(MLFLOW_TRACKING_URI=tracker.tracking_uri, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    away = tmp_path / "elsewhere"                  # not the project: nothing importable from cwd
    away.mkdir()
    log = open(away / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{tracker.run_id}/model",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=away, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def invoke(texts: list) -> tuple[int, dict]:
        body = json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    too_long = "good " * (MAX_REVIEW_BYTES // 5) + "film"          # 1 MiB and 4 bytes
    try:
        wait_until_answers(f"{base}/ping", proc, away / "serve.log", "mlflow models serve")
        status, answer = invoke(TEXTS)
        refused = {repr(bad)[:20]: invoke(["good film", bad]) for bad in (5, None, ["good", "film"], too_long)}
        again = invoke(TEXTS)
    finally:
        stop_group(proc)
        log.close()
    assert status == 200 and again == (status, answer)
    assert np.allclose(answer["predictions"], rnn.load_model(folder).predict_proba(TEXTS), rtol=0, atol=1e-12)
    # Not a review: refused with 400 naming the field, before anything is tokenized.
    for bad, (status, answer) in refused.items():
        assert status == 400 and "field 'text' of row 1" in answer["message"], (bad, answer)
    assert "not null" in refused["None"][1]["message"] and "not int 5" in refused["5"][1]["message"]
    assert "at most 1048576 bytes" in refused[repr(too_long)[:20]][1]["message"]


def test_rnn_ui_links_to_the_experiment_as_model_training_charts(project, monkeypatch, capsys):
    from rnn import cli

    Tracker.start(make_params(), "rnn", "train@rnn").end()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["ui", "--link-only", "--port", "5999"]) == 0
    assert capsys.readouterr().out.strip() == (
        "http://127.0.0.1:5999/#/experiments/1/runs?workflowType=machine_learning&compareRunsMode=CHART")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///nowhere.db")
    assert cli.main(["ui", "--link-only"]) == 2
    assert "no MLflow store" in capsys.readouterr().err


def test_interrupted_train_stage_resumes_into_the_same_run(stage_project, monkeypatch):
    root = stage_project
    original = train.Progress.on_step

    def ctrl_c_at_step_3(self, info):
        original(self, info)
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)       # fit stops after this step, checkpoint saved

    monkeypatch.setattr(train.Progress, "on_step", ctrl_c_at_step_3)
    with pytest.raises(SystemExit) as stopped:
        run_stage(train, "rnn", "0", monkeypatch=monkeypatch)
    assert stopped.value.code == 130
    [run_file] = (root / "checkpoints" / "rnn").glob("*/mlflow_run.json")
    run_id = json.loads(run_file.read_text())["run_id"]
    monkeypatch.setattr(train.Progress, "on_step", original)
    run_stage(train, "rnn", "0", monkeypatch=monkeypatch)

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("imdb-sentiment").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/step_loss")]
    assert sorted(steps) == list(range(1, 7))       # 2 epochs x 3 batches, each step once
    assert run.data.metrics["train/resumed"] == 1 and not run_file.exists()
