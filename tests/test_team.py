"""The team flow of the README ("Working as a team"), for real, on one machine over loopback.

PostgreSQL, an S3 endpoint (moto) and an MLflow server backed by both (tests/team_services.py); a
bare git repository as the git remote and a DVC remote in the bucket. A lead clone runs the
baseline and pushes it; two clones act as two machines, each queueing its half of a 4-point sweep
with scripts/sweep.py and running it with `dvc queue start`, both at once, then pushing; a third
clone pulls everything and finds every point in `dvc exp show -A`, every cell's MLflow run of every
point with its artifacts in the bucket, and a working model from `dvc pull`. The machines hold no
S3 credentials in their environment: DVC reads them from .dvc/config.local, MLflow uploads go
through the server.

Nothing answers without a password (docs/team-security.md): each clone has its own MLflow account
(machine-a in MLFLOW_TRACKING_USERNAME/PASSWORD, machine-b in a credentials file under its HOME);
the lead's pipeline creates the experiments, so it manages them, and shares them with the two
machines (EDIT). Anonymous requests get 401; a reader cannot write, a machine cannot delete
another's runs, nobody but its owner touches a personal experiment (403, data unchanged).
PostgreSQL takes passwords only, MLflow's role is no superuser, and no secret is on a command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import team_services
from helpers import build_imdb_archive, copy_project
from rnn.parallel import resolve_workers
from stages import settings

REPO = Path(__file__).resolve().parents[1]
COPY = ["rnn", "stages", "sweeps", "scripts/sweep.py", "params.yaml", "dvc.yaml", ".dvc/config", ".dvc/.gitignore",
        ".dvcignore", "pyproject.toml", ".gitignore"]
CELLS = ["rnn", "lstm"]
# 4 points, none the baseline. Each cell's learning rate on its own axis, so the two points of a
# share have one cell's settings in common: that cell's stages come from DVC's run cache the second
# time, and a point costs 3 stages there instead of 5.
LRS = (0.001, 0.005)
GRID = ["-S", "+train.overrides.rnn.lr=0.001,0.005", "-S", "+train.overrides.lstm.lr=0.001,0.005"]
LOCAL_CONFIG = """['remote "storage"']
    access_key_id = testing
    secret_access_key = testing
"""
QUEUE_TIMEOUT_S = 900        # both machines' queues: 100-140 s seen on a busy 2-core machine
COMMAND_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(
    bool(team_services.missing()) and not os.environ.get("RNN_TEAM_TEST_REQUIRED"),
    reason=f"team flow needs its services: {team_services.missing()}")


T0 = [time.monotonic()]


def _mark(what: str) -> None:
    """Phase times, printed (shown by pytest -s or on failure)."""
    now = time.monotonic()
    print(f"[team] {what}: {now - T0[0]:.1f} s", flush=True)
    T0[0] = now


def _run(args: list[str], cwd: Path, env: dict, timeout: float = COMMAND_TIMEOUT_S) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} in {cwd} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _project(root: Path) -> None:
    """The project's files with tiny settings (as in test_pipeline_e2e) and one data worker."""
    copy_project(COPY, REPO, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["limit"] = 200
    params["prepare"].update(max_len=40, vocab_size=300, min_freq=1)
    params["train"].update(cells=CELLS, seeds=[0], epochs=1, hidden_size=16, embed_dim=16, batch_size=32, workers=1)
    params["pretrain"].update(num_sampled=64, val_reviews=20)
    params["probe"].update(cells=["rnn"], distances=[1, 3], lead=3, steps=4, trace_steps=2, test_size=16,
                           batch_size=8, hidden_size=4)
    params["mlflow"]["enabled"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _env(tmp_path: Path, tracking_uri: str, user: team_services.Credentials | None = None,
         home: Path | None = None) -> dict:
    """A machine's environment: its MLflow account in MLFLOW_TRACKING_USERNAME/PASSWORD, or with
    home, in <home>/.mlflow/credentials (MLflow's other way), and nothing else of MLflow's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "AWS_", "PG"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=tracking_uri,
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        CI="1",
    )
    if user is not None and home is not None:
        (home / ".mlflow").mkdir(parents=True)
        user.write(home / ".mlflow" / "credentials")
        env["HOME"] = str(home)
    elif user is not None:
        env.update(user.env())
    return env


def _clone(origin: Path, root: Path, env: dict) -> Path:
    """A machine joining: clone, its own S3 credentials in .dvc/config.local, `dvc pull`."""
    _run(["git", "clone", "-q", str(origin), str(root)], root.parent, env)
    # What the lead's two `dvc remote modify --local` commands wrote (each costs a second of CPU).
    (root / ".dvc" / "config.local").write_text(LOCAL_CONFIG)
    _dvc(["pull"], root, env)
    return root


def _dvc(args: list[str], cwd: Path, env: dict, timeout: float = COMMAND_TIMEOUT_S) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env, timeout)


def _queue_rows(root: Path, env: dict) -> dict[str, str]:
    """{experiment name: status} from `dvc queue status` (Queued, Running, Success or Failed)."""
    rows = {}
    for line in _dvc(["queue", "status"], root, env).splitlines():
        words = line.split()
        if len(words) >= 3 and words[-1] in ("Queued", "Running", "Success", "Failed"):
            rows[words[1]] = words[-1]
    return rows


def _wait_for_queues(expected: dict[Path, list[str]], env: dict) -> None:
    """Until every machine has its experiments: their refs appear as each one is collected (cheap
    to look at; `dvc queue status` costs a few seconds of CPU, so it is asked only now and then,
    to stop early on a failed experiment)."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    next_status = time.monotonic() + 45
    while True:
        missing = {m: [n for n in names if n not in _exp_refs(m, env)] for m, names in expected.items()}
        if not any(missing.values()):
            return
        now = time.monotonic()
        if now > next_status or now > deadline:
            next_status = now + 45
            for machine in missing:
                failed = [n for n, status in _queue_rows(machine, env).items() if status == "Failed"]
                for name in failed:
                    logs = subprocess.run([sys.executable, "-m", "dvc", "queue", "logs", name], cwd=machine,
                                          env=env, capture_output=True, text=True, timeout=60).stdout
                    pytest.fail(f"{machine.name}: experiment {name} failed:\n{logs[-4000:]}")
            assert now < deadline, f"experiments not done after {QUEUE_TIMEOUT_S} s: {missing}"
        time.sleep(1)


def _exp_refs(root: Path, env: dict) -> set[str]:
    """Names of the experiments in a clone (refs/exps/<baseline>/<name>)."""
    out = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], root, env)
    return {line.rsplit("/", 1)[1] for line in out.split()}


