"""Saving and loading models and checkpoints: NumPy `.npz` arrays plus JSON, never pickle.

A model folder holds `weights.npz` (the flat parameter dict), `config.json` (the `ModelConfig`) and,
when the model was trained on text, `encoder.json` (vocabulary and truncation settings), so that it
can be copied elsewhere and used on its own.
"""
from __future__ import annotations

import json
import os
import zipfile
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import numpy as np

from .errors import InputError
from .npz import load_arrays
from .lm import LanguageModel
from .config import ModelConfig
from .model import SentimentModel, parameter_shapes

WEIGHTS, CONFIG, ENCODER = "weights.npz", "config.json", "encoder.json"
MAX_PARAMETERS = 1 << 30     # 4 GiB of float32: a config.json promising more is refused before loading


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb"):
    """Open a temporary file next to `path` and rename it onto `path` when the block succeeds, so
    that a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, str(tmp)):      # a full disk: name the file, not the temporary
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2)


# np.savez stamps each member with the current time; a fixed stamp makes equal arrays equal bytes,
# so an unchanged model keeps its DVC hash and is stored once.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def save_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz (what np.savez writes) whose bytes depend only on the arrays."""
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def save_model(folder: str | Path, model: SentimentModel | LanguageModel, encoder: dict | None = None,
               metadata: dict | None = None) -> None:
    """Write the model folder; each file appears whole or not at all."""
    folder = Path(folder)
    save_arrays(folder / WEIGHTS, model.params)
    write_json(folder / CONFIG, {"model": model.config.to_dict(), "metadata": metadata or {}})
    if encoder is not None:
        write_json(folder / ENCODER, encoder)


_JSON_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"),
               "bool": ((bool,), "true or false"), "str": ((str,), "a string")}


def _check_config_types(d: dict) -> None:
    """Each key of a model config has its field's JSON type (true is not a number), so that a
    hand-edited config.json fails naming the key rather than deep inside the model."""
    for field in fields(ModelConfig):
        if field.name in d and field.type in _JSON_TYPES:
            value, (types, name) = d[field.name], _JSON_TYPES[field.type]
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise ValueError(f"{field.name} = {json.dumps(value)}: must be {name}")


def read_model(folder: str | Path) -> tuple[SentimentModel | LanguageModel, dict | None, dict]:
    """Read a model folder. Returns (model, encoder dict or None, metadata).

    A missing file, an unknown cell, missing arrays or wrong shapes raise InputError naming them."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise InputError(f"{folder}: no {name}: not a model folder")
    try:
        meta = json.loads((folder / CONFIG).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
            raise ValueError('no "model" mapping')
        _check_config_types(meta["model"])
        config = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{folder / CONFIG}: bad model config: {e}") from None
    expected = parameter_shapes(config)
    n = sum(int(np.prod(shape)) for shape in expected.values())
    if n > MAX_PARAMETERS:
        raise InputError(f"{folder / CONFIG}: the config describes {n:.3g} parameters, more than {MAX_PARAMETERS:.0e}")
    # A loose bound (float64 is 8 bytes): it only has to stop a compressed file of gigabytes of zeros.
    arrays = load_arrays(folder / WEIGHTS, max_bytes=16 * n + (1 << 20))
    missing = sorted(set(expected) - set(arrays))
    if missing:
        more = f" and {len(missing) - 5:,} more" if len(missing) > 5 else ""
        raise InputError(f"{folder / WEIGHTS}: missing arrays {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if arrays[name].dtype.kind not in "fiu":
            raise InputError(f"{folder / WEIGHTS}: {name} has dtype {arrays[name].dtype}, not numbers")
        if arrays[name].shape != shape:
            raise InputError(f"{folder / WEIGHTS}: {name} has shape {arrays[name].shape}, "
                             f"config says {shape}")
        bad = int(arrays[name].size - np.count_nonzero(np.isfinite(arrays[name])))
        if bad:
            raise InputError(f"{folder / WEIGHTS}: {name} holds {bad} NaN or infinite values")
    params = {k: np.ascontiguousarray(arrays[k], dtype=config.dtype) for k in expected}
    encoder = None
    if (folder / ENCODER).is_file():
        try:
            encoder = json.loads((folder / ENCODER).read_text())
        except ValueError as e:
            raise InputError(f"{folder / ENCODER}: not valid JSON ({e})") from None
    model_class = LanguageModel if config.task == "language_model" else SentimentModel
    return model_class(config, params), encoder, meta.get("metadata", {})
