"""Reading a .npz file safely: never pickle, a bound on what it unpacks to, one-line errors. NumPy and
the standard library only, so that code reading a stage's arrays need not import the models."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import InputError


def load_arrays(path: str | Path, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """All arrays of an .npz file; object arrays (which would need pickle) are refused, and so is a
    file whose arrays would unpack to more than `max_bytes` (a small compressed file can hold
    gigabytes of zeros)."""
    try:
        if not zipfile.is_zipfile(path):     # else NumPy's hint would be to allow pickle
            raise ValueError("not a zip archive")
        with zipfile.ZipFile(path) as z:
            unpacked = sum(info.file_size for info in z.infolist())
        if max_bytes is not None and unpacked > max_bytes:
            raise ValueError(f"its arrays unpack to {unpacked:,} bytes, more than the {max_bytes:,} expected")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None
