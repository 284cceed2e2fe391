"""Every setting in params.yaml: one schema per section, the per-cell merge, and one hash.

    params = settings.load()                    # the whole file, every section checked
    params["prepare"]["max_len"]                # a section with its defaults filled in
    settings.cell_settings(params, "lstm")      # `train` with `train.overrides.lstm` on top
    settings.run_hash(params, "lstm")           # what decides the lstm run, as one sha256

Each stage reads its settings through `load`, so a typo or an out-of-range value anywhere in the
file fails before any work, with one line naming the file, the dotted key and the value. The
defaults below are those of params.yaml.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rnn.errors import InputError

# The choices rnn/ accepts, written out rather than imported: importing rnn.model here would make
# every stage load (and, in dvc.yaml, depend on) the whole package. tests/test_settings.py holds
# them equal to rnn's own.
CELLS = ("rnn", "gru", "lstm")
POOLINGS = ("last", "mean", "max", "concat")
CLIP_MODES = ("none", "value", "norm")
OPTIMIZERS = ("sgd", "adam", "adamw")
PROBE_VARIANTS = ("signal", "order")
TRUNCATE_MODES = ("head", "tail", "both")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}      # gate blocks per cell: parameter and activation sizes
MAX_LEN = 10_000                # tokens per review, = rnn.text.MAX_LEN (IMDB's longest: ~2,500)
# What one process may build: a typo such as hidden_size: 1000000 is refused in one line instead of
# a MemoryError after DVC removed the outputs. Training holds ~16 bytes per parameter (weights,
# gradient, two Adam moments) and ~4 bytes per cached activation value.
MAX_PARAMETERS = 100_000_000    # default classifiers: 2.1 M (the embedding 2.0 M); language models 4.7 M
MAX_ACTIVATIONS = 500_000_000   # values cached per training step; defaults: 20 M (lstm)


class ParamsError(InputError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Field:
    """Schema of one key. `type` may be a tuple of types. bool is never accepted for int/float (YAML
    `yes` would silently become 1); an int is accepted for a float and converted. A default of None
    makes the key nullable."""

    type: type | tuple
    default: object = REQUIRED
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    check: Callable[[Any], str | None] | None = None    # returns why a value is bad, or None


def did_you_mean(word: object, options, prefix: str = "") -> str:
    """' (did you mean <prefix><option>?)' for the option closest to `word` (case aside), else ''."""
    options = [str(o) for o in options]
    lowered = {o.lower(): o for o in options}
    hint = difflib.get_close_matches(str(word).lower(), list(lowered), n=1)
    return f" (did you mean {prefix}{lowered[hint[0]]}?)" if hint else ""


# ------------------------------------------------------------------------------------ schemas
def _positive_ints_increasing(v: list) -> str | None:
    ok = all(isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in v)
    return None if ok and all(b > a for a, b in zip(v, v[1:])) else "must be strictly increasing positive integers"


def _distinct_ints(v: list) -> str | None:
    ok = v and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    return None if ok and len(set(v)) == len(v) else "must be distinct integers >= 0"


def _cell_list(v: list) -> str | None:
    if not v:
        return "must list at least one of " + ", ".join(CELLS)
    for cell in v:
        if cell not in CELLS:
            return f"unknown cell {cell!r}{did_you_mean(cell, CELLS)}; allowed: " + ", ".join(CELLS)
    return "lists a cell twice" if len(set(v)) != len(v) else None


def _workers(v: int | str) -> str | None:
    if v == "auto" or (isinstance(v, int) and v >= 1):
        return None
    return "must be an integer >= 1 or auto"


def _url(v: str) -> str | None:
    return None if re.match(r"^(https?|ftp|file)://\S+$", v) else "must be an http(s), ftp or file URL"


def _md5(v: str) -> str | None:
    return None if re.fullmatch(r"[0-9a-fA-F]{32}", v) else "must be 32 hexadecimal digits"


DATA = {
    "url": Field(str, "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz", check=_url),
    "md5": Field(str, "7c2ac02c03563afcf9b574c7e56c153a", check=_md5),
    "limit": Field(int, None, min=1),
    "retries": Field(int, 3, min=0),
    "timeout": Field(float, 60.0, min=0, min_exclusive=True),
}
PREPARE = {
    "max_len": Field(int, 400, min=1, max=MAX_LEN),
    "truncate": Field(str, "both", choices=TRUNCATE_MODES),
    "vocab_size": Field(int, 20000, min=2),
    "min_freq": Field(int, 2, min=1),
    "val_fraction": Field(float, 0.1, min=0, max=0.5, min_exclusive=True),
    "seed": Field(int, 0, min=0),
}
EMBED = {
    "method": Field(str, "svd", choices=("random", "pretrained", "svd")),
    "path": Field(str, None),
    "scale": Field(float, None, min=0, min_exclusive=True),
    "seed": Field(int, 0, min=0),
    "context_size": Field(int, 10000, min=2),
    "window": Field(int, 5, min=1),
}
# The settings one cell trains with; `train.overrides.<cell>` may set any of them.
CELL_KNOBS = {
    "epochs": Field(int, 5, min=1),
    "batch_size": Field(int, 64, min=1),
    "lr": Field(float, 0.002, min=0, min_exclusive=True),
    "lr_decay": Field(float, 0.5, min=0, max=1, min_exclusive=True),
    "optimizer": Field(str, "adam", choices=OPTIMIZERS),
    "weight_decay": Field(float, 0.0, min=0),
    "momentum": Field(float, 0.9, min=0, max=0.999),
    "hidden_size": Field(int, 128, min=1),
    "embed_dim": Field(int, 100, min=1),
    "num_layers": Field(int, 1, min=1),
    "bidirectional": Field(bool, False),
    "dropout": Field(float, 0.5, min=0, max=0.95),
    "embed_dropout": Field(float, 0.0, min=0, max=0.95),
    "pooling": Field(str, "concat", choices=POOLINGS),
    "reset_after": Field(bool, False),
    "forget_bias": Field(float, 1.0),
    "freeze_embedding": Field(bool, False),
    "init": Field(str, "lm", choices=("lm", "embeddings")),
    "pretrained_lr_scale": Field(float, 1.0, min=0, max=1, min_exclusive=True),
    "clip": {
        "mode": Field(str, "norm", choices=CLIP_MODES),
        "threshold": Field(float, 5.0, min=0, min_exclusive=True),
    },
    "patience": Field(int, 2, min=0),
    "trace": Field(bool, True),
    "trace_every": Field(int, 1, min=1),
    "seed": Field(int, 0, min=0),
}
TRAIN = {
    "cells": Field(list, list(CELLS), check=_cell_list),
    "workers": Field((int, str), "auto", check=_workers),
    **CELL_KNOBS,
    "overrides": {cell: CELL_KNOBS for cell in CELLS},
}
PRETRAIN = {
    "epochs": Field(int, 1, min=1),
    "batch_size": Field(int, 32, min=1),
    "lr": Field(float, 0.005, min=0, min_exclusive=True),
    "lr_decay": Field(float, 0.5, min=0, max=1, min_exclusive=True),
    "optimizer": Field(str, "adam", choices=OPTIMIZERS),
    "num_sampled": Field(int, 1024, min=1),
    "dropout": Field(float, 0.1, min=0, max=0.95),
    "embed_dropout": Field(float, 0.0, min=0, max=0.95),
    "clip": {
        "mode": Field(str, "norm", choices=CLIP_MODES),
        "threshold": Field(float, 5.0, min=0, min_exclusive=True),
    },
    "tokens_per_epoch": Field(int, None, min=1),
    "val_reviews": Field(int, 500, min=1),
    "seed": Field(int, 0, min=0),
}
EVALUATE = {
    "batch_size": Field(int, 256, min=1),
    "threshold": Field(float, 0.5, min=0, max=1),
    "length_edges": Field(list, [100, 200, 400], check=_positive_ints_increasing),
    "roc_points": Field(int, 200, min=2),
}
PROBE = {
    "cells": Field(list, list(CELLS), check=_cell_list),
    "distances": Field(list, [5, 10, 25, 50, 100, 200], check=_distinct_ints),
    "lead": Field(int, 20, min=0),
    "train_distance": Field(str, "upto", choices=("exact", "upto")),
    "variant": Field(str, "signal", choices=PROBE_VARIANTS),
    "distractors": Field(int, 0, min=0),
    "vocab_size": Field(int, 20, min=7),
    "embed_dim": Field(int, 16, min=1),
    "hidden_size": Field(int, 32, min=1),
    "batch_size": Field(int, 64, min=1),
    "steps": Field(int, 300, min=1),
    "test_size": Field(int, 1000, min=2),
    "optimizer": Field(str, "adam", choices=OPTIMIZERS),
    "lr": Field(float, 0.01, min=0, min_exclusive=True),
    "clip_mode": Field(str, "norm", choices=CLIP_MODES),
    "clip_threshold": Field(float, 1.0, min=0, min_exclusive=True),
    "trace_steps": Field(int, 20, min=1),
    "seed": Field(int, 0, min=0),
}
MLFLOW = {
    "enabled": Field(bool, True),
    "experiment": Field(str, "imdb-sentiment"),
    "probe_experiment": Field(str, "memory-probe"),
    "pretrain_experiment": Field(str, "language-models"),
    "log_every_steps": Field(int, 200, min=1),
    "system_metrics_every": Field(float, 10.0, min=0),
    "register": Field(bool, False),
}
# The NBSVM baseline (stages/baseline.py): chosen on validation accuracy.
BASELINE = {
    "ngram_max": Field(int, 2, min=1, max=3),
    "min_df": Field(int, 2, min=1),
    "max_features": Field(int, None, min=1),
    "alpha": Field(float, 1.0, min=0, min_exclusive=True),
    "C": Field(float, 1.0, min=0, min_exclusive=True),
    "beta": Field(float, 0.5, min=0, max=1),
    "seed": Field(int, 0, min=0),
}
SECTIONS = {"data": DATA, "prepare": PREPARE, "embed": EMBED, "pretrain": PRETRAIN, "train": TRAIN,
            "evaluate": EVALUATE, "probe": PROBE, "baseline": BASELINE, "mlflow": MLFLOW}


def _cross_checks(params: dict, source: str) -> None:
    """Constraints between keys, checked once every section is valid on its own."""
    probe = params["probe"]
    earlier = probe["distractors"] if probe["variant"] == "signal" else 1
    if probe["lead"] < earlier:
        raise ParamsError(f"{source}: probe.lead = {probe['lead']}: must be >= {earlier}, the tokens placed "
                          f"before the decisive one (variant {probe['variant']}, distractors {probe['distractors']})")
    if probe["trace_steps"] > probe["steps"]:
        raise ParamsError(f"{source}: probe.trace_steps = {probe['trace_steps']}: must be <= probe.steps")
    probe["distances"] = sorted(probe["distances"])
    train = params["train"]
    for cell, over in train["overrides"].items():
        if over and cell not in train["cells"]:
            raise ParamsError(f"{source}: train.overrides.{cell} is set but {cell} is not in train.cells "
                              f"{train['cells']}: it would never be used (add the cell or remove the override)")
        if over.get("embed_dim", train["embed_dim"]) != train["embed_dim"]:
            raise ParamsError(f"{source}: train.overrides.{cell}.embed_dim = {over['embed_dim']}: must equal "
                              f"train.embed_dim = {train['embed_dim']}, the width of the embed stage's vectors")
    for cell in train["cells"]:
        cfg = cell_settings(params, cell)
        if cfg["init"] == "lm" and cfg["bidirectional"]:
            where = f"train.overrides.{cell}" if "bidirectional" in train["overrides"].get(cell, {}) else "train"
            raise ParamsError(f"{source}: {where}.bidirectional = true: needs train.init = embeddings "
                              "(the pretrained language model reads left to right only)")
        _check_size(source, f"train ({cell})", cell, params["prepare"]["vocab_size"], cfg["embed_dim"],
                    cfg["hidden_size"], cfg["num_layers"], cfg["bidirectional"], cfg["batch_size"],
                    params["prepare"]["max_len"], "prepare.vocab_size", "prepare.max_len")
    for cell in probe["cells"]:
        _check_size(source, f"probe ({cell})", cell, probe["vocab_size"], probe["embed_dim"], probe["hidden_size"],
                    1, False, probe["batch_size"], probe["distances"][-1] + 1 + probe["lead"],
                    "probe.vocab_size", "the longest probe sequence")


def model_size(cell: str, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int,
               bidirectional: bool) -> int:
    """Parameters of the encoder (embedding and recurrent layers) with a one-logit head: the order of
    magnitude the limit needs. Not counted: concat pooling's wider head (3x), GRU's reset_after (H per
    layer) and a language model's output layer (vocab_size x (H + 1))."""
    G, H, dirs = GATES[cell], hidden_size, 2 if bidirectional else 1
    recurrent = sum(dirs * G * H * ((embed_dim if k == 0 else dirs * H) + H + 1) for k in range(num_layers))
    return vocab_size * embed_dim + recurrent + dirs * H + 1


