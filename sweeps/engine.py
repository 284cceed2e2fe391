"""Studies and workers: create a study, run its trials as DVC experiments, show it, apply a trial.

One trial = one `dvc exp run -n <study>-t<number> -S ...` in the worker's own working copy: a git
clone of the project at the study's commit whose DVC cache is the project's (`dvc cache dir`), so
outputs and the run cache are shared (a stage the trial leaves unchanged is restored, not rerun)
while params.yaml, dvc.lock and the workspace outputs are the worker's alone. Two `dvc exp run` in
one folder would train one experiment with the other's settings; `dvc exp run --temp` copies the
workspace per run but goes through the project's repo lock and `.dvc/tmp` at start and end. A clone
costs one checkout per worker, not per trial, and is what a second machine has anyway. A finished
experiment's git ref is pushed into the project (`refs/exps/...`), where `dvc exp show` and
`dvc exp apply` find it.

Faults: a worker records a heartbeat for its trial every `heartbeat.interval` seconds; every worker,
before taking a trial, fails the trials whose heartbeat is older than `heartbeat.grace` and enqueues
each once more with the same params (Optuna's RetryHeartbeatStaleTrialCallback, at most
`heartbeat.max_retry` times), and marks the failed trial's MLflow runs left RUNNING as FAILED.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from sweeps import backend
from sweeps.pruning import STUDY_ENV, TRIAL_ENV
from sweeps.spec import SpecError, StudySpec, check_not_overridden, grid_points, overrides, storage_template

DVC = [sys.executable, "-m", "dvc"]
COPIES = ".dvc/tmp/sweeps"          # per-worker working copies and trial logs, under the project


class SweepError(RuntimeError):
    """A study that cannot be created, worked on or applied; the message is one line."""


# ---------------------------------------------------------------------------------------------
# The study


def project_root(start: str | Path | None = None) -> Path:
    """The git and DVC project holding `start` (default cwd)."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / ".dvc").is_dir() and (d / "dvc.yaml").is_file():
            return d
    raise SweepError(f"{here}: not inside a DVC project (no .dvc/ and dvc.yaml above it)")


def create(spec: StudySpec, root: Path) -> optuna.Study:
    """Create the study (once, before any worker starts) at the project's current commit; a grid
    study's points are enqueued now, in file order or shuffled (`order`)."""
    check_not_overridden(spec, yaml.safe_load((root / "params.yaml").read_text()) or {}, spec.name)
    template = storage_template(spec, root)
    if template.startswith("sqlite:///"):
        Path(template[len("sqlite:///"):].split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    storage = backend.open_storage(template, create_tables=True)
    commit = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    if dirty:
        print(f"warning: uncommitted changes are not part of the study; its trials run commit {commit[:7]}",
              file=sys.stderr)
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, direction=spec.direction)
    except optuna.exceptions.DuplicatedStudyError:
        raise SweepError(f"study {spec.name} already exists in {backend.safe_url(template)}: run its workers "
                         f"(`work`), or give the study file a new name") from None
    study.set_user_attr("commit", commit)
    study.set_user_attr("fingerprint", spec.fingerprint())
    study.set_user_attr("spec", json.loads(json.dumps(spec.source, default=str)))
    if spec.sampler == "grid":
        for point in grid_points(spec):
            study.enqueue_trial(point)
    parent = create_parent_run(spec, root, commit)
    if parent:
        study.set_user_attr("mlflow_parent_run_id", parent)
    return study


def load(spec: StudySpec, root: Path, worker_seed: int | None = None) -> optuna.Study:
    """The existing study of `spec`, with its sampler and pruner, heartbeats on."""
    template = storage_template(spec, root)
    storage = backend.open_storage(template, spec.heartbeat, StaleTrials(spec.heartbeat["max_retry"], root))
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage, pruner=backend.make_pruner(spec.pruner),
                                  sampler=backend.make_sampler(spec, worker_seed))
    except KeyError:
        raise SweepError(f"no study {spec.name} in {backend.safe_url(template)}: run `python -m sweeps create` "
                         f"first, once") from None
    if study.user_attrs.get("fingerprint") != spec.fingerprint():
        raise SweepError(f"the study file of {spec.name} changed since the study was created (objective, "
                         f"params, sampler or pruner): give it a new name to start another study")
    return study


