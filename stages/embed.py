"""Stage `embed`: initial embedding matrix (V, E) for the prepared vocabulary.

    python -m stages.embed

"random" draws N(0, scale^2); "pretrained" copies vectors from a GloVe or
word2vec text file and draws the rest at random; "svd" learns vectors without
labels from the training part and the unlabelled reviews (rnn.embeddings:
PPMI + truncated SVD). Row 0 (PAD) is always zero so padding contributes
nothing before masking.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from rnn.embeddings import svd_embeddings
from rnn.errors import InputError
from rnn.text import PAD, UNK, TextEncoder, tokenize
from stages import settings
from stages.common import Outputs, project_root, run_stage
from stages.outputs import VECTORS, describe_vectors, load_vocab, read_json


def read_pretrained(path: Path, vocab_index: dict[str, int], dim: int) -> dict[int, np.ndarray]:
    """{vocab id: vector} for vocabulary words found in a GloVe/word2vec text file.

    Exact matches win over lowercased ones, so cased word2vec files still
    cover our lowercase vocabulary without a capitalized variant overriding.
    """
    found: dict[int, np.ndarray] = {}
    exact: set[int] = set()
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.rstrip().split(" ")
                if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue  # word2vec header "count dim"
                if len(parts) == 1 and not parts[0]:
                    continue
                if len(parts) - 1 != dim:
                    raise InputError(
                        f"{path}:{lineno}: expected {dim} values (train.embed_dim), got {len(parts) - 1}"
                    )
                word = parts[0]
                idx = vocab_index.get(word)
                is_exact = idx is not None
                if idx is None:
                    idx = vocab_index.get(word.lower())
                if idx is None or idx in exact or (not is_exact and idx in found):
                    continue
                try:
                    found[idx] = np.array(parts[1:], dtype=np.float32)
                except ValueError:
                    raise InputError(f"{path}:{lineno}: non-numeric vector value") from None
                if is_exact:
                    exact.add(idx)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text embedding file ({exc.reason})") from None
    return found


def build_embeddings(
    tokens: list[str], dim: int, method: str, path: str | None, scale: float | None, seed: int
) -> tuple[np.ndarray, float | None]:
    """Return (embeddings (V, dim) float32 with zero PAD row, pretrained coverage or None)."""
    scale = scale if scale is not None else 1.0 / np.sqrt(dim)
    rng = np.random.default_rng(seed)
    emb = rng.normal(0.0, scale, size=(len(tokens), dim)).astype(np.float32)
    coverage = None
    if method == "pretrained":
        if not path:
            raise InputError("params.yaml: embed.path = null: required when embed.method is pretrained")
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"{file}: pretrained embedding file not found (embed.path)")
        index = {t: i for i, t in enumerate(tokens) if i not in (PAD, UNK)}
        found = read_pretrained(file, index, dim)
        for i, vec in found.items():
            emb[i] = vec
        coverage = len(found) / len(index) if index else 0.0
    emb[PAD] = 0.0
    return emb, coverage


def corpus(encoder: TextEncoder, root: Path) -> list[np.ndarray]:
    """Id sequences of the training part (never validation or test) and of the
    unlabelled reviews, the latter encoded whole: no truncation."""
    train_path, unsup_path = root / "data/prepared/train.npz", root / "data/raw/unsup.parquet"
    for path in (train_path, unsup_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (needed by embed.method svd)")
    with np.load(train_path, allow_pickle=False) as train:
        seqs = [row[:n] for row, n in zip(train["ids"], train["lengths"])]
    texts = pd.read_parquet(unsup_path, columns=["text"])["text"]
    return seqs + [encoder.vocab.encode(tokenize(t)) for t in texts]


def run(cfg: dict, dim: int, root: Path) -> dict:
    encoder = TextEncoder.from_dict(load_vocab(root / "data/prepared/vocab.json"))
    path = cfg["path"]
    if path and not Path(path).is_absolute():
        path = str(root / path)
    extra = {}
    if cfg["method"] == "svd":
        t0 = time.perf_counter()
        seqs = corpus(encoder, root)
        rng = np.random.default_rng(cfg["seed"])
        emb, seen = svd_embeddings(seqs, len(encoder.vocab), dim, rng, cfg["context_size"], cfg["window"], cfg["scale"])
        coverage = float(seen.sum() / max(len(seen) - 2, 1))  # of the words: PAD and UNK are never rows
        extra = {"tokens": int(sum(len(s) for s in seqs)), "seconds": round(time.perf_counter() - t0, 1)}
    else:
        emb, coverage = build_embeddings(encoder.vocab.tokens, dim, cfg["method"], path, cfg["scale"], cfg["seed"])
    metrics = {
        "method": cfg["method"],
        "dim": dim,
        "vocab_size": len(encoder.vocab),
        "coverage": coverage,  # null for random: nothing was looked up
        **extra,
    }
    with Outputs(root) as out:
        out.save_npy("data/embeddings.npy", emb)
        out.write_json("metrics/embed.json", metrics)
    return metrics


def main() -> None:
    root = project_root()
    params = settings.load(root / "params.yaml")
    check_vectors(root, params["embed"])
    print(run(params["embed"], params["train"]["embed_dim"], root))


def check_vectors(root: Path, cfg: dict) -> None:
    """The pretrained vectors must be those the check stage described in data/vectors.json (the
    dependency that reruns this stage when they change)."""
    described = read_json(root / VECTORS, "check")
    path = root / cfg["path"] if cfg["method"] == "pretrained" and cfg["path"] else None
    if path is not None and not path.is_file():
        return                                   # build_embeddings names the missing file
    if described != describe_vectors(path):
        raise InputError(f"{root / VECTORS} does not describe embed.path's file as it is now; "
                         "run `dvc repro` (or python -m stages.check) again")


if __name__ == "__main__":
    run_stage(main)
