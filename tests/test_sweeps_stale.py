"""sweeps.engine.StaleTrials when MLflow refuses: the dead trial is retried all the same, and the
worker says in one line that its runs are still RUNNING (tests/test_team.py covers the case where
MLflow answers)."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from sweeps import backend, engine


def test_a_dead_trial_is_retried_and_a_refusing_mlflow_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    def refused(root, name, fail_running=False):
        raise RuntimeError(f"API request to update run of {name} failed\nwith error code 403 != 200")

    monkeypatch.setattr(engine, "mlflow_runs", refused)
    study = optuna.create_study(direction="maximize")
    with backend.quiet():
        trial = study.ask()
    trial.suggest_float("train.lr", 0.001, 0.01)
    trial.set_user_attr("experiment", "study-t0")
    study.tell(trial, state=TrialState.FAIL)                  # as fail_stale_trials leaves it
    engine.StaleTrials(1, tmp_path)(study, study.trials[0])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "trial 0: its worker stopped (no heartbeat); failed, and enqueued again"
    assert out[1] == ("trial 0: its MLflow runs left RUNNING could not be marked FAILED: API request to update "
                      "run of study-t0 failed with error code 403 != 200")
    dead, retry = study.trials
    assert (retry.state, retry.params, retry.system_attrs["failed_trial"]) == (TrialState.WAITING, dead.params, 0)
