"""Test helpers usable without pytest fixtures (e.g. from a copied project)."""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rnn.lm import LanguageModel
from rnn.model import ModelConfig, SentimentModel

POSITIVE = ["great", "excellent", "loved", "wonderful", "brilliant", "superb", "enjoyed"]
NEGATIVE = ["awful", "boring", "terrible", "waste", "worst", "dull", "not good"]
FILLER = (
    "the movie film plot actor actress scene story director camera music it was "
    "and a of to in this that with as for on its his her they script ending"
).split()
SPLIT_DIRS = ("train/pos", "train/neg", "train/unsup", "test/pos", "test/neg")


TINY = {"vocab_size": 10, "embed_dim": 3, "hidden_size": 3}     # make_model's sizes unless given


def make_model(cell: str = "lstm", reset_after: bool = False, seed: int = 0, dtype="float64",
               biases: float = 0.0, **config) -> SentimentModel | LanguageModel:
    """A small model of ModelConfig(cell, reset_after, dtype, **config), TINY's sizes unless given:
    a SentimentModel, or a LanguageModel for task="language_model"; its parameters drawn from
    Generator(seed). With `biases` > 0 every bias is drawn from N(0, biases^2) after that: init
    leaves most biases at zero, where a mistake in a bias's gradient or layout would not show."""
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(**{**TINY, "cell": cell, "reset_after": reset_after, "dtype": np.dtype(dtype).name,
                         **config})
    model = (LanguageModel if cfg.task == "language_model" else SentimentModel).create(cfg, rng)
    if biases:
        for name, p in model.params.items():
            if name.endswith((".b", ".b_hn")):
                p[...] = rng.normal(0, biases, p.shape)
    return model


def synthetic_review(rng: np.random.Generator, sentiment: str) -> str:
    """A review of 5-120 words whose sentiment words make the label learnable."""
    n = int(rng.integers(5, 121))
    words = list(rng.choice(FILLER, size=n))
    cues = {"pos": POSITIVE, "neg": NEGATIVE, "unsup": POSITIVE + NEGATIVE}[sentiment]
    for _ in range(max(1, n // 10)):
        words[int(rng.integers(0, n))] = str(rng.choice(cues))
    if n > 20:
        words.insert(n // 2, "<br /><br />")
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def build_imdb_archive(
    path: str | Path,
    n_per_class: int = 20,
    unsup: int = 10,
    seed: int = 0,
    extra_members: Iterable[tarfile.TarInfo | tuple[str, bytes]] | None = None,
    drop_split: str | None = None,
) -> Path:
    """Write a small .tar.gz in the official aclImdb layout and return its path.

    `drop_split` (e.g. "train/unsup") leaves that folder out; `extra_members`
    are appended as (name, bytes) files or ready-made TarInfo (links etc.).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        _add_dir(tar, "aclImdb")
        _add(tar, "aclImdb/README", b"synthetic IMDB-like data for tests\n")
        for split in ("train", "test"):
            _add_dir(tar, f"aclImdb/{split}")
            for cls in ("pos", "neg", "unsup"):
                d = f"{split}/{cls}"
                if d not in SPLIT_DIRS or d == drop_split:
                    continue
                _add_dir(tar, f"aclImdb/{d}")
                count = unsup if cls == "unsup" else n_per_class
                # Shuffled ids so "sorted by id" differs from insertion order.
                for rid in rng.permutation(count):
                    rating = {"pos": rng.integers(7, 11), "neg": rng.integers(1, 5), "unsup": 0}[cls]
                    text = synthetic_review(rng, cls)
                    _add(tar, f"aclImdb/{d}/{rid}_{int(rating)}.txt", text.encode("utf-8"))
        for extra in extra_members or ():
            if isinstance(extra, tarfile.TarInfo):
                tar.addfile(extra)
            else:
                _add(tar, extra[0], extra[1])
    return path


def copy_project(names: Iterable[str], source: Path, root: Path) -> None:
    """Copy the project's files and folders `names` from `source` into `root` (no __pycache__)."""
    for name in names:
        src, dst = source / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def write_params(root: Path, text: str) -> Path:
    """Write params.yaml into a tmp project dir."""
    p = Path(root) / "params.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def assert_processes_gone(pids: Iterable[int], seconds: float = 30) -> None:
    """Every pid exits within `seconds` (a zombie counts as exited: it no longer runs)."""
    deadline = time.monotonic() + seconds
    for pid in pids:
        while _running(pid):
            assert time.monotonic() < deadline, f"process {pid} is still running"
            time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def assert_no_shared_memory(pid: int) -> None:
    """No shared-memory block of a worker pool that process `pid` opened is left in /dev/shm."""
    left = sorted(p.name for p in Path("/dev/shm").glob(f"rnn_{pid}_*"))
    assert not left, f"left in /dev/shm: {left}"
