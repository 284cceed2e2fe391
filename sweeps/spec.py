"""A study file: what to search, what to optimise, where the study lives.

    name: lstm-lr                       # the study; trial t runs as DVC experiment <name>-t<t>
    objective:
      metrics: reports/summary.json     # a metrics file the pipeline writes (validation, never test)
      key: cells.lstm.val_accuracy.mean # dotted path into it
      direction: maximize               # or minimize
    n_trials: 12
    params:                             # params.yaml keys, written as `dvc exp run -S` writes them
      train.lr: {low: 0.0005, high: 0.01, log: true}    # float range (log scale)
      train.dropout: {low: 0.0, high: 0.6}              # float range
      train.hidden_size: {low: 64, high: 256, step: 64} # int range (ints in, ints out)
      train.optimizer: {choices: [adam, adamw]}         # choices (a grid axis with sampler: grid)
      train.cells: [lstm]                               # anything else: fixed for every trial
      train.epochs: 4
    sampler: tpe                        # tpe (default) | random | grid (every combination, enqueued)
    order: file                         # grid only: file (default) | shuffled (by `seed`, default 0)
    pruner: {type: median, report: lstm}              # median (default) | asha | hyperband | none
    storage: sqlite:///sweeps/lstm-lr.db              # the default; or postgresql+psycopg://...
    targets: [compare]                  # optional: run only these stages and what they need

Nothing here imports Optuna: the study file is checked before any engine starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SAMPLERS = ("tpe", "random", "grid")
ORDERS = ("file", "shuffled")
MAX_GRID_POINTS = 10_000        # each a whole pipeline run; a bigger grid is a typo (10^7 points: 3.9 GB)
PRUNERS = {   # type -> the keyword arguments it takes besides `report` and `metric` (Optuna's names)
    "median": {"n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"},
    "asha": {"min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"},
    "hyperband": {"min_resource", "max_resource", "reduction_factor", "bootstrap_count"},
    "none": set(),
}
# Optuna's median default waits for 5 finished trials; a dozen-trial study would barely prune.
PRUNER_DEFAULTS = {"median": {"n_startup_trials": 3, "n_warmup_steps": 0}}
STORAGE_ENV = "RNN_SWEEP_STORAGE"      # overrides the file's storage (one URL per machine or team)
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SpecError(ValueError):
    """A study file that cannot be run; the message is one line naming the file and key."""


@dataclass(frozen=True)
class Param:
    """One searched or fixed params.yaml key. `key` is as `-S` takes it (`+train.overrides.lstm.lr`
    adds a key params.yaml lacks); `name`, the key without Hydra's prefix, names it in the study."""
    key: str
    kind: str                   # float | int | choice | fixed
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    value: Any = None           # kind fixed

    @property
    def name(self) -> str:
        return self.key.lstrip("+~")


