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
import pyarrow

from rnn.embeddings import build_embeddings, svd_embeddings
from rnn.errors import InputError
from rnn.text import TextEncoder, tokenize
from stages import settings
from stages.common import Outputs, project_root, run_stage
from stages.outputs import VECTORS, describe_vectors, load_split, load_vocab, pretrained_vectors, read_json


def corpus(encoder: TextEncoder, root: Path) -> list[np.ndarray]:
    """Id sequences of the training part (never validation or test) and of the
    unlabelled reviews, the latter encoded whole: no truncation."""
    train, unsup_path = load_split(root / "data/prepared/train.npz"), root / "data/raw/unsup.parquet"
    if not unsup_path.is_file():
        raise FileNotFoundError(f"{unsup_path}: not found (needed by embed.method svd)")
    texts = pd.read_parquet(unsup_path, columns=["text"])["text"]
    seqs = [row[:n] for row, n in zip(train["ids"], train["lengths"])] + [encoder.vocab.encode(tokenize(t)) for t in texts]
    del texts
    pyarrow.default_memory_pool().release_unused()      # ~180 MB the reader keeps after the text is gone
    return seqs


def run(cfg: dict, dim: int, root: Path) -> dict:
    encoder = TextEncoder.from_dict(load_vocab(root / "data/prepared/vocab.json"))
    extra = {}
    if cfg["method"] == "svd":
        t0 = time.perf_counter()
        seqs = corpus(encoder, root)
        rng = np.random.default_rng(cfg["seed"])
        emb, seen = svd_embeddings(seqs, len(encoder.vocab), dim, rng, cfg["context_size"], cfg["window"], cfg["scale"])
        coverage = float(seen.sum() / max(len(seen) - 2, 1))  # of the words: PAD and UNK are never rows
        extra = {"tokens": int(sum(len(s) for s in seqs)), "seconds": round(time.perf_counter() - t0, 1)}
    else:
        emb, coverage = build_embeddings(encoder.vocab.tokens, dim, np.random.default_rng(cfg["seed"]), cfg["scale"],
                                         pretrained_vectors(root, cfg))
    metrics = {
        "method": cfg["method"],
        "dim": dim,
        "vocab_size": len(encoder.vocab),
        "coverage": coverage,  # null for random: nothing was looked up
        **extra,
    }
    with Outputs(root) as out:
        out.write("data/embeddings.npy", lambda f: np.save(f, emb))
        out.write_metrics("metrics/embed.json", metrics)
    return metrics


def main() -> None:
    root = project_root()
    params = settings.load(root / "params.yaml")
    # The vectors must be those the check stage described (the dependency that reruns this stage).
    if read_json(root / VECTORS, "check") != describe_vectors(pretrained_vectors(root, params["embed"])):
        raise InputError(f"{root / VECTORS} does not describe embed.path's file as it is now; "
                         "run `dvc repro` (or python -m stages.check) again")
    print(run(params["embed"], params["train"]["embed_dim"], root))


if __name__ == "__main__":
    run_stage(main)