def _stop_leftovers(folder: Path, wait_s: float) -> None:
    """End what the test started that still runs in its folders, by pid: DVC's queue workers, which
    leave by themselves 10 s after their queue empties (waited for up to wait_s), and after a
    failure the experiments they were running."""
    deadline = time.monotonic() + wait_s
    while _pids_in(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    for _ in range(5):
        pids = _pids_in(folder)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    raise AssertionError(f"processes in {folder} survived SIGKILL: {_pids_in(folder)}")


def _pids_in(folder: Path) -> list[int]:
    """Processes (not this one) whose working directory is inside folder."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if int(proc.name) != os.getpid() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                pids.append(int(proc.name))
    return pids


def _queued_names(sweep_output: str) -> list[str]:
    """The experiment names scripts/sweep.py printed as queued."""
    return [line.split(":")[0].strip() for line in sweep_output.splitlines() if line.startswith("  ")]


def _exp_points(shown: list) -> dict[str, dict]:
    """{experiment name: its params.yaml} from `dvc exp show -A --json`."""
    points = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                if rev.get("name"):
                    points[rev["name"]] = rev["data"]["params"]["params.yaml"]["data"]
    return points


def _permission(svc, username: str, experiment_id: str) -> str:
    """A user's permission on an experiment, as MLflow's auth app resolves it (asked as the admin)."""
    status, body = team_services.call(svc.tracking_uri, "/api/3.0/mlflow/users/permissions/get", "GET", svc.admin,
                                      {"username": username, "resource_type": "experiment",
                                       "resource_id": experiment_id})
    assert status == 200, body
    return body["permission"]


def _check_database(svc) -> None:
    """PostgreSQL takes passwords only; MLflow's role is no superuser and owns its two databases;
    the secrets' files are the owner's only."""
    import psycopg
    from urllib.parse import urlsplit

    uri = urlsplit(svc.database_uri)
    assert uri.password is None, "the database URI holds a password"
    address = {"host": uri.hostname, "port": uri.port, "connect_timeout": 5}
    for user in ("postgres", team_services.DB_ROLE):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(**address, user=user, dbname="postgres", passfile=str(svc.secrets / "absent"))
    with psycopg.connect(**address, user=uri.username, dbname=uri.path.lstrip("/"),
                         passfile=str(svc.secrets / "pgpass")) as conn:
        role = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication FROM pg_roles "
                            "WHERE rolname = current_user").fetchone()
        assert role == (False, False, False, False), role
        owned = conn.execute("SELECT datname FROM pg_database JOIN pg_roles ON datdba = pg_roles.oid "
                             "WHERE rolname = current_user").fetchall()
        assert sorted(name for (name,) in owned) == sorted(team_services.DATABASES)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):     # what a superuser could do
            conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
    assert stat.S_IMODE(svc.secrets.stat().st_mode) == 0o700
    for path in svc.secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def _assert_no_secret_on_a_command_line(svc, users: dict) -> None:
    """No password in any process's arguments (what `ps` shows every local user)."""
    secrets = [u.password for u in (svc.admin, *users.values())]
    secrets.append((svc.secrets / "pgpass").read_text().strip().rsplit(":", 1)[1])
    seen = 0
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().decode(errors="replace")
            seen += "mlflow" in args or "dvc" in args
            assert not any(secret in args for secret in secrets), \
                f"a password in the arguments of {args.replace(chr(0), ' ')[:100]}... (pid {proc.name})"
    assert seen, "no MLflow or DVC process to look at"


def _check_access(svc, users: dict, experiment_id: str, run_id: str) -> None:
    """Anonymous and wrong-password requests get 401, reads and writes alike; a user without the
    right gets 403 and changes nothing: the reader (READ) writes nothing, machine-b (EDIT on the
    shared experiment) deletes neither machine-a's run nor the experiment, and a personal
    experiment is its creator's alone."""
    def call(request: tuple, who) -> int:
        path, method, body = request
        return team_services.call(svc.tracking_uri, path, method, who, body)[0]

    def state() -> tuple:
        run = team_services.call(svc.tracking_uri, "/api/2.0/mlflow/runs/get", "GET", users["reader"],
                                 {"run_id": run_id})
        exp = team_services.call(svc.tracking_uri, "/api/2.0/mlflow/experiments/get", "GET", users["reader"],
                                 {"experiment_id": experiment_id})
        assert run[0] == exp[0] == 200, (run, exp)
        return run[1], exp[1]

    def writes(experiment: str, run: str) -> list[tuple]:
        return [("/api/2.0/mlflow/runs/log-metric", "POST",
                 {"run_id": run, "key": "accuracy/test", "value": 0.0, "timestamp": 0, "step": 0}),
                ("/api/2.0/mlflow/runs/set-tag", "POST", {"run_id": run, "key": "cell", "value": "forged"}),
                ("/api/2.0/mlflow/runs/update", "POST", {"run_id": run, "status": "FAILED"}),
                ("/api/2.0/mlflow/runs/delete", "POST", {"run_id": run}),
                ("/api/2.0/mlflow/runs/create", "POST", {"experiment_id": experiment}),
                ("/api/2.0/mlflow/experiments/update", "POST", {"experiment_id": experiment, "new_name": "x"}),
                ("/api/2.0/mlflow/experiments/delete", "POST", {"experiment_id": experiment})]

    before = state()
    reads = [("/api/2.0/mlflow/experiments/get", "GET", {"experiment_id": experiment_id}),
             ("/api/2.0/mlflow/runs/get", "GET", {"run_id": run_id}),
             ("/api/2.0/mlflow/experiments/search", "POST", {"max_results": 10}),
             ("/api/2.0/mlflow-artifacts/artifacts", "GET", {"path": f"{experiment_id}/{run_id}/artifacts"}),
             ("/ajax-api/2.0/mlflow/runs/get", "GET", {"run_id": run_id})]
    refused = {r[0]: call(r, None) for r in reads + writes(experiment_id, run_id)}
    assert set(refused.values()) == {401}, refused
    # A wrong password costs the server a hash (~0.1 s): two requests tell enough.
    forged = team_services.Credentials(users["machine-a"].username, "not-the-password")
    refused = {r[0]: call(r, forged) for r in (reads[1], writes(experiment_id, run_id)[0])}
    assert set(refused.values()) == {401}, refused
    refused = {r[0]: call(r, users["reader"]) for r in writes(experiment_id, run_id)}
    assert set(refused.values()) == {403}, refused
    deletes = writes(experiment_id, run_id)[3::3]                  # the run, the experiment
    refused = {r[0]: call(r, users["machine-b"]) for r in deletes}
    assert set(refused.values()) == {403}, refused
    assert state() == before

    # A personal experiment: machine-a created it, so only machine-a (and the admin) may change it.
    owner = users["machine-a"]
    status, body = team_services.call(svc.tracking_uri, "/api/2.0/mlflow/experiments/create", "POST", owner,
                                      {"name": "machine-a-scratch"})
    assert status == 200, body
    own = body["experiment_id"]
    status, body = team_services.call(svc.tracking_uri, "/api/2.0/mlflow/runs/create", "POST", owner,
                                      {"experiment_id": own})
    assert status == 200, body
    own_run = body["run"]["info"]["run_id"]
    log = writes(own, own_run)[0]
    assert call(log, owner) == 200
    for name in ("lead", "machine-b", "reader"):
        refused = {r[0]: call(r, users[name]) for r in writes(own, own_run)}
        assert set(refused.values()) == {403}, (name, refused)
    assert _permission(svc, owner.username, own) == "MANAGE"
    status, body = team_services.call(svc.tracking_uri, "/api/2.0/mlflow/runs/get", "GET", users["reader"],
                                      {"run_id": own_run})
    assert status == 200 and body["run"]["info"]["lifecycle_stage"] == "active", body
    assert [m["value"] for m in body["run"]["data"]["metrics"]] == [0.0]
    assert all(call(r, owner) == 200 for r in writes(own, own_run)[3::3])   # the owner may delete


def test_two_machines_split_a_sweep_through_shared_services(tmp_path: Path, monkeypatch) -> None:
    import boto3
    from mlflow import MlflowClient

    machines = [tmp_path / name for name in ("lead", "machine-a", "machine-b", "reader")]
    T0[0] = time.monotonic()
    with team_services.services(tmp_path / "logs") as svc:
        _check_database(svc)
        # One MLflow account per machine, named after it.
        users = {m.name: team_services.add_user(svc.tracking_uri, svc.admin, m.name) for m in machines}
        envs = {m.name: _env(tmp_path, svc.tracking_uri, users[m.name],
                             home=tmp_path / "home-b" if m.name == "machine-b" else None) for m in machines}
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", users["reader"].username)   # this process reads
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", users["reader"].password)
        passed = False
        try:
            _flow(tmp_path, svc, users, envs, machines, boto3, MlflowClient)
            passed = True
        finally:
            _stop_leftovers(tmp_path, wait_s=30 if passed else 0)


def _flow(tmp_path: Path, svc, users: dict, envs: dict[str, dict], machines: list[Path], boto3,
          MlflowClient) -> None:
    lead, machine_a, machine_b, reader = machines
    env = envs["lead"]
    _mark("services")
    origin = tmp_path / "origin.git"
    _run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)

    # The lead: the project, its DVC remote (committed: one line plus the endpoint), the baseline.
    _project(lead)
    _run(["git", "init", "-q", "-b", "main"], lead, env)
    _run(["git", "remote", "add", "origin", str(origin)], lead, env)
    _dvc(["remote", "add", "-d", "storage", f"s3://{svc.bucket}/dvc"], lead, env)
    _dvc(["remote", "modify", "storage", "endpointurl", svc.s3_endpoint], lead, env)
    _dvc(["remote", "modify", "--local", "storage", "access_key_id", "testing"], lead, env)
    _dvc(["remote", "modify", "--local", "storage", "secret_access_key", "testing"], lead, env)
    assert (lead / ".dvc" / "config.local").read_text() == LOCAL_CONFIG
    archive = build_imdb_archive(tmp_path / "imdb.tar.gz", n_per_class=100, unsup=5)
    _dvc(["repro"], lead, {**env, "IMDB_ARCHIVE": str(archive)})
    _run(["git", "add", "."], lead, env)
    _run(["git", "commit", "-q", "-m", "baseline"], lead, env)
    _run(["git", "push", "-q", "origin", "main"], lead, env)
    _dvc(["push"], lead, env)
    _mark("baseline")
    assert not (lead / "mlflow.db").exists() and not (lead / "mlartifacts").exists()
    # The lead's pipeline created the experiments with the lead's account: MLflow made it their
    # manager, so the lead can share them (else 403). The reader keeps the default, READ.
    experiments = team_services.share_experiments(
        svc.tracking_uri, users["lead"], team_services.team_experiments(lead / "params.yaml"),
        [machine_a.name, machine_b.name])
    for experiment_id in experiments.values():
        assert {name: _permission(svc, name, experiment_id) for name in users} == {
            "lead": "MANAGE", "machine-a": "EDIT", "machine-b": "EDIT", "reader": "READ"}

    # Two machines, each its half of the sweep, both at once.
    shares = {}
    for i, machine in enumerate((machine_a, machine_b), start=1):
        _clone(origin, machine, envs[machine.name])
        out = _run([sys.executable, "scripts/sweep.py", "--share", f"{i}/2", *GRID], machine, envs[machine.name])
        shares[machine.name] = out
    _mark("clones")
    for machine in (machine_a, machine_b):
        _dvc(["queue", "start", "-j", "1"], machine, envs[machine.name])
    _assert_no_secret_on_a_command_line(svc, users)        # while the sweep runs
    _wait_for_queues({m: _queued_names(shares[m.name]) for m in (machine_a, machine_b)}, env)
    _mark("queues")
    for machine in (machine_a, machine_b):
        _dvc(["exp", "push", "origin"], machine, envs[machine.name])

    _mark("exp push")
    fingerprint = shares[machine_a.name].split()[1].rstrip(":")
    assert shares[machine_b.name].split()[1].rstrip(":") == fingerprint
    names = {k: f"sweep-{fingerprint}-{k}" for k in range(1, 5)}
    assert all(names[k] in shares[machine_a.name] for k in (1, 3)), shares[machine_a.name]
    assert all(names[k] in shares[machine_b.name] for k in (2, 4)), shares[machine_b.name]

    # Anyone: pull everything and see every point.
    env = envs["reader"]
    _clone(origin, reader, env)
    _dvc(["exp", "pull", "origin"], reader, env)
    points = _exp_points(json.loads(_dvc(["exp", "show", "-A", "--json"], reader, env)))
    assert set(points) == set(names.values()), sorted(points)
    lrs = {name: {cell: p["train"]["overrides"][cell]["lr"] for cell in CELLS} for name, p in points.items()}
    assert sorted(tuple(lr.values()) for lr in lrs.values()) == [(a, b) for a in LRS for b in LRS], lrs

    _mark("reader")
    # Every cell's run of every point is on the server, with its artifacts in the bucket. A point's
    # run is the one with its settings' hash: a stage from the run cache kept the run that made it.
    client = MlflowClient(svc.tracking_uri)                 # as the reader
    experiment = client.get_experiment_by_name("imdb-sentiment")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    runs = [r for r in client.search_runs([experiment.experiment_id], max_results=1000)
            if r.data.tags.get("dvc.exp_name") in names.values() and r.data.tags["dvc.stage"].startswith("train@")]
    trained = sorted(r.data.tags["cell"] for r in runs)
    assert trained == ["lstm"] * 4 + ["rnn"] * 2, f"expected the run cache to spare 2 rnn runs: {trained}"
    s3 = boto3.client("s3", endpoint_url=svc.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=svc.bucket)
            for o in page.get("Contents", [])}
    for name, params in points.items():
        (tmp_path / "point.yaml").write_text(yaml.safe_dump(params))
        loaded = settings.load(tmp_path / "point.yaml")
        for cell in CELLS:
            matching = [r for r in runs if r.data.tags["cell"] == cell
                        and r.data.tags.get("params_hash")
                        == settings.run_hash(loaded, cell, "train", resolve_workers(loaded["train"]["workers"]))]
            assert matching, f"no MLflow run of {cell} for {name}"
            for run in matching:
                assert run.info.status == "FINISHED"
                assert float(run.data.params["train.lr"]) == lrs[name][cell]
                assert "accuracy/test" in run.data.metrics          # evaluate found the train run
                [output] = run.outputs.model_outputs                # the logged MLflow model
                assert client.get_logged_model(output.model_id).source_run_id == run.info.run_id
                assert any(output.model_id in k and k.endswith("/weights.npz") for k in keys), \
                    f"the weights of model {output.model_id} are not in the bucket"
                prefix = f"mlartifacts/{experiment.experiment_id}/{run.info.run_id}/artifacts/"
                for path in ("evaluation/eval.json", "grad_trace/grad_trace.png"):
                    assert prefix + path in keys, f"{prefix + path} not in the bucket"
    _mark("runs")
    [run_a] = [r for r in runs if r.data.tags["dvc.exp_name"] == names[1] and r.data.tags["cell"] == "lstm"]
    _check_access(svc, users, experiment.experiment_id, run_a.info.run_id)
    _mark("access")

    # Models come back with `dvc pull`: the baseline's, and a point's after `dvc exp apply`.
    review = "A wonderful, moving film with a great cast."
    predict = [sys.executable, "-m", "rnn", "predict", "--model", "models/lstm/seed0", "--json", review]
    assert json.loads(_run(predict, reader, env))
    _dvc(["exp", "apply", names[2]], reader, env)
    _dvc(["pull"], reader, env)
    config = json.loads((reader / "models" / "lstm" / "seed0" / "config.json").read_text())
    assert config["metadata"]["train"]["lr"] == lrs[names[2]]["lstm"], config["metadata"]
    assert json.loads(_run(predict, reader, env))
    for machine in machines:
        assert not (machine / "mlflow.db").exists(), f"{machine.name} wrote a local MLflow store"
