"""The team flow of the README ("Working as a team"), for real, on one machine over loopback.

PostgreSQL, an S3 endpoint (moto) and an MLflow server backed by both (tests/team_services.py); a
bare git repository as the git remote and a DVC remote in the bucket. A lead clone runs the
baseline, pushes it and creates one Optuna study (python -m sweeps, docs/sweeps.md) in the team's
PostgreSQL: a 6-point grid over the LSTM's learning rate and dropout with the median pruner. Two
clones act as two machines, each running a sweep worker that pushes every finished trial (`work
--push origin`). Machine A dies mid-training (its worker and everything under it SIGKILLed), then
starts a worker again. Every trial ends COMPLETE or PRUNED, but for the killed one, which ends
FAILED and is retried exactly once with the same params; each complete trial has exactly one DVC
experiment on the git remote and one FINISHED MLflow run under the study's parent run; the killed
trial's run is not left RUNNING. A third clone finds every complete trial's run with its artifacts
in the bucket, pulls the best trial (`dvc exp pull`) and applies it (`python -m sweeps apply`): its
params.yaml holds that trial's values and `dvc pull` brings its model. The machines hold no S3
credentials in their environment: DVC reads them from .dvc/config.local, MLflow uploads go through
the server.

Nothing answers without a password (docs/team-security.md): each clone has its own MLflow account
(machine-a in MLFLOW_TRACKING_USERNAME/PASSWORD, machine-b in a credentials file under its HOME);
the lead's pipeline creates the experiments, so it manages them, and shares them with the two
machines (EDIT). Anonymous requests get 401; a reader cannot write, a machine cannot delete
another's runs, nobody but its owner touches a personal experiment (403, data unchanged).
PostgreSQL takes passwords only, MLflow's role is no superuser, the studies are in a database of
their own with a role of their own, and no secret is on a command line.
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

REPO = Path(__file__).resolve().parents[1]
COPY = ["rnn", "stages", "sweeps", "params.yaml", "dvc.yaml", ".dvc/config", ".dvc/.gitignore",
        ".dvcignore", "pyproject.toml", ".gitignore"]
CELLS = ["rnn", "lstm"]
# The study: 6 points, none the baseline, all of the LSTM: its stages rerun, the RNN's are unchanged
# (no trial reruns them). Two epochs, so that the median pruner sees a first epoch to judge by. A
# short heartbeat: the killed trial is failed 20 s after its worker died, not minutes (the other
# trials go on meanwhile); 10 beats missed in a row, which a busy 2-core machine does not cause.
LRS = (0.001, 0.003, 0.01)
DROPOUTS = (0.0, 0.5)
ARCHIVE = "imdb.tar.gz"            # in the test's folder; every machine reads it (IMDB_ARCHIVE)
STUDY = {
    "name": "team-lstm",
    "objective": {"metrics": "reports/summary.json", "key": "cells.lstm.val_accuracy.mean", "direction": "maximize"},
    "params": {"+train.overrides.lstm.lr": {"choices": list(LRS)},
               "+train.overrides.lstm.dropout": {"choices": list(DROPOUTS)},
               "+train.overrides.lstm.epochs": 2},
    "sampler": "grid",
    "pruner": {"type": "median", "report": "lstm", "n_startup_trials": 2},
    "heartbeat": {"interval": 2, "grace": 20, "max_retry": 1},
    "targets": ["compare"],
}
STUDY_FILE = "team-study.yaml"
LOCAL_CONFIG = """['remote "storage"']
    access_key_id = testing
    secret_access_key = testing
"""
STUDY_TIMEOUT_S = 900        # the whole study
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
    params["train"]["overrides"] = {cell: {} for cell in CELLS}   # the study below sets the LSTM's, from none
    params["pretrain"].update(num_sampled=64, val_reviews=20)
    params["probe"].update(cells=["rnn"], distances=[1, 3], lead=3, steps=4, trace_steps=2, test_size=16,
                           batch_size=8, hidden_size=4)
    params["mlflow"]["enabled"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _env(tmp_path: Path, tracking_uri: str, user: team_services.Credentials | None = None,
         home: Path | None = None) -> dict:
    """A machine's environment: its MLflow account in MLFLOW_TRACKING_USERNAME/PASSWORD, or with
    home, in <home>/.mlflow/credentials (MLflow's other way), and nothing else of MLflow's; the
    test's archive in IMDB_ARCHIVE (`make test` exports the real one where ../shared/data has it:
    a trial reading that would rerun the whole pipeline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "AWS_", "PG"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=tracking_uri, IMDB_ARCHIVE=str(tmp_path / ARCHIVE),
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


def _exp_refs(root: Path, env: dict) -> set[str]:
    """Names of the experiments in a clone (refs/exps/<baseline>/<name>)."""
    out = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], root, env)
    return {line.rsplit("/", 1)[1] for line in out.split()}


