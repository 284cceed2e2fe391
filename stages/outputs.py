"""The files the stages hand to each other: prepared splits and vocabulary, history.csv and
grad_trace.csv (one schema each, for every writer and reader), what the check stage describes for
other stages (data/source.json, data/vectors.json, data/lm/<cell>.json), and files by digest."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rnn.errors import InputError
from rnn.npz import load_arrays
from stages import settings

HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds",
                   "tokens_per_s", "grad_norm_mean", "grad_norm_max", "clipped_fraction")
TRACE_COLUMNS = ("epoch", "distance", "state", "grad_norm", "log10_grad_norm")


def csv_text(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def history_csv(history: list[dict], columns: Iterable[str] = HISTORY_COLUMNS) -> str:
    """One row per epoch of rnn.train.fit's records."""
    return csv_text(columns, ([record[c] for c in columns] for record in history))


def trace_rows(traces: list[dict] | dict[int, dict]) -> list[tuple]:
    """Rows (epoch, distance, state, grad_norm, log10_grad_norm) of fit's traces: per epoch (a list
    from epoch 1, or {epoch: trace}) {state "a" | "c": [mean norm at distance d, or None]}. None (a
    distance no sequence reached) is skipped; a norm flushed to 0 is kept, with an empty log10."""
    rows = []
    for epoch, states in (traces.items() if isinstance(traces, dict) else enumerate(traces, 1)):
        for state in sorted(states):
            for distance, norm in enumerate(states[state]):
                if norm is not None:
                    rows.append((epoch, distance, state, norm, math.log10(norm) if norm > 0 else ""))
    return rows


def trace_csv(rows: list[tuple]) -> str:
    return csv_text(TRACE_COLUMNS, rows)


def trace_series(rows: Iterable, epoch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{state: (distance (K,), norm (K,))} of one epoch, from `trace_rows` rows or `read_csv` dicts."""
    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        e, distance, state, norm = (row[c] for c in TRACE_COLUMNS[:4]) if isinstance(row, dict) else row[:4]
        if int(e) == epoch:
            d, n = out.setdefault(state, ([], []))
            d.append(int(distance))
            n.append(float(norm))
    return {s: (np.array(d), np.array(n)) for s, (d, n) in out.items()}


def last_epoch(rows: list) -> int:
    """The last epoch in trace rows (0 if there are none)."""
    return max((int(r["epoch"] if isinstance(r, dict) else r[0]) for r in rows), default=0)


def _exists(path: Path, stage: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the {stage} stage first)")
    return path


def read_json(path: Path, stage: str) -> dict:
    try:
        return json.loads(_exists(path, stage).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def read_csv(path: Path, stage: str, columns: Iterable[str] = ()) -> list[dict]:
    """The rows of a CSV file as dicts; one-line errors for a missing file or missing columns."""
    with open(_exists(path, stage), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing columns {', '.join(missing)}")
        return list(reader)


def read_npz(path: Path, stage: str, required: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays of a stage's .npz output; one-line errors for a missing, unreadable or incomplete file."""
    arrays = load_arrays(_exists(path, stage))
    if missing := set(required) - set(arrays):
        raise InputError(f"{path}: missing arrays {', '.join(sorted(missing))}")
    return arrays


def load_split(path: Path) -> dict[str, np.ndarray]:
    """A prepared split (data/prepared/<split>.npz): ids (N, T), lengths (N,), labels (N,), ..."""
    arrays = read_npz(path, "prepare", ("ids", "lengths", "labels"))
    if len(arrays["labels"]) == 0:
        raise InputError(f"{path}: no examples")
    return arrays


def load_vocab(path: Path) -> dict:
    """The encoder dict of data/prepared/vocab.json: {tokens, max_len, truncate}."""
    encoder = read_json(path, "prepare")
    if not isinstance(encoder, dict) or not isinstance(encoder.get("tokens"), list):
        raise InputError(f"{path}: not a valid vocabulary file (no token list)")
    return encoder


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (any hashlib algorithm)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def model_digest(folder: str | Path) -> str:
    """sha256 over a model folder's file names and bytes: the `model_digest` tag of the run that
    trained it. Equal folders give equal digests on any machine (after `dvc pull` too)."""
    folder = Path(folder)
    lines = [f"{f.relative_to(folder).as_posix()} {file_digest(f)}\n"
             for f in sorted(folder.rglob("*")) if f.is_file()]
    if not lines:
        raise FileNotFoundError(f"{folder}: no model files")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# The IMDB archive by content, written by the check stage on every `dvc repro` and read by the download
# stage: a different archive reruns the pipeline, the same one wherever it lies reruns nothing.
SOURCE = "data/source.json"
DOWNLOADED = "data/download/aclImdb_v1.tar.gz"   # the download stage's copy, kept once its md5 matched


def read_source(root: Path) -> dict:
    """data/source.json: {"archive": {sha256, size}} (the copy IMDB_ARCHIVE names) or {"url", "md5"}."""
    source = read_json(root / SOURCE, "check")
    if not isinstance(source, dict) or not (isinstance(source.get("archive"), dict) or "url" in source):
        raise InputError(f"{root / SOURCE}: names neither an archive nor a url; run the check stage again")
    return source


# The pretrained vectors file (embed.path) by content, written by the check stage on every `dvc repro`:
# new vectors in the same file rerun the embed stage. {"pretrained": {"sha256", "size"} or null}
VECTORS = "data/vectors.json"


def pretrained_vectors(root: Path, embed: dict) -> Path | None:
    """The file embed.path names (relative to the root) when embed.method is pretrained, else None."""
    if embed["method"] != "pretrained":
        return None
    if not embed["path"]:
        raise InputError("params.yaml: embed.path = null: required when embed.method is pretrained")
    path = root / embed["path"]
    if not path.is_file():
        raise FileNotFoundError(f"params.yaml: embed.path = {embed['path']!r}: {path}: no such file")
    return path


def describe_vectors(path: Path | None) -> dict:
    return {"pretrained": None if path is None else {"sha256": file_digest(path), "size": path.stat().st_size}}


# The shape of each cell's language model, written by the check stage on every `dvc repro`:
# pretrain@<cell> depends on it rather than on `train`, so only a change of its own shape reruns it.
LM_SHAPES = "data/lm"


def lm_shape(params: dict, cell: str) -> dict:
    cfg = settings.cell_settings(params, cell)
    return {k: cfg[k] for k in settings.ARCHITECTURE}
