"""sweeps: study files, the pruning hook, and workers running real `dvc exp run` trials on a tiny fake
pipeline (one stage: a script that reads params.yaml, reports each epoch through sweeps.pruning and
writes a metrics file whose value is a known function of its params)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from sweeps import backend, cli, engine, pruning
from sweeps.spec import (SpecError, check_not_overridden, grid_points, load_spec, overrides, parse_spec,
                         storage_template)

REPO = Path(__file__).resolve().parents[1]

FAKE_STAGE = '''
import json, os, time, yaml
from sweeps.pruning import epoch_callbacks
p = yaml.safe_load(open("params.yaml"))["train"]
epochs, pause = (400, 0.2) if os.environ.get("FAKE_SLOW") else (p["epochs"], 0)
if os.environ.get("FAKE_PIDFILE"):
    open(os.environ["FAKE_PIDFILE"], "w").write(str(os.getpid()))
callbacks = epoch_callbacks("lstm")
for epoch in range(1, epochs + 1):
    time.sleep(pause)
    val = {value}
    for cb in callbacks:
        cb.on_epoch({{"epoch": epoch, "val_accuracy": val}})
json.dump({{"cells": {{"lstm": {{"val_accuracy": {{"mean": val}}}}}}, "seen": p}}, open("metrics.json", "w"))
'''
VALUE = 'round(0.5 + p["hidden_size"] / 1000 + 10 * p["lr"] - 0.1 / epoch, 6)'


def expected(lr: float, hidden_size: int, epochs: int) -> float:
    """The fake stage's final value: a function of the trial's own params only."""
    return round(0.5 + hidden_size / 1000 + 10 * lr - 0.1 / epochs, 6)


def study_file(name: str, **extra) -> dict:
    return {"name": name, "objective": {"metrics": "metrics.json", "key": "cells.lstm.val_accuracy.mean"},
            "params": {"train.lr": {"choices": [0.01, 0.001]}, "train.hidden_size": {"choices": [32, 64]},
                       "train.epochs": 3},
            "sampler": "grid", "pruner": {"type": "none"}, "heartbeat": {"interval": 1, "grace": 2}, **extra}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template") / "project"
    root.mkdir()
    (root / "params.yaml").write_text("train:\n  lr: 0.005\n  hidden_size: 16\n  epochs: 2\n")
    (root / "train.py").write_text(FAKE_STAGE.format(value=VALUE))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "python train.py", "deps": ["train.py"], "params": ["train"],
        "metrics": [{"metrics.json": {"cache": False}}]}}}))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fake pipeline"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "project"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.delenv("RNN_SWEEP_STORAGE", raising=False)
    return root


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RNN_SWEEP", "FAKE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # the stage's `python`
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def write_study(root: Path, data: dict) -> Path:
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sweeps(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps", *args], cwd=root, env=env or environment(),
                          capture_output=True, text=True, timeout=120)


def command(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m sweeps ARGS` in this process (cwd: the project): (exit code, stdout, stderr)."""
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def start_worker(root: Path, study: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweeps", "work", str(study)], cwd=root, env=env or environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trials(root: Path, study: Path) -> list[optuna.trial.FrozenTrial]:
    spec = parse_spec(yaml.safe_load(study.read_text()))
    return engine.load(spec, root).get_trials()


def experiments(root: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=root,
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


# ---------------------------------------------------------------------------------------------
# Study files


def test_a_study_file_reads_ranges_choices_and_fixed_values():
    spec = parse_spec({"name": "s", "objective": {"metrics": "m.json", "key": "cells.gru.val_accuracy.mean",
                                                  "direction": "minimize"}, "n_trials": 4,
                       "params": {"train.lr": {"low": "1e-4", "high": 0.01, "log": True},
                                  "train.hidden_size": {"low": 64, "high": 256, "step": 64},
                                  "+train.overrides.gru.dropout": {"low": 0.0, "high": 0.5},
                                  "train.optimizer": {"choices": ["adam", "adamw"]},
                                  "train.cells": ["gru"], "train.epochs": 2}})
    kinds = {p.key: (p.kind, p.low) for p in spec.params}
    assert kinds == {"train.lr": ("float", 1e-4), "train.hidden_size": ("int", 64),
                     "+train.overrides.gru.dropout": ("float", 0.0), "train.optimizer": ("choice", None),
                     "train.cells": ("fixed", None), "train.epochs": ("fixed", None)}
    assert spec.pruner == {"type": "median", "report": "gru", "metric": "val_accuracy", "n_startup_trials": 3,
                           "n_warmup_steps": 0}
    values = {"train.lr": 0.002, "train.hidden_size": 128, "train.overrides.gru.dropout": 0.25,
              "train.optimizer": "adamw"}
    assert overrides(spec, values) == ["train.lr=0.002", "train.hidden_size=128", "+train.overrides.gru.dropout=0.25",
                                       "train.optimizer=adamw", "train.cells=[gru]", "train.epochs=2"]
    assert spec.heartbeat == {"interval": 60, "grace": 180, "max_retry": 1}


def test_a_deleted_key_is_fixed_for_every_trial():
    """`~train.overrides.gru: null`: every trial runs without the key (here the GRU's default override)."""
    spec = parse_spec({**study_file("d"), "params": {"train.lr": {"choices": [0.1, 0.2]}, "train.cells": ["lstm"],
                                                     "~train.overrides.gru": None}})
    assert overrides(spec, {"train.lr": 0.1}) == ["train.lr=0.1", "train.cells=[lstm]", "~train.overrides.gru"]
    assert [p.name for p in spec.searched] == ["train.lr"]
    for study in ("lstm-full-pruned", "lstm-full-full"):
        full = load_spec(REPO / "sweeps" / f"{study}.yaml")
        assert "~train.overrides.gru" in overrides(full, grid_points(full)[0])


def test_the_example_study_reads():
    spec = load_spec(REPO / "sweeps" / "lstm.yaml")
    assert spec.key == "cells.lstm.val_accuracy.mean" and spec.pruner["report"] == "lstm"
    assert [p.name for p in spec.searched] == ["train.lr", "train.dropout", "train.hidden_size"]


def test_a_grid_is_every_combination_of_its_choices_in_file_order():
    spec = parse_spec(study_file("g"))
    assert spec.n_trials == 4
    assert grid_points(spec) == [{"train.lr": lr, "train.hidden_size": h} for lr in (0.01, 0.001) for h in (32, 64)]


def test_a_shuffled_grid_has_the_same_points_in_an_order_its_seed_decides():
    in_file_order = grid_points(parse_spec(study_file("g")))
    shuffled = [grid_points(parse_spec(study_file("g", order="shuffled", seed=seed))) for seed in range(6)]
    assert all(sorted(map(str, points)) == sorted(map(str, in_file_order)) for points in shuffled)
    assert len({str(points) for points in shuffled}) > 1 and any(points != in_file_order for points in shuffled)
    assert shuffled[3] == grid_points(parse_spec(study_file("g", order="shuffled", seed=3)))


@pytest.mark.parametrize("change, message", [
    ({"sampler": "grid", "params": {"train.lr": {"low": 0.1, "high": 1.0}}}, "takes lists of values, not ranges"),
    ({"params": {"train.lr": 0.1}}, "nothing to search"),
    ({"params": {"train.lr": {"low": 1.0, "high": 0.1}}}, "low 1.0 must be below high 0.1"),
    ({"params": {"train.lr": {"low": 0.0, "high": 0.1, "log": True}}}, "log range needs low > 0"),
    ({"params": {"train.lr": {"choices": [0.1, 0.1]}}}, "given twice"),
    ({"params": {"train.cells": {"choices": [["lstm"], ["gru"]]}}}, "Optuna's categorical values"),
    ({"n_trials": 5}, "but the grid has 4 points"),
    ({"order": "random"}, "order: 'random': file or shuffled"),
    ({"sampler": "tpe", "order": "shuffled"}, "only with sampler: grid"),
    ({"objective": {"metrics": "m.json", "key": "test_accuracy"}, "pruner": "median"}, "pruner.report"),
    ({"pruner": {"type": "median", "patience": 2}}, "unknown key 'patience'"),
    ({"storage": "postgresql+psycopg://sweeps:hunter2@db/optuna"}, "holds a password"),
    ({"name": "a b"}, "name: 'a b'"),
    ({"params": {"train.lr": {"choices": [0.1, 0.2]}, "~train.dropout": 0.5}}, "takes no value"),
])
def test_bad_study_files_are_one_line_errors(change, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(".", r"\.")) as info:
        parse_spec({**study_file("s"), **change})
    assert "\n" not in str(info.value)


def test_a_key_a_cells_override_would_shadow_is_refused_unless_the_override_is_deleted():
    params = {"train": {"cells": ["rnn", "lstm"], "dropout": 0.5, "clip": {"threshold": 5.0},
                        "overrides": {"lstm": {"dropout": 0.3, "clip": {"threshold": 1.0}}, "rnn": {}}}}
    searched = {"train.dropout": {"choices": [0.2, 0.4]}}
    with pytest.raises(SpecError, match=r"s: params\.train\.dropout: params\.yaml's train\.overrides\.lstm\.dropout "
                                        r"= 0\.3 sets it again for the lstm cell") as info:
        check_not_overridden(parse_spec({**study_file("s"), "params": searched}), params, "s")
    assert "\n" not in str(info.value)
    with pytest.raises(SpecError, match=r"train\.overrides\.lstm\.clip\.threshold = 1\.0"):   # a fixed nested key too
        check_not_overridden(parse_spec({**study_file("s"), "params": {**searched, "~train.overrides.lstm.dropout": None,
                                                                       "train.clip.threshold": 2.0}}), params)
    for fine in ({**searched, "~train.overrides.lstm.dropout": None},      # the override deleted
                 {**searched, "~train.overrides.lstm": None},              # every LSTM override deleted
                 {**searched, "train.cells": ["rnn"]},                     # the LSTM is not trained
                 {"train.overrides.lstm.dropout": {"choices": [0.2, 0.4]}},  # the override searched itself
                 {"train.lr": {"choices": [0.1, 0.2]}}):                   # a key no cell overrides
        check_not_overridden(parse_spec({**study_file("s"), "params": fine}), params)


def test_the_projects_studies_vary_what_they_search():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        check_not_overridden(load_spec(path), params)
    lstm = load_spec(REPO / "sweeps" / "lstm.yaml")
    without = parse_spec({k: v for k, v in lstm.source.items()} | {"params": {
        k: v for k, v in lstm.source["params"].items() if not k.startswith("~train.overrides.lstm")}})
    with pytest.raises(SpecError, match="train.overrides.lstm.dropout"):
        check_not_overridden(without, params)


def test_storage_is_an_sqlite_file_in_the_project_or_a_url_with_secrets_from_the_environment(tmp_path):
    spec = parse_spec(study_file("s"))
    assert storage_template(spec, tmp_path, {}) == f"sqlite:///{tmp_path}/sweeps/s.db"
    team = parse_spec({**study_file("s"), "storage": "postgresql+psycopg://sweeps:${SWEEP_DB_PASSWORD}@db:5432/optuna"})
    template = storage_template(team, tmp_path, {})
    assert "${SWEEP_DB_PASSWORD}" in template                  # what goes to the stages' environment
    from sweeps.spec import expand
    assert expand(template, {"SWEEP_DB_PASSWORD": "s3cret"}) == "postgresql+psycopg://sweeps:s3cret@db:5432/optuna"
    with pytest.raises(SpecError, match="SWEEP_DB_PASSWORD is not set"):
        expand(template, {})
    assert storage_template(team, tmp_path, {"RNN_SWEEP_STORAGE": "postgresql+psycopg://x@y/z"}) == "${RNN_SWEEP_STORAGE}"
    assert backend.safe_url("postgresql+psycopg://sweeps:s3cret@db/optuna") == "postgresql+psycopg://sweeps:***@db/optuna"


def test_the_objective_is_read_by_its_key_path_or_named_in_one_line(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"cells": {"lstm": {"val_accuracy": {"mean": 0.81, "sd": 0.01}}, "gru": {}}}))
    assert engine.read_metric(path, "cells.lstm.val_accuracy.mean") == 0.81
    with pytest.raises(engine.SweepError, match=r"no key cells\.rnn \(found: gru, lstm\)"):
        engine.read_metric(path, "cells.rnn.val_accuracy.mean")
    with pytest.raises(engine.SweepError, match="not a finite number"):
        engine.read_metric(path, "cells.lstm.val_accuracy")