def _stop_leftovers(folder: Path, wait_s: float) -> None:
    """End what the test started that still runs in its folders, by pid (waited for up to wait_s):
    after a failure, the sweep workers and the experiments they were running."""
    deadline = time.monotonic() + wait_s
    while _pids_in(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    if _pids_in(folder):
        print("[team] left running, to be killed:", [_cmdline(pid)[:120] for pid in _pids_in(folder)], flush=True)
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


def _permission(svc, username: str, experiment_id: str) -> str:
    """A user's permission on an experiment, as MLflow's auth app resolves it (asked as the admin)."""
    status, body = team_services.call(svc.tracking_uri, "/api/3.0/mlflow/users/permissions/get", "GET", svc.admin,
                                      {"username": username, "resource_type": "experiment",
                                       "resource_id": experiment_id})
    assert status == 200, body
    return body["permission"]


def _check_database(svc) -> None:
    """PostgreSQL takes passwords only; MLflow's role is no superuser and owns its two databases, the
    sweeps' role (as unprivileged) the studies' database alone; the secrets' files are the owner's
    only."""
    import psycopg
    from urllib.parse import urlsplit

    uri = urlsplit(svc.database_uri)
    assert uri.password is None, "the database URI holds a password"
    address = {"host": uri.hostname, "port": uri.port, "connect_timeout": 5}
    for user in ("postgres", team_services.DB_ROLE, team_services.SWEEP_ROLE):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(**address, user=user, dbname="postgres", passfile=str(svc.secrets / "absent"))
    sweeps = urlsplit(svc.sweep_storage)
    assert sweeps.password is None, "the studies' URI holds a password"
    for user, database, passfile, databases in (
            (uri.username, uri.path.lstrip("/"), "pgpass", team_services.DATABASES),
            (sweeps.username, sweeps.path.lstrip("/"), "sweeps.pgpass", (team_services.SWEEP_DATABASE,))):
        with psycopg.connect(**address, user=user, dbname=database, passfile=str(svc.secrets / passfile)) as conn:
            role = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication FROM pg_roles "
                                "WHERE rolname = current_user").fetchone()
            assert role == (False, False, False, False), role
            owned = conn.execute("SELECT datname FROM pg_database JOIN pg_roles ON datdba = pg_roles.oid "
                                 "WHERE rolname = current_user").fetchall()
            assert sorted(name for (name,) in owned) == sorted(databases)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):     # what a superuser could do
                conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
    assert stat.S_IMODE(svc.secrets.stat().st_mode) == 0o700
    for path in svc.secrets.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def _assert_no_secret_on_a_command_line(svc, users: dict) -> None:
    """No password in any process's arguments (what `ps` shows every local user)."""
    secrets = [u.password for u in (svc.admin, *users.values())]
    secrets += [(svc.secrets / name).read_text().strip().rsplit(":", 1)[1] for name in ("pgpass", "sweeps.pgpass")]
    seen = 0
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().decode(errors="replace")
            seen += "mlflow" in args or "dvc" in args
            assert not any(secret in args for secret in secrets), \
                f"a password in the arguments of {args.replace(chr(0), ' ')[:100]}... (pid {proc.name})"
    assert seen, "no MLflow or DVC process to look at"


def _study_env(svc) -> dict:
    """Where the studies are, for a machine: the URL, and the sweeps role's password in a pgpass file."""
    return {"RNN_SWEEP_STORAGE": svc.sweep_storage, "PGPASSFILE": str(svc.secrets / "sweeps.pgpass")}


def _start_worker(machine: Path, env: dict, log: Path) -> subprocess.Popen:
    """A sweep worker on a machine; it pushes each finished trial to the git and DVC remotes."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "sweeps", "work", STUDY_FILE, "--push", "origin"], cwd=machine,
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    return ""


def _kill_mid_training(machine: Path, worker: subprocess.Popen, log: Path, study, client,
                       experiment_id: str) -> tuple[int, list]:
    """The machine dies while one of its trials trains: once a training runs there, freeze every
    process of the machine (SIGSTOP), and if the worker's trial has its MLflow run RUNNING (the
    training is under way, not starting or ending), SIGKILL them all, the worker first; else let
    them go on and look again. Returns the killed trial's number and its RUNNING runs."""
    import socket

    from optuna.trial import TrialState

    me = f"{socket.gethostname()}-{worker.pid}"
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    while True:
        assert worker.poll() is None, f"{machine.name}'s worker ended ({worker.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{machine.name} trained nothing in {STUDY_TIMEOUT_S} s"
        pids = _pids_in(machine)
        if any("stages.train" in _cmdline(pid) for pid in pids):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if t.user_attrs.get("worker") == me]
            runs = client.search_runs([experiment_id], filter_string=(
                f"tags.`dvc.exp_name` = '{mine[0].user_attrs['experiment']}' AND attributes.status = 'RUNNING'")) \
                if mine else []
            if runs:
                worker.kill()
                worker.wait()
                _stop_leftovers(machine, wait_s=0)
                return mine[0].number, runs
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        time.sleep(0.3)


