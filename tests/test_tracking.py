"""stages/tracking.py: MLflow runs from the train/evaluate stages, into SQLite and a real server."""

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
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from stages import outputs, settings  # noqa: E402
from stages.mlstore import TrackingUnavailable, resolve_root, tracking_location  # noqa: E402
from stages.tracking import NullTracker, Tracker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_params(log_every_steps: int = 200, **mlflow) -> settings.Params:
    return settings.validate({
        "data": {"limit": 100},
        "prepare": {"max_len": 12},
        "train": {"cells": ["gru", "lstm"], "lr": 0.001, "optimizer": "adam",
                  "clip": {"mode": "norm", "threshold": 5.0},
                  "overrides": {"lstm": {"lr": 0.0005, "clip": {"threshold": 1.0}}, "gru": {"lr": 9.0}}},
        "mlflow": {"log_every_steps": log_every_steps, **mlflow},
    })


def simulate_fit(tracker, epochs: int = 3, steps_per_epoch: int = 250, T: int = 12) -> None:
    """Call the callbacks the way rnn.train.fit does (same info keys), without any training."""
    step = 0
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
        tracker.on_epoch({"epoch": epoch, "step": step, "train_loss": 0.6, "train_accuracy": 0.5 + epoch / 10,
                          "val_loss": 0.65, "val_accuracy": 0.5 + epoch / 20, "seconds": 1.5,
                          "val_seconds": 0.2, "tokens_per_s": 1e5, "grad_norm_mean": 1.0,
                          "grad_norm_max": 10.0, "clipped_fraction": 0.01, "trace": trace})


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


def test_training_run_lands_in_sqlite_store_and_evaluate_adds_to_it(project, monkeypatch, tmp_path):
    root, commit = project
    calls = count_log_batch(monkeypatch)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.npz").write_bytes(b"npz")
    (model_dir / "config.json").write_text("{}")

    params = make_params()
    tracker = Tracker.start(params, cell="lstm", stage="train@lstm", run_hash=settings.run_hash(params, "lstm"))
    tracker.log_params({"data.train_reviews": 900, "data.vocab_size": 20000, "note": "x" * 7000})
    simulate_fit(tracker, epochs=3, steps_per_epoch=250)
    tracker.log_artifacts(model_dir, "model")
    (root / "run.json").write_text(json.dumps(tracker.run_record()))
    tracker.end()

    # Buffering: 750 steps x 4 metrics went out in 2 requests per epoch (200 steps, then the rest
    # with the epoch metrics), each within MLflow's 1000-metric limit - not one per step.
    metric_calls = [m for m, _ in calls if m]
    assert len(metric_calls) == 6 and max(metric_calls) <= 1000
    assert sum(metric_calls) == 750 * 4 + 3 * 10
    settings_logged = len(settings.cell_settings(params, "lstm")) + 3     # clip has two keys; overrides, workers
    assert [p for _, p in calls if p] == [settings_logged, 3]      # all train params in one request

    record = json.loads((root / "run.json").read_text())
    assert set(record) == {"run_id", "tracking_uri", "experiment_id"}
    assert record["tracking_uri"] == f"sqlite:///{root}/mlflow.db" and (root / "mlflow.db").is_file()
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "lstm (exp-abc12)" and run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "imdb-sentiment"
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()

    tags = run.data.tags
    assert tags["cell"] == "lstm" and tags["dvc.stage"] == "train@lstm"
    assert tags["dvc.exp_name"] == "exp-abc12" and tags["dvc.baseline_rev"] == "b" * 40
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["params_hash"] == settings.run_hash(params, "lstm")

    params = run.data.params
    # The values lstm trained with: its overrides on top, other cells' overrides left out.
    assert params["train.lr"] == "0.0005" and params["train.clip.threshold"] == "1.0"
    assert params["train.clip.mode"] == "norm" and params["train.optimizer"] == "adam"
    assert params["train.overrides"] == '{"clip": {"threshold": 1.0}, "lr": 0.0005}'
    assert not any(k.startswith(("train.cells", "train.overrides.")) for k in params)
    assert params["train.workers"] == "auto" and params["data.vocab_size"] == "20000"
    assert len(params["note"]) == 6000 and params["note"].endswith("...")

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert len(history("loss")) == 750 and len(history("clipped")) == 750
    assert sorted(s for s, _ in history("grad_norm")) == list(range(1, 751))
    assert history("clipped")[0] == (1, 1.0)
    assert [s for s, _ in sorted(history("val_accuracy"))] == [1, 2, 3]
    assert len(history("epoch_seconds")) == len(history("tokens_per_s")) == 3

    names = {a.path for a in client.list_artifacts(run.info.run_id, "grad_trace")}
    assert names == {"grad_trace/grad_trace.csv", "grad_trace/grad_trace.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/weights.npz", "model/config.json"}
    local = Path(client.download_artifacts(run.info.run_id, "grad_trace", str(tmp_path / "dl")))
    assert (local / "grad_trace.png").read_bytes()[:8] == PNG_MAGIC
    rows = outputs.read_csv(local / "grad_trace.csv", "train", outputs.TRACE_COLUMNS)
    assert {r["epoch"] for r in rows} == {"1", "2", "3"} and {r["state"] for r in rows} == {"a", "c"}
    last = outputs.trace_series(rows, 3)
    assert last["a"][0].tolist() == list(range(10)) and last["a"][1][1] == 0.5 ** 4
    assert len(outputs.trace_series(rows, 1)["c"][0]) == 12

    # evaluate@lstm: same run, test metrics added, status left as the train stage set it.
    evaluation = Tracker.resume(make_params(), root / "run.json", "evaluate@lstm")
    assert evaluation.run_id == record["run_id"]
    evaluation.log_metrics({"test_accuracy": 0.85, "test_f1": 0.84, "test_roc_auc": 0.91})
    evaluation.end()
    run = client.get_run(record["run_id"])
    assert run.data.metrics["test_accuracy"] == 0.85 and run.data.metrics["test_roc_auc"] == 0.91
    assert run.data.tags["dvc.stages"] == "train@lstm,evaluate@lstm" and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_store_failure_during_training_is_counted_not_raised(project, monkeypatch, capfd):
    tracker = Tracker.start(make_params(log_every_steps=50), cell="gru", stage="train@gru")
    capfd.readouterr()
    from mlflow.exceptions import MlflowException

    def down(*args, **kwargs):
        raise MlflowException("API request failed: Connection refused")

    monkeypatch.setattr(tracker.client, "log_batch", down)
    monkeypatch.setattr(tracker.client, "log_artifacts", down)
    simulate_fit(tracker, epochs=2, steps_per_epoch=100)      # must not raise
    tracker.end()
    err = capfd.readouterr().err
    assert err.count("warning: mlflow") == 2                  # once when it broke, once at the end
    assert "Connection refused" in err and "could not log" in err
    # Unsent metrics are kept for a retry at each epoch end and counted once, at the end.
    assert tracker.lost["metrics"] == 200 * 4 + 2 * 10
    assert tracker.lost["artifacts"] == 2


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
    assert len(tracker.client.get_metric_history(tracker.run_id, "loss")) == 120


