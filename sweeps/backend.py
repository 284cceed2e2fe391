"""Optuna objects from a study file's settings: the storage, the pruner, the sampler.

Storage: Optuna's RDB storage, an SQLite file on one machine, PostgreSQL for a team. Not Optuna's
JournalFileBackend: in Optuna 5.1 JournalStorage has no heartbeat (it does not implement
BaseHeartbeat), so a trial whose worker was killed would stay RUNNING for ever instead of being failed
and retried. SQLite serialises writers with a file lock, which holds between processes on one
machine's local disk (not on NFS): several workers there are safe; a busy writer makes the others
wait up to SQLITE_TIMEOUT seconds rather than fail with "database is locked".
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optuna

from sweeps.spec import PRUNERS, SpecError, StudySpec, expand

SQLITE_TIMEOUT = 60

optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Heartbeats, retries and ask() beside them are "experimental" in Optuna: a warning each call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def open_storage(template: str, heartbeat: dict | None = None,
                 stale_callback: Callable | None = None, create_tables: bool = False) -> optuna.storages.RDBStorage:
    """The RDB storage at `template` (its ${VAR} expanded from the environment). Only `create` makes
    tables: workers racing to create them on an empty database is a known Optuna failure."""
    url = expand(template)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    elif url.startswith("postgresql"):
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}     # a server restart costs a query, not a trial
    if heartbeat:
        kwargs.update(heartbeat_interval=heartbeat["interval"], grace_period=heartbeat["grace"],
                      heartbeat_stale_trial_callback=stale_callback)
    try:
        with quiet():
            return optuna.storages.RDBStorage(url, skip_table_creation=not create_tables, **kwargs)
    except ImportError as exc:
        raise SpecError(f"storage {safe_url(template)}: no database driver ({exc}); for PostgreSQL "
                        f"install psycopg (the `server` extra)") from None


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:           # a placeholder URL sqlalchemy cannot parse: it holds no secret
        return url


def make_pruner(settings: dict) -> optuna.pruners.BasePruner:
    """The pruner of a study file's `pruner` section (sweeps.spec.parse_pruner's dict)."""
    kind = settings.get("type", "none")
    kwargs = {k: v for k, v in settings.items() if k in PRUNERS.get(kind, set())}
    classes = {"median": optuna.pruners.MedianPruner, "asha": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    try:
        return classes[kind](**kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"pruner ({kind}): {exc}") from None


def make_sampler(spec: StudySpec, worker_seed: int | None = None) -> optuna.samplers.BaseSampler:
    """TPE (constant liar: running trials count as bad guesses, so parallel workers spread out) or
    random. A grid study never samples: its workers only take enqueued trials. With the file's seed,
    each worker still needs its own (`worker_seed`), or two workers asking at once would get the same
    point."""
    seed = None if spec.seed is None else hash((spec.seed, worker_seed)) % 2**32
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def suggest(trial: optuna.trial.Trial, spec: StudySpec) -> dict:
    """The trial's value of every searched param (an enqueued or retried trial's fixed ones)."""
    values = {}
    for p in spec.searched:
        if p.kind == "choice":
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            values[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    return values
