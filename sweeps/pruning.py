"""The train stage's side of a sweep: report each epoch's validation metric to the trial the stage
runs in, and stop the training when the pruner says the trial is hopeless.

A sweep worker (sweeps/engine.py) runs each trial as `dvc exp run` with the environment variable
RNN_SWEEP_TRIAL set to a JSON object: {"storage": URL (with ${VAR} placeholders, expanded here),
"study": name, "trial": number, "pruner": the study file's pruner section}. Outside a sweep the
variable is unset, `epoch_callbacks` returns [] and nothing here imports Optuna.

    callbacks = [progress, tracker, *epoch_callbacks(cell, replicate)]

Only the first replicate (seed index 0) of the pruner's `report` cell reports, at step = epoch: every
trial's step e is then the same thing (epoch e of seed 0), also between trials that differ in
`train.epochs`, which steps like replicate * epochs + epoch would misalign. The later seeds of a
trial that survived its first are not worth stopping. Every stage of a trial still checks, once an
epoch, that its trial is running: when the worker died and the trial was failed by its heartbeat,
a training left behind stops instead of burning the machine.

A stopped training raises `Pruned`, a SystemExit with code PRUNED_EXIT (77) after one line on stderr;
the trial's user attr `pruned` says where, which is how the worker tells pruned from failed (DVC
reports any failing stage alike).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TRIAL_ENV = "RNN_SWEEP_TRIAL"
STUDY_ENV = "RNN_SWEEP_STUDY"
PRUNED_EXIT = 77


class Pruned(SystemExit):
    """Stop the stage: its trial was pruned or is no longer running. Exit code PRUNED_EXIT."""

    def __init__(self, message: str):
        super().__init__(PRUNED_EXIT)
        self.message = message

    def __str__(self) -> str:
        return self.message


def trial_context(environ: dict | None = None) -> dict | None:
    """The trial this process runs in, from RNN_SWEEP_TRIAL, or None outside a sweep."""
    environ = os.environ if environ is None else environ
    text = environ.get(TRIAL_ENV, "").strip()
    if not text:
        return None
    try:
        context = json.loads(text)
    except json.JSONDecodeError:
        context = None
    if not isinstance(context, dict) or not {"storage", "study", "trial"} <= set(context):
        raise ValueError(f"environment variable {TRIAL_ENV}: expected JSON with storage, study and trial, "
                         f"got {text[:80]!r}")
    return context


def epoch_callbacks(cell: str, replicate: int = 0, environ: dict | None = None) -> list:
    """[] outside a sweep; else [a TrialReporter] for the fit callbacks of `cell`'s training number
    `replicate` (the index of its seed in train.seeds, 0 when there is one)."""
    context = trial_context(environ)
    if context is None:
        return []
    pruner = context.get("pruner") or {}
    reports = pruner.get("type", "none") != "none" and pruner.get("report") == cell and replicate == 0
    return [TrialReporter(context, cell, replicate, reports)]


class TrialReporter:
    """fit callback: on_epoch(record) reports record[metric] (if this training reports) and stops the
    stage, by raising Pruned, when the trial should be pruned or has stopped running."""

    def __init__(self, context: dict, cell: str, replicate: int, reports: bool):
        import optuna

        from sweeps import backend

        self.cell, self.replicate, self.reports = cell, replicate, reports
        self.metric = (context.get("pruner") or {}).get("metric", "val_accuracy")
        self.label = f"trial {context['trial']} of study {context['study']}"
        self.storage = backend.open_storage(context["storage"])
        study_id = self.storage.get_study_id_from_name(context["study"])
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, int(context["trial"]))
        study = optuna.load_study(study_name=context["study"], storage=self.storage,
                                  pruner=backend.make_pruner(context.get("pruner") or {}),
                                  sampler=optuna.samplers.RandomSampler())
        self.trial = optuna.trial.Trial(study, self.trial_id)

    def on_epoch(self, record: dict) -> None:
        from optuna.trial import TrialState

        state = self.storage.get_trial(self.trial_id).state
        if state != TrialState.RUNNING:
            self._stop(f"{self.label} is {state.name} (its worker is gone): {self.cell} training stopped")
        if not self.reports:
            return
        epoch, value = int(record["epoch"]), float(record[self.metric])
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            where: dict[str, Any] = {"cell": self.cell, "replicate": self.replicate, "epoch": epoch,
                                     self.metric: value}
            self.storage.set_trial_user_attr(self.trial_id, "pruned", where)
            self._stop(f"pruned: {self.label}: {self.cell} {self.metric} {value:.4f} after epoch {epoch}")

    def _stop(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        raise Pruned(message)