@dataclass(frozen=True)
class StudySpec:
    name: str
    metrics: str                # path of the metrics file, relative to the project root
    key: str                    # dotted key path into it
    direction: str              # maximize | minimize
    n_trials: int
    params: tuple[Param, ...]
    sampler: str = "tpe"
    order: str = "file"         # grid only: the points in file order or shuffled by `seed`
    seed: int | None = None
    pruner: dict = field(default_factory=dict)    # {"type", "report", "metric", **kwargs}
    storage: str | None = None  # as written (may hold ${VAR}); None: sqlite file in sweeps/
    heartbeat: dict = field(default_factory=dict)  # {"interval", "grace", "max_retry"}
    targets: tuple[str, ...] = ()   # stages `dvc exp run` reproduces (with what they need); () = all
    source: dict = field(default_factory=dict)     # the file's content, as read

    @property
    def searched(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.kind != "fixed")

    @property
    def fixed(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.kind == "fixed")

    def fingerprint(self) -> str:
        """Hash of what decides the trials (not storage or heartbeat): workers refuse a changed file."""
        decisive = {k: v for k, v in self.source.items() if k not in ("storage", "heartbeat")}
        return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_spec(path: str | Path) -> StudySpec:
    """Read and check a study file; SpecError (one line) names what is wrong."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not YAML: {' '.join(str(exc).split())}") from None
    return parse_spec(data, str(path))


def parse_spec(data: Any, where: str = "study") -> StudySpec:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping with name, objective, params")
    known = {"name", "objective", "n_trials", "params", "sampler", "order", "seed", "pruner", "storage", "heartbeat",
             "targets"}
    _no_unknown(data, known, where)
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SpecError(f"{where}: name: {name!r}: letters, digits, '.', '_', '-' (it names experiments)")
    objective = data.get("objective")
    if not isinstance(objective, dict):
        raise SpecError(f"{where}: objective: expected {{metrics: FILE, key: a.b.c, direction: maximize}}")
    _no_unknown(objective, {"metrics", "key", "direction"}, f"{where}: objective")
    for k in ("metrics", "key"):
        if not isinstance(objective.get(k), str) or not objective[k]:
            raise SpecError(f"{where}: objective.{k}: missing or not a string")
    direction = objective.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise SpecError(f"{where}: objective.direction: {direction!r}: maximize or minimize")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise SpecError(f"{where}: params: expected a mapping of params.yaml keys to ranges, choices or values")
    params = tuple(parse_param(str(k), v, f"{where}: params.{k}") for k, v in raw_params.items())
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise SpecError(f"{where}: params: a key is given twice (with and without a + prefix)")
    sampler = data.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise SpecError(f"{where}: sampler: {sampler!r}: one of {', '.join(SAMPLERS)}")
    searched = [p for p in params if p.kind != "fixed"]
    if not searched:
        raise SpecError(f"{where}: params: nothing to search (give a range or two or more choices)")
    if sampler == "grid":
        ranges = [p.key for p in searched if p.kind != "choice"]
        if ranges:
            raise SpecError(f"{where}: params.{ranges[0]}: a grid study takes lists of values, not ranges")
    order = data.get("order", "file")
    if order not in ORDERS or (order != "file" and sampler != "grid"):
        raise SpecError(f"{where}: order: {order!r}: file or shuffled, and only with sampler: grid")
    grid_size = math.prod(len(p.choices) for p in searched) if sampler == "grid" else None
    if grid_size is not None and grid_size > MAX_GRID_POINTS:
        raise SpecError(f"{where}: params: the grid has {grid_size:,} points, more than {MAX_GRID_POINTS:,} runs")
    n_trials = data.get("n_trials", grid_size)
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise SpecError(f"{where}: n_trials: {n_trials!r}: a positive integer")
    if grid_size is not None and n_trials != grid_size:
        raise SpecError(f"{where}: n_trials: {n_trials} but the grid has {grid_size} points (leave n_trials out)")
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise SpecError(f"{where}: seed: {seed!r}: an integer or null")
    pruner = parse_pruner(data.get("pruner", {}), objective["key"], f"{where}: pruner")
    storage = data.get("storage")
    if storage is not None:
        check_storage(storage, f"{where}: storage")
    targets = data.get("targets") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise SpecError(f"{where}: targets: a list of stage names (`dvc exp run` targets), e.g. [compare]")
    heartbeat = {"interval": 60, "grace": None, "max_retry": 1, **(data.get("heartbeat") or {})}
    _no_unknown(heartbeat, {"interval", "grace", "max_retry"}, f"{where}: heartbeat")
    for k, v in heartbeat.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "max_retry" else 1)):
            raise SpecError(f"{where}: heartbeat.{k}: {v!r}: a positive integer (seconds; max_retry >= 0)")
    heartbeat["grace"] = heartbeat["grace"] or 3 * heartbeat["interval"]
    return StudySpec(name=name, metrics=objective["metrics"], key=objective["key"], direction=direction,
                     n_trials=n_trials, params=params, sampler=sampler, order=order, seed=seed, pruner=pruner,
                     storage=storage, heartbeat=heartbeat, targets=tuple(targets), source=data)


def parse_param(key: str, value: Any, where: str) -> Param:
    """`{low, high[, log][, step]}`: a range (int when low, high and step are ints); `{choices: [...]}`:
    choices (the axes of a grid); anything else, lists included: one fixed value."""
    if not re.fullmatch(r"(\+\+|\+|~)?[A-Za-z0-9_.:/-]+", key) or key.lstrip("+~").startswith("."):
        raise SpecError(f"{where}: not a params key as `dvc exp run -S` takes it (e.g. train.lr)")
    if key.startswith("~"):        # `~train.overrides.gru: null`: every trial runs without that key
        if value is not None:
            raise SpecError(f"{where}: deleting a key (~) takes no value (write null); it cannot be searched")
        return Param(key, "fixed", value=None)
    if isinstance(value, dict) and "choices" in value:
        _no_unknown(value, {"choices"}, where)
        choices = value["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpecError(f"{where}.choices: a non-empty list")
        if not all(c is None or isinstance(c, (str, int, float, bool)) for c in choices):
            raise SpecError(f"{where}.choices: numbers, strings, booleans or null (Optuna's categorical values)")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise SpecError(f"{where}.choices: a choice is given twice")
        if len(choices) == 1:
            return Param(key, "fixed", value=choices[0])
        return Param(key, "choice", choices=tuple(choices))
    if isinstance(value, dict) and ("low" in value or "high" in value):
        _no_unknown(value, {"low", "high", "log", "step"}, where)
        low, high = (_number(value.get(k), f"{where}.{k}") for k in ("low", "high"))
        step = None if value.get("step") is None else _number(value["step"], f"{where}.step")
        log = value.get("log", False)
        if not isinstance(log, bool):
            raise SpecError(f"{where}.log: {log!r}: true or false")
        kind = "int" if all(isinstance(v, int) for v in (low, high) + ((step,) if step is not None else ())) else "float"
        if not low < high:
            raise SpecError(f"{where}: low {low} must be below high {high}")
        if log and (low <= 0 or step is not None):
            raise SpecError(f"{where}: a log range needs low > 0 and no step")
        if step is not None and step <= 0:
            raise SpecError(f"{where}.step: {step}: must be > 0")
        return Param(key, kind, low=low, high=high, log=log, step=step)
    return Param(key, "fixed", value=value)


def _number(value: Any, where: str) -> int | float:
    if isinstance(value, bool):
        raise SpecError(f"{where}: {value!r}: a number")
    if isinstance(value, (int, float)):
        return value
    try:                    # YAML 1.1 reads 1e-4 (no dot) as a string
        return float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{where}: {value!r}: a number") from None


def parse_pruner(value: Any, objective_key: str, where: str) -> dict:
    """{"type", "report": the cell whose first replicate reports, "metric": its per-epoch key, **kw}."""
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a pruner type or {{type: median, ...}}")
    kind = value.get("type", "median")
    if kind not in PRUNERS:
        raise SpecError(f"{where}.type: {kind!r}: one of {', '.join(PRUNERS)}")
    kwargs = {k: v for k, v in value.items() if k not in ("type", "report", "metric")}
    _no_unknown(kwargs, PRUNERS[kind], f"{where} ({kind})")
    report = value.get("report")
    if report is None and kind != "none":
        # The objective's cell by default: cells.<cell>.… in reports/summary.json.
        parts = objective_key.split(".")
        if len(parts) < 2 or parts[0] != "cells":
            raise SpecError(f"{where}.report: name the cell whose training reports each epoch (e.g. lstm)")
        report = parts[1]
    return {"type": kind, "report": report, "metric": value.get("metric", "val_accuracy"),
            **PRUNER_DEFAULTS.get(kind, {}), **kwargs}


def check_storage(url: Any, where: str) -> None:
    """A storage URL in a study file may name its secrets only as ${VAR} (or leave them to libpq's
    PGPASSWORD / ~/.pgpass): a file in git must not hold a password."""
    if not isinstance(url, str) or "://" not in url:
        raise SpecError(f"{where}: {url!r}: a database URL (sqlite:///FILE, postgresql+psycopg://USER@HOST/DB)")
    authority = url.split("://", 1)[1].split("/", 1)[0]
    userinfo = authority.rpartition("@")[0]
    if ":" in userinfo and not _PLACEHOLDER.fullmatch(userinfo.split(":", 1)[1]):
        raise SpecError(f"{where}: holds a password; write it as ${{VAR}} (from the environment) or use "
                        f"PGPASSWORD / ~/.pgpass, or set {STORAGE_ENV}")


def expand(url: str, environ: dict | None = None) -> str:
    """Replace ${VAR} placeholders from the environment (SpecError naming a missing one)."""
    environ = os.environ if environ is None else environ

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in environ:
            raise SpecError(f"storage: environment variable {name} is not set")
        return environ[name]

    return _PLACEHOLDER.sub(value, url)


def storage_template(spec: StudySpec, root: Path, environ: dict | None = None) -> str:
    """The study's storage URL, placeholders kept: $RNN_SWEEP_STORAGE, else the file's, else an
    SQLite file sweeps/<name>.db. A relative SQLite path is taken from the project root."""
    environ = os.environ if environ is None else environ
    if environ.get(STORAGE_ENV):
        return "${" + STORAGE_ENV + "}"
    url = spec.storage or f"sqlite:///sweeps/{spec.name}.db"
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{(root / url[len('sqlite:///'):]).as_posix()}"
    return url


def grid_points(spec: StudySpec) -> list[dict]:
    """Every combination of the choices, keys in file order: {param name: value} each. In file order,
    or shuffled by the study's seed: a pruner judges each trial against the ones run before it, and
    a grid whose first axis is sorted (say, learning rates rising) would show it the worst first."""
    searched = spec.searched
    points = [dict(zip((p.name for p in searched), combo)) for combo in itertools.product(*(p.choices for p in searched))]
    if spec.order == "shuffled":
        random.Random(spec.seed or 0).shuffle(points)
    return points


def format_value(value: Any) -> str:
    """A value as `-S key=value` reads it (Hydra's override grammar: YAML-like flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return str(value)


def overrides(spec: StudySpec, values: dict) -> list[str]:
    """The `-S` strings of one trial: its searched values (by param name) and the fixed ones."""
    return [p.key if p.key.startswith("~") else f"{p.key}={format_value(p.value if p.kind == 'fixed' else values[p.name])}"
            for p in spec.params]


def check_not_overridden(spec: StudySpec, params: dict, where: str = "study") -> None:
    """Refuse a `train.<key>` the study sets for every cell while a cell it trains has its own
    `train.overrides.<cell>.<key>` in `params` (params.yaml): the override would win in every trial,
    so the study would vary, or fix, nothing for that cell."""
    train = params.get("train") or {}
    deleted = {p.name for p in spec.params if p.key.startswith("~")}
    cells = {p.name: p.value for p in spec.fixed}.get("train.cells", train.get("cells") or [])
    for p in spec.params:
        parts = p.name.split(".")
        if p.key.startswith("~") or parts[0] != "train" or len(parts) < 2:
            continue
        for cell in cells if isinstance(cells, list) else []:
            path, node = f"train.overrides.{cell}", (train.get("overrides") or {}).get(cell)
            for part in parts[1:]:
                if path in deleted or not isinstance(node, dict) or part not in node:
                    break
                path, node = f"{path}.{part}", node[part]
            else:
                if path not in deleted:
                    raise SpecError(f"{where}: params.{p.key}: params.yaml's {path} = {node!r} sets it again "
                                    f"for the {cell} cell in every trial: set {path} instead, or delete the "
                                    f"override with `~{path}: null`")


def _no_unknown(mapping: dict, known: set, where: str) -> None:
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known)) or 'none'})")