def _check_size(source: str, where: str, cell: str, vocab_size: int, embed_dim: int, hidden_size: int,
                num_layers: int, bidirectional: bool, batch_size: int, length: int, vocab_key: str,
                length_key: str) -> None:
    n = model_size(cell, vocab_size, embed_dim, hidden_size, num_layers, bidirectional)
    sizes = (f"{vocab_key} {vocab_size}, embed_dim {embed_dim}, hidden_size {hidden_size}, "
             f"num_layers {num_layers}")
    if n > MAX_PARAMETERS:
        raise ParamsError(f"{source}: {where}: {sizes}: the model would have {n:.3g} parameters, more than "
                          f"the {MAX_PARAMETERS:.0e} one process may train")
    cached = batch_size * length * (GATES[cell] + 2) * hidden_size * num_layers * (2 if bidirectional else 1)
    if cached > MAX_ACTIVATIONS:
        raise ParamsError(f"{source}: {where}: batch_size {batch_size} x {length_key} {length} x hidden_size "
                          f"{hidden_size} x num_layers {num_layers}: a training step would cache {cached:.3g} "
                          f"values, more than {MAX_ACTIVATIONS:.0e}")


# ------------------------------------------------------------------------------------ loading
class Params(dict):
    """The validated params: {section: {key: value}}, remembering the file it came from."""

    source: str = "params.yaml"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)