class StaleTrials:
    """What happens to a trial whose worker stopped beating: enqueued again with the same params
    (at most max_retry times), and its MLflow runs left RUNNING marked FAILED."""

    def __init__(self, max_retry: int, root: Path):
        with backend.quiet():
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.root = root

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        print(f"trial {trial.number}: its worker stopped (no heartbeat); failed, and enqueued again", flush=True)
        self.retry(study, trial)
        name = trial.user_attrs.get("experiment")
        if name:
            try:
                mlflow_runs(self.root, name, fail_running=True)
            except Exception as exc:  # noqa: BLE001 - MLflow unreachable or refusing: retried all the same
                print(f"trial {trial.number}: its MLflow runs left RUNNING could not be marked FAILED: "
                      f"{' '.join(str(exc).split())[:200]}", flush=True)


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that count toward n_trials: finished or running, but not a failed trial that was
    enqueued again (its retry counts instead)."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(1 for t in trials if t.state in counted or (t.state == TrialState.FAIL and t.number not in retried))


@contextlib.contextmanager
def claim_lock(study: optuna.Study) -> Iterator[None]:
    """One worker at a time takes a trial and fails stale ones. Optuna alone is not enough: on SQLite
    its WAITING -> RUNNING update is not atomic (no SELECT ... FOR UPDATE), so two workers could take
    one enqueued trial or both retry one stale trial, and on any database two workers asking at once
    would both see budget left. SQLite (one machine): a lock file beside the database. PostgreSQL (a
    team): an advisory lock, held by a connection of its own and so released if the worker dies."""
    storage = study._storage
    url = storage.url if isinstance(storage, optuna.storages.RDBStorage) else ""
    if url.startswith("sqlite:///"):
        with open(url[len("sqlite:///"):].split("?")[0] + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        from sqlalchemy import text

        key = int(hashlib.sha256(f"sweeps:{study.study_name}".encode()).hexdigest()[:15], 16)
        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    else:
        yield


def next_trial(study: optuna.Study, spec: StudySpec) -> optuna.trial.Trial | None:
    """Fail stale trials, then take an enqueued trial (grid points, retries) or, while the budget
    lasts and the study is not a grid, ask the sampler for a new one. None: nothing to take now."""
    with claim_lock(study), backend.quiet():
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        for t in waiting:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    return _beating(study, optuna.trial.Trial(study, t._trial_id))
        if waiting:                       # taken by others meanwhile: count them as they are now
            trials = study.get_trials(deepcopy=False)
        if spec.sampler == "grid" or budget_used(trials) >= spec.n_trials:
            return None
        return _beating(study, study.ask())


def _beating(study: optuna.Study, trial: optuna.trial.Trial) -> optuna.trial.Trial:
    """A first heartbeat at once: a RUNNING trial without any is never found stale."""
    study._storage.record_heartbeat(trial._trial_id)
    return trial


# ---------------------------------------------------------------------------------------------
# Workers


def work(spec: StudySpec, root: Path, max_trials: int | None = None, wait: bool = True,
         push: str | None = None) -> int:
    """Run trials until the study's budget is spent (and, with `wait`, no other worker's trial is
    still running: one of them may yet fail and come back), or after `max_trials` of this worker.
    Returns the number of trials this worker ran."""
    worker = f"{socket.gethostname()}-{os.getpid()}"
    study = load(spec, root, worker_seed=os.getpid())
    commit = study.user_attrs["commit"]
    folder = root / COPIES / spec.name
    _remove_dead_copies(folder)
    copy = WorkingCopy(root, commit, folder / worker)
    ran = 0
    with _sigterm_as_interrupt():
        copy.create()
        try:
            while max_trials is None or ran < max_trials:
                trial = next_trial(study, spec)
                if trial is None:
                    others = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if not (wait and others):
                        break
                    time.sleep(min(spec.heartbeat["interval"], 10))
                    continue
                run_trial(study, trial, spec, root, copy, worker, push)
                ran += 1
        finally:
            copy.remove()
    print(f"worker {worker}: {ran} trial(s) run; study {spec.name}: {state_counts(study)}", flush=True)
    if finished(study, spec) and study.user_attrs.get("mlflow_parent_run_id"):
        with contextlib.suppress(Exception):
            close_parent_run(root, study.user_attrs["mlflow_parent_run_id"])
    return ran


def finished(study: optuna.Study, spec: StudySpec) -> bool:
    """Nothing running or waiting, and the budget spent (or the grid run through)."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return False
    return spec.sampler == "grid" or budget_used(trials) >= spec.n_trials


def run_trial(study: optuna.Study, trial: optuna.trial.Trial, spec: StudySpec, root: Path,
              copy: "WorkingCopy", worker: str, push: str | None = None) -> TrialState:
    """Run one trial as a DVC experiment and tell the study how it ended."""
    try:
        with Heartbeat(study._storage, trial._trial_id, spec.heartbeat["interval"]):
            return _run_trial(study, trial, spec, root, copy, worker, push)
    except Exception:
        # A bug or a lost database here must not leave the trial RUNNING until its heartbeat is stale.
        with contextlib.suppress(Exception):
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


def _run_trial(study: optuna.Study, trial: optuna.trial.Trial, spec: StudySpec, root: Path,
               copy: "WorkingCopy", worker: str, push: str | None) -> TrialState:
    values = backend.suggest(trial, spec)
    name = f"{spec.name}-t{trial.number}"
    sets = overrides(spec, values)
    log = root / COPIES / spec.name / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # A retried trial arrives with its failed original's user attrs: replace or clear every one.
    for key, value in {"experiment": name, "overrides": sets, "worker": worker, "log": str(log), "pruned": None,
                       "mlflow_runs": None, "outcome": None, "seconds": None}.items():
        trial.set_user_attr(key, value)
    print(f"{name}: {' '.join(sets)}", flush=True)
    t0 = time.monotonic()
    copy.reset()
    try:
        env = trial_environment(spec, root, trial.number, study.user_attrs.get("mlflow_parent_run_id"))
        code = copy.run_experiment(name, sets, env, log, spec.targets)
    except KeyboardInterrupt:
        # Stopped by hand: the point is not lost, another worker (or this one, later) runs it.
        trial.set_user_attr("outcome", "interrupted")
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        StaleTrials(spec.heartbeat["max_retry"], root).retry(study, study._storage.get_trial(trial._trial_id))
        print(f"{name}: interrupted; enqueued again", flush=True)
        raise
    seconds = time.monotonic() - t0
    trial.set_user_attr("seconds", round(seconds, 1))
    pruned = study._storage.get_trial(trial._trial_id).user_attrs.get("pruned")
    with contextlib.suppress(Exception):        # the runs of pruned and failed trials too (MLflow optional)
        runs = mlflow_runs(root, name)
        if runs:
            trial.set_user_attr("mlflow_runs", runs)
    if code == 0:
        try:
            value = read_metric(copy.path / spec.metrics, spec.key)
        except SweepError as exc:
            return _finish(study, trial, TrialState.FAIL, f"failed: {exc}", name, seconds)
        try:
            copy.publish(name)
            if push:
                publish_remote(root, name, push)
        except SweepError as exc:
            return _finish(study, trial, TrialState.FAIL, f"failed: its experiment was not published: {exc}",
                           name, seconds)
        return _finish(study, trial, TrialState.COMPLETE, f"{spec.key} = {value:.4f}", name, seconds, value)
    if pruned:
        return _finish(study, trial, TrialState.PRUNED, f"pruned after epoch {pruned['epoch']} of "
                       f"{pruned['cell']}", name, seconds)
    return _finish(study, trial, TrialState.FAIL, f"failed: {_last_error(log)} (log: {log})", name, seconds)


def _finish(study: optuna.Study, trial: optuna.trial.Trial, state: TrialState, outcome: str, name: str,
            seconds: float, value: float | None = None) -> TrialState:
    try:
        trial.set_user_attr("outcome", outcome)
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
        # Failed by the heartbeat meanwhile (the worker was suspended longer than the grace period):
        # its retry stands, this result is dropped.
        print(f"{name}: failed meanwhile by the heartbeat check; result dropped", flush=True)
        return TrialState.FAIL
    print(f"{name}: {state.name} {outcome} ({seconds:.0f} s)", flush=True)
    return state


def trial_environment(spec: StudySpec, root: Path, number: int, parent: str | None = None) -> dict:
    """The stage processes' environment: the trial (sweeps.pruning reads it; the MLflow tracker takes
    the study, the trial and the study's parent run from it) and the project's MLflow store, which
    the default would otherwise place in the working copy."""
    env = dict(os.environ)
    env[TRIAL_ENV] = json.dumps({"storage": storage_template(spec, root), "study": spec.name, "trial": number,
                                 "pruner": spec.pruner, "mlflow_parent_run_id": parent})
    env[STUDY_ENV] = spec.name
    env.update(_mlflow_environ(root))
    return env


def read_metric(path: Path, key: str) -> float:
    """The number at dotted `key` in the JSON metrics file `path`."""
    try:
        node: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SweepError(f"{path.name}: cannot read the objective: {' '.join(str(exc).split())}") from None
    walked = []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            have = ", ".join(sorted(node)) if isinstance(node, dict) else type(node).__name__
            raise SweepError(f"{path.name}: no key {'.'.join(walked + [part])} (found: {have})")
        node, walked = node[part], walked + [part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or not math.isfinite(node):
        raise SweepError(f"{path.name}: {key} = {node!r}: not a finite number")
    return float(node)


def _last_error(log: Path) -> str:
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()] if log.exists() else []
    errors = [l for l in lines if l.startswith(("ERROR", "error:"))]
    return (errors or lines or ["no output"])[-1][:300]


class Heartbeat:
    """Record the trial's heartbeat every `interval` seconds while the block runs (Optuna does this
    only inside Study.optimize, which cannot leave a trial to a subprocess)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):     # a missed beat is retried; grace covers a few
                self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> "Heartbeat":
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class WorkingCopy:
    """A worker's own clone of the project at the study's commit, sharing the project's DVC cache."""

    def __init__(self, root: Path, commit: str, path: Path):
        self.root, self.commit, self.path = root, commit, path

    def create(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _run(["git", "clone", "--quiet", "--no-checkout", str(self.root), str(self.path)])
        try:
            _run(["git", "-C", str(self.path), "checkout", "--quiet", "--detach", self.commit])
        except SweepError:
            raise SweepError(f"commit {self.commit[:7]} of the study is not in {self.root}: `git fetch` it "
                             f"(the study runs the commit it was created at)") from None
        cache = _run(DVC + ["cache", "dir"], cwd=self.root).strip()
        # `dvc config --local cache.dir` without starting dvc once more: the clone's config.local is new.
        (self.path / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n")
        # The committed outputs from the shared cache; what is missing is rebuilt by the first trial.
        if (self.path / "dvc.lock").is_file():
            subprocess.run(DVC + ["checkout", "--quiet", "--allow-missing"], cwd=self.path, capture_output=True)

    def reset(self) -> None:
        """Back to the study's commit: the last trial's params.yaml and dvc.lock must not leak."""
        _run(["git", "-C", str(self.path), "reset", "--quiet", "--hard", self.commit])

    def run_experiment(self, name: str, sets: list[str], env: dict, log: Path, targets: tuple = ()) -> int:
        """`dvc exp run` of one trial here; its output goes to `log`. Returns the exit code. The
        process group is this trial's: an interrupt stops it whole; a killed worker takes dvc along."""
        cmd = DVC + ["exp", "run", "--name", name] + [a for s in sets for a in ("-S", s)] + list(targets)
        with open(log, "w") as out:
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, cwd=self.path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
            try:
                return proc.wait()
            except KeyboardInterrupt:
                _stop_group(proc)
                raise

    def publish(self, name: str) -> None:
        """Push the experiment's git ref into the project (its outputs are in the shared cache already)."""
        refs = _run(["git", "-C", str(self.path), "for-each-ref", "--format=%(refname)", "refs/exps/"]).split()
        mine = [r for r in refs if r.endswith(f"/{name}") and r.count("/") == 4]
        if len(mine) != 1:
            raise SweepError(f"experiment {name}: expected one git ref for it in {self.path}, found {mine}")
        _run(["git", "-C", str(self.path), "push", "--quiet", "origin", f"+{mine[0]}:{mine[0]}"])

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def publish_remote(root: Path, name: str, remote: str) -> None:
    """`dvc exp push REMOTE NAME` from the project (git ref and outputs), one worker at a time."""
    with open(root / COPIES / ".push.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _run(DVC + ["exp", "push", remote, name], cwd=root)


def _remove_dead_copies(folder: Path) -> None:
    """Working copies left by killed workers of this machine."""
    host = socket.gethostname()
    for d in folder.glob(f"{host}-*") if folder.is_dir() else []:
        pid = d.name[len(host) + 1:]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """In the child: SIGKILL when the worker dies (Linux prctl PR_SET_PDEATHSIG); elsewhere nothing."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _stop_group(proc: subprocess.Popen) -> None:
    # SIGTERM, not SIGINT: a worker started with `&` from a script passes on SIGINT ignored. Training
    # stops after its current step on either.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        what = " ".join(["dvc", *cmd[len(DVC):]] if cmd[:len(DVC)] == DVC else cmd)
        raise SweepError(f"{what} failed ({out.returncode}): {' '.join((out.stderr or out.stdout).split())[-300:]}")
    return out.stdout


def _git(root: Path, *args: str) -> str:
    return _run(["git", "-C", str(root), *args]).strip()


# ---------------------------------------------------------------------------------------------
# MLflow


def mlflow_experiment(root: Path) -> str | None:
    """The MLflow experiment of the train runs (params.yaml mlflow.experiment), None when tracking
    is off or the project has no such setting."""
    try:
        cfg = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("mlflow") or {}
    except (OSError, ValueError):
        return None
    return cfg.get("experiment") if cfg.get("enabled", True) and cfg.get("experiment") else None


def create_parent_run(spec: StudySpec, root: Path, commit: str) -> str | None:
    """One MLflow run for the whole study, in the train runs' experiment: its trials' runs name it as
    their parent (tag mlflow.parentRunId) and so sit under it in the UI. None without MLflow."""
    experiment = mlflow_experiment(root)
    if experiment is None:
        return None
    from stages.mlstore import connect

    client, experiment_id = connect(experiment)
    run = client.create_run(experiment_id, run_name=f"sweep {spec.name}", tags={
        "sweep.study": spec.name, "sweep.commit": commit, "mlflow.source.git.commit": commit,
        "mlflow.note.content": f"Optuna study {spec.name}: {spec.direction} {spec.key} over "
                               + ", ".join(p.name for p in spec.searched) + f"; {spec.n_trials} trials"})
    for p in spec.searched:
        space = list(p.choices) if p.kind == "choice" else f"{p.kind} [{p.low}, {p.high}]" + (" log" if p.log else "")
        client.log_param(run.info.run_id, p.name, str(space))
    return run.info.run_id


def close_parent_run(root: Path, run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    _terminate(MlflowClient(_mlflow_environ(root)["MLFLOW_TRACKING_URI"]), run_id, "FINISHED")


def _terminate(client: Any, run_id: str, status: str) -> None:
    """End a run; quietly: against a tracking server MLflow prints two "View run" links per call,
    which would land in the worker's one-line-per-trial output."""
    with contextlib.redirect_stdout(io.StringIO()):
        client.set_terminated(run_id, status=status)


def _mlflow_environ(root: Path) -> dict:
    """MLFLOW_TRACKING_URI for the stages: the store they would use if run in the project itself
    (a SQLite path made absolute from the project root, not from the working copy)."""
    from stages.mlstore import tracking_location

    return {"MLFLOW_TRACKING_URI": tracking_location(root, os.environ)[0]}


def mlflow_runs(root: Path, name: str, fail_running: bool = False) -> dict:
    """{run name: run id} of the MLflow runs of experiment `name` (tag dvc.exp_name), from the
    store the stages used; with fail_running, runs left RUNNING are marked FAILED. {} when there is
    no store (MLflow is not even imported then)."""
    uri = _mlflow_environ(root)["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):].split("?")[0]).is_file():
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`dvc.exp_name` = '{name}'") if experiments else []
    found = {}
    for run in runs:
        found[run.info.run_name or run.info.run_id] = run.info.run_id
        if fail_running and run.info.status == "RUNNING":
            _terminate(client, run.info.run_id, "FAILED")
    return found


# ---------------------------------------------------------------------------------------------
# Inspecting and applying


def state_counts(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                  TrialState.WAITING, TrialState.FAIL)}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {budget_used(trials)} of n_trials counted"


def summary(spec: StudySpec, root: Path, top: int = 5) -> dict:
    """The study's state for `show`: counts, the best `top` complete trials, running and failed ones."""
    study = load(spec, root)
    trials = study.get_trials(deepcopy=False)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value,
                      reverse=spec.direction == "maximize")

    def row(t: FrozenTrial) -> dict:
        return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                "experiment": t.user_attrs.get("experiment") if t.state != TrialState.WAITING else None, "mlflow_runs": t.user_attrs.get("mlflow_runs") or {},
                "outcome": t.user_attrs.get("outcome"), "worker": t.user_attrs.get("worker"),
                "retry_of": t.system_attrs.get("failed_trial")}

    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return {"study": spec.name, "storage": backend.safe_url(backend.expand(storage_template(spec, root))),
            "commit": study.user_attrs.get("commit"), "direction": spec.direction,
            "objective": f"{spec.key} in {spec.metrics}", "n_trials": spec.n_trials, "counted": budget_used(trials),
            "counts": counts, "best": [row(t) for t in complete[:top]],
            "other": [row(t) for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING)],
            "pruned": [row(t) for t in trials if t.state == TrialState.PRUNED]}


