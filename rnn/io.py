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
from pathlib import Path

import numpy as np

from .errors import InputError
from .lm import LanguageModel
from .model import ModelConfig, SentimentModel, parameter_shapes

WEIGHTS, CONFIG, ENCODER = "weights.npz", "config.json", "encoder.json"


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


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file; object arrays (which would need pickle) are refused."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None


def save_model(folder: str | Path, model: SentimentModel | LanguageModel, encoder: dict | None = None,
               metadata: dict | None = None) -> None:
    """Write the model folder; each file appears whole or not at all."""
    folder = Path(folder)
    save_arrays(folder / WEIGHTS, model.params)
    write_json(folder / CONFIG, {"model": model.config.to_dict(), "metadata": metadata or {}})
    if encoder is not None:
        write_json(folder / ENCODER, encoder)


def read_model(folder: str | Path) -> tuple[SentimentModel | LanguageModel, dict | None, dict]:
    """Read a model folder. Returns (model, encoder dict or None, metadata).

    A missing file, an unknown cell, missing arrays or wrong shapes raise InputError naming them."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise InputError(f"{folder}: no {name}: not a model folder")
    try:
        meta = json.loads((folder / CONFIG).read_text())
        config = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{folder / CONFIG}: bad model config: {e}") from None
    arrays = load_arrays(folder / WEIGHTS)
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise InputError(f"{folder / WEIGHTS}: missing arrays {', '.join(missing)}")
    for name, shape in expected.items():
        if arrays[name].dtype.kind not in "fiu":
            raise InputError(f"{folder / WEIGHTS}: {name} has dtype {arrays[name].dtype}, not numbers")
        if arrays[name].shape != shape:
            raise InputError(f"{folder / WEIGHTS}: {name} has shape {arrays[name].shape}, "
                             f"config says {shape}")
    params = {k: np.ascontiguousarray(arrays[k], dtype=config.dtype) for k in expected}
    encoder = None
    if (folder / ENCODER).is_file():
        try:
            encoder = json.loads((folder / ENCODER).read_text())
        except ValueError as e:
            raise InputError(f"{folder / ENCODER}: not valid JSON ({e})") from None
    model_class = LanguageModel if config.task == "language_model" else SentimentModel
    return model_class(config, params), encoder, meta.get("metadata", {})