# ---------------------------------------------------------------------------------------------
# The train stage's hook


def test_the_hook_reports_epochs_and_stops_a_pruned_training_with_exit_code_77(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    pruner = {"type": "median", "report": "lstm", "metric": "val_accuracy", "n_startup_trials": 1,
              "n_warmup_steps": 0}
    study = optuna.create_study(study_name="s", storage=backend.open_storage(url, create_tables=True),
                                direction="maximize", pruner=backend.make_pruner(pruner))
    good = study.ask()
    for epoch, value in enumerate([0.6, 0.7], 1):
        good.report(value, epoch)
    study.tell(good, 0.7)
    bad = study.ask()
    environ = {pruning.TRIAL_ENV: json.dumps({"storage": url, "study": "s", "trial": bad.number, "pruner": pruner})}
    assert pruning.epoch_callbacks("lstm", environ={}) == []
    assert not pruning.epoch_callbacks("lstm", replicate=1, environ=environ)[0].reports   # later seeds do not
    assert not pruning.epoch_callbacks("gru", environ=environ)[0].reports
    (hook,) = pruning.epoch_callbacks("lstm", environ=environ)
    with pytest.raises(pruning.Pruned) as stop:
        hook.on_epoch({"epoch": 1, "val_accuracy": 0.5})
    assert stop.value.code == pruning.PRUNED_EXIT == 77 and "after epoch 1" in stop.value.message
    record = study.trials[bad.number]
    assert record.intermediate_values == {1: 0.5}
    assert record.user_attrs["pruned"] == {"cell": "lstm", "replicate": 0, "epoch": 1, "val_accuracy": 0.5}
    study.tell(bad, state=TrialState.FAIL)               # e.g. failed by the heartbeat of a dead worker
    (gru,) = pruning.epoch_callbacks("gru", environ=environ)
    with pytest.raises(pruning.Pruned, match="is FAIL"):
        gru.on_epoch({"epoch": 3, "val_accuracy": 0.9})


# ---------------------------------------------------------------------------------------------
# Workers on the fake pipeline


def test_two_workers_run_a_grid_each_trial_with_its_own_settings_then_show_and_apply(project, capsys):
    study = write_study(project, study_file("grid"))
    code, out, _ = command(capsys, "create", str(study))
    assert code == 0 and "4 grid points enqueued" in out
    code, _, err = command(capsys, "create", str(study))
    assert code == 2 and err.startswith("error: study grid already exists")
    workers = [start_worker(project, study) for _ in range(2)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    done = trials(project, study)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 4
    assert sorted((t.params["train.lr"], t.params["train.hidden_size"]) for t in done) == sorted(
        (lr, h) for lr in (0.01, 0.001) for h in (32, 64))
    for t in done:                  # workers side by side never mixed settings: value = f(own params)
        assert t.value == expected(t.params["train.lr"], t.params["train.hidden_size"], 3)
        assert t.user_attrs["experiment"] == f"grid-t{t.number}"
    assert {t.user_attrs["worker"] for t in done} == {f"{os.uname().nodename}-{w.pid}" for w in workers}
    assert experiments(project) >= {f"grid-t{t.number}" for t in done}
    assert not list((project / engine.COPIES / "grid").glob(f"{os.uname().nodename}-*"))   # copies removed

    code, out, _ = command(capsys, "show", str(study), "--json")
    summary = json.loads(out)
    assert summary["counts"] == {"COMPLETE": 4} and summary["counted"] == 4
    best = summary["best"][0]
    assert best["params"] == {"train.lr": 0.01, "train.hidden_size": 64} and best["experiment"] == f"grid-t{best['number']}"
    assert "best:" in command(capsys, "show", str(study))[1]

    code, out, err = command(capsys, "apply", str(study))
    assert code == 0, err
    params = yaml.safe_load((project / "params.yaml").read_text())["train"]
    assert params == {"lr": 0.01, "hidden_size": 64, "epochs": 3}
    assert json.loads((project / "metrics.json").read_text())["cells"]["lstm"]["val_accuracy"]["mean"] == best["value"]


def test_a_pruned_trial_is_recorded_pruned_not_as_a_finished_point(project):
    study = write_study(project, study_file("prune", params={"train.lr": {"choices": [0.01, 0.001]},
                                                             "train.hidden_size": 32, "train.epochs": 3},
                                            pruner={"type": "median", "report": "lstm", "n_startup_trials": 1}))
    assert sweeps(project, "create", str(study)).returncode == 0
    team = project.parent / "team.git"              # a team's git remote: --push sends it each experiment
    subprocess.run(["git", "init", "-q", "--bare", str(team)], check=True)
    subprocess.run(["git", "remote", "add", "team", str(team)], cwd=project, check=True)
    worked = sweeps(project, "work", str(study), "--push", "team")
    assert worked.returncode == 0, worked.stdout + worked.stderr
    pushed = subprocess.run(["git", "ls-remote", str(team)], capture_output=True, text=True, check=True).stdout
    assert [line.rsplit("/", 1)[-1] for line in pushed.splitlines()] == ["prune-t0"]
    first, second = trials(project, study)
    assert first.state == TrialState.COMPLETE and first.intermediate_values == {
        e: expected(0.01, 32, e) for e in (1, 2, 3)}
    assert second.state == TrialState.PRUNED and second.intermediate_values == {1: expected(0.001, 32, 1)}
    assert second.user_attrs["pruned"]["epoch"] == 1 and second.user_attrs["outcome"].startswith("pruned")
    assert "exited with 77" in Path(second.user_attrs["log"]).read_text()
    assert "prune-t1" not in experiments(project)
    assert "PRUNED" in worked.stdout


def test_a_killed_workers_trial_is_failed_by_its_heartbeat_and_retried_once_with_the_same_params(project, tmp_path):
    study = write_study(project, study_file("kill", sampler="random", n_trials=1,
                                            params={"train.lr": {"low": 0.001, "high": 0.01}, "train.hidden_size": 64,
                                                    "train.epochs": 2},
                                            pruner={"type": "median", "report": "lstm", "n_startup_trials": 5}))
    assert sweeps(project, "create", str(study)).returncode == 0
    pidfile = tmp_path / "stage.pid"
    doomed = start_worker(project, study, environment(FAKE_SLOW="1", FAKE_PIDFILE=str(pidfile)))
    deadline = time.monotonic() + 60
    while not any(t.intermediate_values for t in trials(project, study)):     # training under way
        assert doomed.poll() is None and time.monotonic() < deadline, doomed.stdout.read() if doomed.poll() else ""
        time.sleep(0.3)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    rescuer = sweeps(project, "work", str(study))
    assert rescuer.returncode == 0, rescuer.stdout + rescuer.stderr
    killed, retry = trials(project, study)
    assert (killed.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE), rescuer.stdout
    assert retry.system_attrs["failed_trial"] == killed.number and retry.params == killed.params
    assert retry.value == expected(killed.params["train.lr"], 64, 2)
    assert "its worker stopped" in rescuer.stdout
    # The killed worker's stage, left behind, saw its trial failed and stopped.
    stage = int(pidfile.read_text())
    deadline = time.monotonic() + 30
    while _alive(stage) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not _alive(stage)


def test_a_worker_stopped_by_sigterm_fails_its_trial_and_enqueues_it_again(project):
    study = write_study(project, study_file("term", sampler="random", n_trials=1,
                                            params={"train.lr": {"low": 0.001, "high": 0.01}, "train.hidden_size": 64,
                                                    "train.epochs": 2}))
    assert sweeps(project, "create", str(study)).returncode == 0
    pidfile = project.parent / "stage.pid"
    worker = start_worker(project, study, environment(FAKE_SLOW="1", FAKE_PIDFILE=str(pidfile)))
    deadline = time.monotonic() + 60
    while not pidfile.exists():                                     # the stage is running
        assert worker.poll() is None and time.monotonic() < deadline
        time.sleep(0.3)
    worker.terminate()
    out = worker.communicate(timeout=60)[0]
    assert worker.returncode == 130 and "interrupted; enqueued again" in out, out
    stopped, retry = trials(project, study)
    assert (stopped.state, stopped.user_attrs["outcome"]) == (TrialState.FAIL, "interrupted")
    assert retry.state == TrialState.WAITING and retry.params == stopped.params
    assert not _alive(int(pidfile.read_text()))                     # its stage went with it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:          # a zombie is gone for our purposes
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_study_has_one_parent_mlflow_run_and_a_dead_trials_runs_are_marked_failed(project, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "mlflow": {"enabled": True, "experiment": "fake"}}))
    study_path = write_study(project, study_file("ml"))
    assert command(capsys, "create", str(study_path))[0] == 0
    study = engine.load(parse_spec(yaml.safe_load(study_path.read_text())), project)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["sweep.study"] == "ml" and parent.info.status == "RUNNING"
    assert parent.data.params["train.lr"] == "[0.01, 0.001]"
    # A trial's stage run, as the train stage makes it inside `dvc exp run -n ml-t0` (tag dvc.exp_name).
    left = client.create_run(parent.info.experiment_id, run_name="lstm (ml-t0)", tags={"dvc.exp_name": "ml-t0"})
    assert engine.mlflow_runs(project, "ml-t0") == {"lstm (ml-t0)": left.info.run_id}
    with backend.quiet():
        trial = study.ask()                                 # grid point 0
    trial.set_user_attr("experiment", "ml-t0")
    study.tell(trial, state=TrialState.FAIL)                 # as fail_stale_trials leaves it
    engine.StaleTrials(1, project)(study, study.trials[trial.number])
    assert client.get_run(left.info.run_id).info.status == "FAILED"
    retry = study.trials[-1]                                 # after grid points 1-3, waiting
    assert (retry.number, retry.state, retry.system_attrs["failed_trial"]) == (4, TrialState.WAITING, 0)
    assert retry.params == trial.params
    engine.close_parent_run(project, parent.info.run_id)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