def _wait_for(workers: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Until every worker has ended, each with exit code 0 (a failed one: its log)."""
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    for name, (worker, log) in workers.items():
        try:
            code = worker.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}'s sweep worker still runs after {STUDY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        assert code == 0, f"{name}'s sweep worker failed ({code}):\n{log.read_text()[-4000:]}"


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


def test_two_machines_run_one_study_through_shared_services_and_survive_a_dead_one(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import boto3
    from mlflow import MlflowClient

    machines = [tmp_path / name for name in ("lead", "machine-a", "machine-b", "reader")]
    T0[0] = time.monotonic()
    with team_services.services(tmp_path / "logs") as svc:
        _check_database(svc)
        # One MLflow account per machine, named after it.
        users = {m.name: team_services.add_user(svc.tracking_uri, svc.admin, m.name) for m in machines}
        envs = {m.name: {**_env(tmp_path, svc.tracking_uri, users[m.name],
                                home=tmp_path / "home-b" if m.name == "machine-b" else None), **_study_env(svc)}
                for m in machines}
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", users["reader"].username)   # this process reads
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", users["reader"].password)
        for key, value in _study_env(svc).items():                               # and reads the study
            monkeypatch.setenv(key, value)
        passed = False
        try:
            _flow(tmp_path, svc, users, envs, machines, boto3, MlflowClient)
            passed = True
        finally:
            _stop_leftovers(tmp_path, wait_s=30 if passed else 0)
            _mark("leftovers stopped")
    _mark("services stopped")


def _flow(tmp_path: Path, svc, users: dict, envs: dict[str, dict], machines: list[Path], boto3,
          MlflowClient) -> None:
    import optuna
    from optuna.trial import TrialState

    lead, machine_a, machine_b, reader = machines
    env = envs["lead"]
    _mark("services")
    origin = tmp_path / "origin.git"
    _run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)

    # The lead: the project, its DVC remote (committed: one line plus the endpoint), the baseline,
    # the study file.
    _project(lead)
    (lead / STUDY_FILE).write_text(yaml.safe_dump(STUDY, sort_keys=False))
    _run(["git", "init", "-q", "-b", "main"], lead, env)
    _run(["git", "remote", "add", "origin", str(origin)], lead, env)
    _dvc(["remote", "add", "-d", "storage", f"s3://{svc.bucket}/dvc"], lead, env)
    _dvc(["remote", "modify", "storage", "endpointurl", svc.s3_endpoint], lead, env)
    _dvc(["remote", "modify", "--local", "storage", "access_key_id", "testing"], lead, env)
    _dvc(["remote", "modify", "--local", "storage", "secret_access_key", "testing"], lead, env)
    assert (lead / ".dvc" / "config.local").read_text() == LOCAL_CONFIG
    archive = build_imdb_archive(tmp_path / ARCHIVE, n_per_class=100, unsup=5)
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
    experiment_id = experiments["imdb-sentiment"]
    _run([sys.executable, "-m", "sweeps", "create", STUDY_FILE], lead, env)     # once, before any worker
    study = optuna.load_study(study_name=STUDY["name"], storage=svc.sweep_storage)
    client = MlflowClient(svc.tracking_uri)                 # as the reader
    _mark("study")

    # Two machines, one worker each, both at once; machine A dies mid-training and comes back.
    workers = {}
    for machine in (machine_a, machine_b):
        _clone(origin, machine, envs[machine.name])
        log = tmp_path / f"{machine.name}-worker.log"
        workers[machine.name] = (_start_worker(machine, envs[machine.name], log), log)
    _mark("clones")
    _assert_no_secret_on_a_command_line(svc, users)        # while the study runs
    worker, log = workers[machine_a.name]
    killed, left_running = _kill_mid_training(machine_a, worker, log, study, client, experiment_id)
    _mark(f"machine-a killed in trial {killed}")
    log = tmp_path / "machine-a-worker.log"
    workers[machine_a.name] = (_start_worker(machine_a, envs[machine_a.name], log), log)
    _wait_for(workers)
    _mark("study done")
    assert "its worker stopped (no heartbeat)" in "".join(l.read_text() for _, l in workers.values())

    # Every grid point once, COMPLETE or PRUNED; the killed trial FAILED, retried once with its params.
    trials = study.get_trials()
    points = sorted((lr, dropout) for lr in LRS for dropout in DROPOUTS)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted((t.params["train.overrides.lstm.lr"], t.params["train.overrides.lstm.dropout"])
                  for t in done) == points, [(t.number, t.state.name, t.params) for t in trials]
    [failed] = [t for t in trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert (failed.number, failed.state) == (killed, TrialState.FAIL), failed
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.params == failed.params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED), retry
    assert len(trials) == len(points) + 1
    complete = {t.user_attrs["experiment"]: t for t in trials if t.state == TrialState.COMPLETE}
    assert complete, "no trial completed"

    # Each complete trial: exactly one DVC experiment on the git remote; no other trial has one.
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], origin, env).split()
    assert sorted(ref.rsplit("/", 1)[1] for ref in refs) == sorted(complete), refs
    # ... and exactly one MLflow run, FINISHED, under the study's parent run. The RNN's stages were
    # unchanged: no trial reran them. No run is left RUNNING: the killed trial's was marked FAILED.
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.study"] == STUDY["name"]
    runs = [r for r in client.search_runs([experiment_id], max_results=1000)
            if r.data.tags.get("sweep.study") == STUDY["name"] and r.info.run_id != parent.info.run_id]
    assert {r.data.tags["dvc.stage"] for r in runs} == {"train@lstm-0"}, [r.data.tags["dvc.stage"] for r in runs]
    assert not [r.info.run_name for r in client.search_runs([experiment_id], "attributes.status = 'RUNNING'")]
    for name, trial in complete.items():
        [run] = [r for r in runs if r.data.tags["dvc.exp_name"] == name]
        assert run.info.status == "FINISHED" and run.data.tags["sweep.trial"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.user_attrs["mlflow_runs"] == {run.info.run_name: run.info.run_id}    # what `show` lists
        assert float(run.data.params["train.lr"]) == trial.params["train.overrides.lstm.lr"]
    killed_runs = [r for r in runs if r.data.tags["dvc.exp_name"] == failed.user_attrs["experiment"]]
    assert {r.info.run_id for r in killed_runs} == {r.info.run_id for r in left_running}
    assert {r.info.status for r in killed_runs} == {"FAILED"}
    _mark("study checked")

    # Every complete trial's run has its artifacts in the bucket.
    experiment = client.get_experiment(experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    s3 = boto3.client("s3", endpoint_url=svc.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=svc.bucket)
            for o in page.get("Contents", [])}
    for run in (r for r in runs if r.data.tags["dvc.exp_name"] in complete):
        assert "accuracy/test" in run.data.metrics          # evaluate found the train run
        [output] = run.outputs.model_outputs                # the logged MLflow model
        assert client.get_logged_model(output.model_id).source_run_id == run.info.run_id
        assert any(output.model_id in k and k.endswith("/weights.npz") for k in keys), \
            f"the weights of model {output.model_id} are not in the bucket"
        prefix = f"mlartifacts/{experiment_id}/{run.info.run_id}/artifacts/"
        for path in ("evaluation/eval.json", "grad_trace/grad_trace.png"):
            assert prefix + path in keys, f"{prefix + path} not in the bucket"
    _mark("runs")
    [some_run] = [r for r in runs if r.data.tags["dvc.exp_name"] == min(complete)]
    _check_access(svc, users, experiment_id, some_run.info.run_id)
    _mark("access")

    # Anyone: the best trial, pulled and applied in a third clone; its model comes with `dvc pull`.
    env = envs["reader"]
    _clone(origin, reader, env)
    review = "A wonderful, moving film with a great cast."
    predict = [sys.executable, "-m", "rnn", "predict", "--model", "models/lstm/seed0", "--json", review]
    assert json.loads(_run(predict, reader, env))           # the baseline's model
    best = study.best_trial
    out = _run([sys.executable, "-m", "sweeps", "apply", STUDY_FILE, "--pull", "origin"], reader, env)
    assert out.startswith(f"applied trial {best.number} ({best.user_attrs['experiment']}"), out
    assert best.user_attrs["experiment"] in _exp_refs(reader, env)
    applied = yaml.safe_load((reader / "params.yaml").read_text())["train"]["overrides"]
    assert applied["lstm"] == {"lr": best.params["train.overrides.lstm.lr"],
                               "dropout": best.params["train.overrides.lstm.dropout"], "epochs": 2}, applied
    assert applied["rnn"] == {}
    _dvc(["pull"], reader, env)
    config = json.loads((reader / "models" / "lstm" / "seed0" / "config.json").read_text())
    assert config["metadata"]["train"]["lr"] == best.params["train.overrides.lstm.lr"], config["metadata"]
    assert json.loads(_run(predict, reader, env))
    for machine in machines:
        assert not (machine / "mlflow.db").exists(), f"{machine.name} wrote a local MLflow store"
    _mark("reader")
