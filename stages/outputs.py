"""The files the stages hand to each other: prepared splits and vocabulary, per-epoch history and
the gradient trace.

The two tables have one schema each, used by every writer and reader (train, MLflow logging, compare):

    history.csv     epoch, lr, train_loss, train_accuracy, val_loss, val_accuracy, seconds, ...
    grad_trace.csv  epoch, distance, state, grad_norm, log10_grad_norm   (long: one row per point)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rnn.errors import InputError

HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds",
                   "tokens_per_s", "grad_norm_mean", "grad_norm_max", "clipped_fraction")
TRACE_COLUMNS = ("epoch", "distance", "state", "grad_norm", "log10_grad_norm")


def csv_text(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def history_csv(history: list[dict]) -> str:
    """One row per epoch of rnn.train.fit's records, columns HISTORY_COLUMNS."""
    return csv_text(HISTORY_COLUMNS, ([record[c] for c in HISTORY_COLUMNS] for record in history))


def trace_rows(traces: list[dict] | dict[int, dict]) -> list[tuple]:
    """Rows (epoch, distance, state, grad_norm, log10_grad_norm) of fit's per-epoch traces.

    traces: per epoch (a list from epoch 1, or {epoch: trace}) {state "a" | "c": [mean norm at
    distance d from the last token, or None]}.
    Distances no sequence reached (None) are skipped; a norm flushed to exactly 0 is kept, with an
    empty log10.
    """
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


def read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the {stage} stage first)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def read_csv(path: Path, stage: str, columns: Iterable[str] = ()) -> list[dict]:
    """The rows of a CSV file as dicts; one-line errors for a missing file or missing columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the {stage} stage first)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing columns {', '.join(missing)}")
        return list(reader)


def load_arrays(path: Path, stage: str, required: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays of a stage's .npz output, with one-line errors for a missing, unreadable or
    incomplete file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the {stage} stage first)")
    try:
        with np.load(path, allow_pickle=False) as npz:       # never pickle: a file cannot run code
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    missing = set(required) - set(arrays)
    if missing:
        raise InputError(f"{path}: missing arrays {', '.join(sorted(missing))}")
    return arrays


def load_split(path: Path) -> dict[str, np.ndarray]:
    """A prepared split (data/prepared/<split>.npz): ids (N, T), lengths (N,), labels (N,), ..."""
    arrays = load_arrays(path, "prepare", ("ids", "lengths", "labels"))
    if len(arrays["labels"]) == 0:
        raise InputError(f"{path}: no examples")
    return arrays


def load_vocab(path: Path) -> dict:
    """The encoder dict of data/prepared/vocab.json: {tokens, max_len, truncate}."""
    encoder = read_json(path, "prepare")
    if not isinstance(encoder, dict) or not isinstance(encoder.get("tokens"), list):
        raise InputError(f"{path}: not a valid vocabulary file (no token list)")
    return encoder


def file_digest(path: Path) -> str:
    """sha256 hex of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# data/vectors.json: the pretrained vectors file (embed.path) by content, written by the check stage
# on every `dvc repro` and a dependency of the embed stage, so that new vectors in the same file
# rerun it: {"pretrained": {"sha256", "size"}}, or {"pretrained": null} for the other methods.
VECTORS = "data/vectors.json"


def describe_vectors(path: Path | None) -> dict:
    return {"pretrained": None if path is None else {"sha256": file_digest(path), "size": path.stat().st_size}}


def check_model_fits_data(model_folder: Path, encoder: dict | None, vocab_path: Path) -> None:
    """A model and prepared data pair up only if the model's encoder.json is the vocab.json the data
    was encoded with: token ids from another vocabulary give a wrong accuracy, or an IndexError."""
    vocab = load_vocab(vocab_path)
    mine = model_folder / "encoder.json"
    if encoder is None:
        raise InputError(f"{mine}: missing, so the model cannot be matched with {vocab_path}; retrain it")
    if encoder == vocab:
        return
    a, b = encoder.get("tokens") or [], vocab["tokens"]
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        why = f"vocabularies of {len(a)} and {len(b)} tokens, first different at id {first}"
    else:
        why = ", ".join(f"{k} {encoder.get(k)!r} vs {vocab.get(k)!r}" for k in sorted(set(encoder) | set(vocab))
                        if encoder.get(k) != vocab.get(k))
    raise InputError(f"{mine} and {vocab_path} differ ({why}): the model was trained on other prepared "
                     "data; retrain it (dvc repro)")
