"""Shared glue for pipeline stages: params validation, atomic writes, error exit.

Every stage reads its section of params.yaml through `validate_section`, so a
typo or an out-of-range value fails before any work with one line naming the
file, the dotted key and the value. Outputs go through `atomic_path`, so an
interrupted or failing stage never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml


class ParamsError(ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Field:
    """Schema of one params key.

    `type` may be a tuple of types. bool is never accepted for int/float
    (YAML `yes` would otherwise silently become 1); int is accepted for float
    and converted. A default of None makes the key nullable implicitly.
    """

    type: type | tuple
    default: object = REQUIRED
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    nullable: bool = False
    min_exclusive: bool = False


Schema = dict[str, "Field | Schema"]

_TYPE_NAMES = {
    float: "a number",
    int: "an integer",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
}


class _Params(dict):
    """A dict that remembers which file it came from, for error messages."""

    source: str = "params.yaml"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)
# Integers must keep winning over the float resolver added above.
for _ch in "-+0123456789":
    _Loader.yaml_implicit_resolvers[_ch] = sorted(
        _Loader.yaml_implicit_resolvers[_ch], key=lambda r: r[0] != "tag:yaml.org,2002:int"
    )


def load_params(path: str | Path = "params.yaml") -> dict:
    """Load the whole params file as a mapping; one-line error if unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    params = _Params(data)
    params.source = path.name
    return params


def _fmt(value: object) -> str:
    """Render a value the way it would look in YAML, strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _type_ok(value: object, types: tuple) -> tuple[bool, object]:
    """Check `value` against the allowed types, returning (ok, converted value)."""
    for t in types:
        if t in (int, float) and isinstance(value, bool):
            continue
        if t is float and isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, t):
            return True, value
    return False, value


def _check(value: object, field: Field, key: str, source: str) -> object:
    def fail(why: str) -> ParamsError:
        return ParamsError(f"{source}: {key} = {_fmt(value)}: {why}")

    if value is None:
        if field.nullable or field.default is None:
            return None
    types = field.type if isinstance(field.type, tuple) else (field.type,)
    ok, value_conv = _type_ok(value, types)
    if not ok:
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        if field.nullable or field.default is None:
            names += " or null"
        raise fail(f"must be {names}")
    if field.choices is not None and value_conv not in field.choices:
        raise fail("must be one of " + ", ".join(str(c) for c in field.choices))
    if field.min is not None:
        if field.min_exclusive and not value_conv > field.min:
            raise fail(f"must be > {field.min:g}")
        if not field.min_exclusive and not value_conv >= field.min:
            raise fail(f"must be >= {field.min:g}")
    if field.max is not None and not value_conv <= field.max:
        raise fail(f"must be <= {field.max:g}")
    return value_conv


def _validate(values: dict, schema: dict, prefix: str, source: str) -> dict:
    out: dict = {}
    for key in values:
        if key not in schema:
            full = f"{prefix}.{key}"
            hint = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            suffix = f" (did you mean {prefix}.{hint[0]}?)" if hint else ""
            raise ParamsError(f"{source}: unknown key {full}{suffix}")
    for key, spec in schema.items():
        full = f"{prefix}.{key}"
        if isinstance(spec, dict):
            sub = values.get(key, {})
            if sub is None:
                sub = {}
            if not isinstance(sub, dict):
                raise ParamsError(f"{source}: {full} = {_fmt(sub)}: must be a mapping")
            out[key] = _validate(sub, spec, full, source)
        elif key in values:
            out[key] = _check(values[key], spec, full, source)
        elif spec.default is REQUIRED:
            raise ParamsError(f"{source}: missing required key {full}")
        else:
            out[key] = spec.default
    return out


def _has_required(schema: dict) -> bool:
    return any(
        _has_required(s) if isinstance(s, dict) else s.default is REQUIRED for s in schema.values()
    )


def validate_section(params: dict, section: str, schema: dict[str, Field | dict]) -> dict:
    """Return `params[section]` checked against `schema`, with defaults filled in.

    A missing section is fine when every key has a default.
    """
    source = getattr(params, "source", "params.yaml")
    values = params.get(section)
    if values is None:
        if section not in params and _has_required(schema):
            raise ParamsError(f"{source}: missing section {section}")
        values = {}
    if not isinstance(values, dict):
        raise ParamsError(f"{source}: {section} = {_fmt(values)}: must be a mapping")
    return _validate(values, schema, section, source)


def get_param(params: dict, key: str, field: Field) -> Any:
    """Validate one dotted key (e.g. `train.embed_dim`) owned by another stage's section."""
    source = getattr(params, "source", "params.yaml")
    node: Any = params
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            node = {}
    if not isinstance(node, dict):
        raise ParamsError(f"{source}: {'.'.join(parts[:-1])} must be a mapping")
    if parts[-1] not in node:
        if field.default is REQUIRED:
            raise ParamsError(f"{source}: missing required key {key}")
        return field.default
    return _check(node[parts[-1]], field, key, source)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); bad input exits 2 with one `error:` line, no traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as exc:  # ParamsError and FileNotFoundError included
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:          # on disk before the rename, or a crash could keep
            os.fsync(f.fileno())             # the new name with the old (empty) contents
        os.replace(tmp, path)
    finally:
        # On success the temp was renamed away; on failure don't leave it behind.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    # A file object stops np.savez from appending ".npz" to the temp name.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_parquet(path: str | Path, df: Any) -> None:
    """Write a pandas DataFrame as parquet (no index) atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def project_root() -> Path:
    """The nearest directory upward from cwd holding params.yaml: where a stage reads and writes.

    Not `DVC_ROOT`: in a queued or temp experiment DVC runs the stage in a copy of the repository
    under .dvc/tmp/exps/ but points DVC_ROOT at the original, so outputs written there would miss
    the copy. Only what must outlive the copy (the MLflow store) belongs under DVC_ROOT.
    """
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "params.yaml").is_file():
            return d
    raise FileNotFoundError(f"params.yaml not found in {cwd} or any parent directory")