def format_summary(s: dict) -> str:
    lines = [f"study {s['study']} ({s['storage']}), commit {str(s['commit'])[:7]}: {s['direction']} {s['objective']}",
             "trials: " + ", ".join(f"{n} {k}" for k, n in sorted(s["counts"].items()))
             + f"; {s['counted']} of {s['n_trials']} counted"]
    for title, rows in (("best", s["best"]), ("pruned", s["pruned"]), ("running, waiting, failed", s["other"])):
        if not rows:
            continue
        lines.append(f"{title}:")
        for r in rows:
            value = f"{r['value']:.4f}" if r["value"] is not None else r["state"]
            params = " ".join(f"{k}={v}" for k, v in r["params"].items())
            runs = " ".join(f"{k}:{v[:8]}" for k, v in sorted(r["mlflow_runs"].items()))
            extra = f" retry of t{r['retry_of']}" if r["retry_of"] is not None else ""
            outcome = f"  [{r['outcome']}]" if r["state"] in ("FAIL", "PRUNED") and r["outcome"] else ""
            lines.append(f"  t{r['number']:<4} {value:>8}  {r['experiment'] or '-'}  {params}{extra}"
                         + (f"  mlflow {runs}" if runs else "") + outcome)
    return "\n".join(lines)


def apply(spec: StudySpec, root: Path, number: int | None = None, pull: str | None = None) -> FrozenTrial:
    """`dvc exp apply` the trial `number` (default: the best) in the project; `pull`: first
    `dvc exp pull PULL <experiment>` (a trial another machine ran)."""
    study = load(spec, root)
    if number is None:
        try:
            trial = study.best_trial
        except ValueError:
            raise SweepError(f"study {spec.name} has no complete trial yet") from None
    else:
        found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not found:
            raise SweepError(f"study {spec.name} has no trial {number}")
        trial = found[0]
    if trial.state != TrialState.COMPLETE:
        raise SweepError(f"trial {trial.number} is {trial.state.name}: only a complete trial has an experiment")
    name = trial.user_attrs["experiment"]
    if pull:
        _run(DVC + ["exp", "pull", pull, name], cwd=root)
    _run(DVC + ["exp", "apply", name], cwd=root)
    return trial