def test_log_metrics_rejects_non_numbers(project):
    tracker = Tracker.start(make_params(), cell="rnn", stage="train@rnn")
    with pytest.raises(TypeError, match="test_f1"):
        tracker.log_metrics({"test_f1": None})
    tracker.end()


def test_resume_of_a_run_missing_from_the_store_starts_a_new_run(project, capfd):
    root, _ = project
    (root / "run.json").write_text(json.dumps({"run_id": "0" * 32, "tracking_uri": "x", "experiment_id": "1"}))
    tracker = Tracker.resume(make_params(), root / "run.json", "evaluate@gru")
    assert tracker.run_id not in (None, "0" * 32)
    assert "not in" in capfd.readouterr().err
    assert tracker.client.get_run(tracker.run_id).data.tags["cell"] == "gru"
    tracker.end()
    (root / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        Tracker.resume(make_params(), root / "bad.json", "evaluate@gru")


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
        deadline = time.monotonic() + 120      # ~10 s idle; much more on a loaded 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield base, proc
    finally:
        stop_group(proc)
        log.close()


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
    tracker.end()

    experiment = rest(base, "experiments/get-by-name", experiment_name="imdb-sentiment")["experiment"]
    runs = rest(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in runs] == [tracker.run_id]
    run = runs[0]
    assert run["info"]["run_name"] == "gru (exp-abc12)" and run["info"]["status"] == "FINISHED"
    assert {"key": "train.clip.mode", "value": "norm"} in run["data"]["params"]
    assert {"key": "cell", "value": "gru"} in run["data"]["tags"]
    loss = rest(base, "metrics/get-history", run_id=tracker.run_id, metric_key="loss")["metrics"]
    assert len(loss) == 120
    files = rest(base, "artifacts/list", run_id=tracker.run_id, path="grad_trace")["files"]
    assert {f["path"] for f in files} == {"grad_trace/grad_trace.csv", "grad_trace/grad_trace.png"}
    local = MlflowClient(f"sqlite:///{project[0]}/mlflow.db")
    assert local.get_experiment_by_name("imdb-sentiment") is None      # nothing went to the local store

    # The server goes away in the middle of training: training goes on, losses are reported.
    tracker = Tracker.start(make_params(log_every_steps=10), cell="gru", stage="train@gru")
    for step in range(1, 21):
        tracker.on_step({"step": step, "loss": 0.5, "grad_norm": 1.0, "grad_norm_clipped": 1.0, "clipped": False})
    stop_group(proc)
    t0 = time.monotonic()
    simulate_fit(tracker, epochs=1, steps_per_epoch=30)
    tracker.end()
    assert time.monotonic() - t0 < 20
    assert tracker.lost["metrics"] == 30 * 4 + 10 and tracker.lost["artifacts"] == 1
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
        import json
        from stages import settings
        from stages.tracking import NullTracker, Tracker
        params = settings.validate({{"mlflow": {{"enabled": False}}, "train": {{"lr": 0.1}}}})
        t = Tracker.start(params, "lstm", "train@lstm")
        assert type(t) is NullTracker and t.run_id is None
        t.log_params({{"a": 1}}); t.log_metrics({{"m": 1.0}}, step=1)
        t.on_step({{}}); t.on_epoch({{}}); t.log_artifact("x"); t.log_artifacts("x")
        open("run.json", "w").write(json.dumps(t.run_record())); t.end()
        assert type(Tracker.resume(params, "run.json", "evaluate@lstm")) is NullTracker
        print("mlflow" in sys.modules)
    """)
    env = {**os.environ, "DVC_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    assert json.loads((tmp_path / "run.json").read_text()) == {
        "run_id": None, "tracking_uri": None, "experiment_id": None}


def test_null_tracker_is_a_context_manager():
    with NullTracker() as t:
        t.end("FAILED")