for _ch in "-+0123456789":       # integers must keep winning over the float resolver above
    _Loader.yaml_implicit_resolvers[_ch] = sorted(
        _Loader.yaml_implicit_resolvers[_ch], key=lambda r: r[0] != "tag:yaml.org,2002:int")


def read_yaml(path: str | Path) -> dict:
    """The params file as a plain mapping, unvalidated; one-line error if it is unusable."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ParamsError(f"{path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole params file (see `validate`)."""
    return validate(read_yaml(path), Path(path).name)


def validate(raw: dict, source: str = "params.yaml") -> Params:
    """Every section checked against its schema, defaults filled in; unknown sections refused.
    Keeps `train.overrides` as written (see `cell_settings`)."""
    for name in raw:
        if name not in SECTIONS:
            raise ParamsError(f"{source}: unknown section {name}{did_you_mean(name, SECTIONS)}")
    params = Params({name: _validate(_mapping(raw.get(name), name, source), schema, name, source)
                     for name, schema in SECTIONS.items()})
    params.source = source
    params["train"]["overrides"] = {cell: _given(params["train"]["overrides"][cell], over)
                                    for cell, over in _mapping(raw.get("train"), "train", source)
                                    .get("overrides", {}).items() if over}
    _cross_checks(params, source)
    return params


def _mapping(value: object, key: str, source: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParamsError(f"{source}: {key} = {_fmt(value)}: must be a mapping")
    return value


def _validate(values: dict, schema: dict, prefix: str, source: str) -> dict:
    for key in values:
        if key not in schema:
            raise ParamsError(f"{source}: unknown key {prefix}.{key}{did_you_mean(key, schema, prefix + '.')}")
    out: dict = {}
    for key, spec in schema.items():
        full = f"{prefix}.{key}"
        if isinstance(spec, dict):
            out[key] = _validate(_mapping(values.get(key), full, source), spec, full, source)
        elif key in values:
            out[key] = _check(values[key], spec, full, source)
        elif spec.default is REQUIRED:
            raise ParamsError(f"{source}: missing required key {full}")
        else:
            out[key] = copy.deepcopy(spec.default)
    return out


def _given(validated: dict, raw: dict) -> dict:
    """The part of a validated override the user wrote (not the defaults the schema filled in)."""
    return {key: _given(validated[key], value or {}) if isinstance(validated[key], dict) else validated[key]
            for key, value in raw.items()}


def _fmt(value: object) -> str:
    """A value as it would look in YAML, strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


_TYPE_NAMES = {float: "a number", int: "an integer", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping"}


def _check(value: object, field: Field, key: str, source: str) -> object:
    written = value

    def fail(why: str) -> ParamsError:
        return ParamsError(f"{source}: {key} = {_fmt(written)}: {why}")

    if value is None and field.default is None:
        return None
    types = field.type if isinstance(field.type, tuple) else (field.type,)
    for t in types:
        if t in (int, float) and isinstance(value, bool):
            continue
        if t is float and isinstance(value, (int, float)):
            value = float(value)
            break
        if isinstance(value, t):
            break
    else:
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise fail(f"must be {names}" + (" or null" if field.default is None else ""))
    if field.choices is not None and value not in field.choices:
        raise fail("must be one of " + ", ".join(str(c) for c in field.choices) + did_you_mean(value, field.choices))
    if field.min is not None and not (value > field.min if field.min_exclusive else value >= field.min):
        raise fail(f"must be {'>' if field.min_exclusive else '>='} {field.min:g}")
    if field.max is not None and not value <= field.max:
        raise fail(f"must be <= {field.max:g}")
    if field.check is not None and (why := field.check(value)):
        raise fail(why)
    return value


# ---------------------------------------------------------------------------- cells and hashes
def cell_argument(argv: list[str]) -> str:
    """The cell a per-cell stage was started for (`python -m stages.<name> <cell>`), checked."""
    if len(argv) != 2:
        name = Path(argv[0]).stem if argv else "<stage>"
        raise ParamsError(f"usage: python -m stages.{name} <cell>  (cell: {' | '.join(CELLS)})")
    return check_cell(argv[1])


def check_cell(cell: str, cells: tuple | list = CELLS) -> str:
    """`cell` if it is one of `cells`, else a one-line ParamsError with a suggestion."""
    if cell not in cells:
        raise ParamsError(f"unknown cell {cell!r}{did_you_mean(cell, cells)}: expected one of {', '.join(cells)}")
    return cell


def cell_settings(params: Params, cell: str) -> dict:
    """The settings `cell` trains with: the `train` knobs with `train.overrides.<cell>` on top."""
    check_cell(cell)
    base = {key: params["train"][key] for key in CELL_KNOBS}
    return _merge(base, params["train"]["overrides"].get(cell, {}))


def _merge(base: dict, over: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return merged


# Sections that decide what a cell's training computes, besides its own settings.
RUN_SECTIONS = ("data", "prepare", "embed")
# The train settings that shape the encoder a language model hands to the classifier.
ARCHITECTURE = ("embed_dim", "hidden_size", "num_layers", "reset_after", "forget_bias")


def pretrain_settings(params: Params, cell: str) -> dict:
    """What `cell`'s language model is built and trained with: the `pretrain` section, and the
    architecture keys of the cell's train settings (so that its encoder fits the classifier)."""
    cfg = cell_settings(params, cell)
    return {**params["pretrain"], **{k: cfg[k] for k in ARCHITECTURE}}


def run_hash(params: Params, cell: str, stage: str = "train", workers: int | str | None = None) -> str:
    """sha256 of what decides the model `stage` (train or pretrain) trains for `cell`: the data,
    prepare and embed sections, the stage's settings for the cell (for train with init lm, the
    language model's too), and the number of workers (it changes the sums' rounding; default: the
    setting as written). Equal hash = same setup: the MLflow runs' `params_hash` tag and the
    checkpoint keys use it."""
    relevant = {s: params[s] for s in RUN_SECTIONS}
    relevant.update(cell=cell, stage=stage,
                    workers=params["train"]["workers"] if workers is None else workers)
    if stage == "pretrain":
        relevant["pretrain"] = pretrain_settings(params, cell)
    else:
        relevant["train"] = cfg = cell_settings(params, cell)
        if cfg["init"] == "lm":
            relevant["pretrain"] = pretrain_settings(params, cell)
    return digest(relevant)


def digest(obj: object) -> str:
    """sha256 hex of the canonical JSON of `obj`."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
