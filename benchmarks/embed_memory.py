#!/usr/bin/env python
"""Peak memory and time of the svd embeddings, the PPMI matrix kept sparse or made dense.

Both paths count co-occurrences and compute the PPMI the same way (rnn.embeddings, sparse);
then "sparse" runs the randomized SVD on the sparse matrix (what the embed stage does), and
"dense" first makes the PPMI matrix a dense (V, C) float32 array, as the embed stage held it
before. Each path runs in a fresh process, so that its peak RSS (ru_maxrss) is its own; the
corpus (the training part and the unlabelled reviews, as the embed stage reads them) is loaded
first and its RSS printed as the baseline. Then the two sets of vectors U * sqrt(S) are compared:
the largest principal angle between their column spaces and the largest difference between
word-word cosine similarities of the 2,000 most frequent words. It measures; it asserts nothing.

Needs the prepared data (`dvc repro embed`, or the prepare stage) in the project root.

    python benchmarks/embed_memory.py                      # both paths, params.yaml's settings
    python benchmarks/embed_memory.py --paths sparse       # one path only
    python benchmarks/embed_memory.py --reviews 5000       # a part of the unlabelled reviews
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rnn.embeddings import cooccurrence, ppmi, randomized_svd


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def load_corpus(root: Path, reviews: int | None) -> tuple[list[np.ndarray], int]:
    """(id sequences of the training part and the unlabelled reviews, vocabulary size)."""
    import pandas as pd

    from rnn.text import TextEncoder, tokenize

    encoder = TextEncoder.from_dict(json.loads((root / "data/prepared/vocab.json").read_text()))
    with np.load(root / "data/prepared/train.npz", allow_pickle=False) as train:
        seqs = [row[:n] for row, n in zip(train["ids"], train["lengths"])]
    texts = pd.read_parquet(root / "data/raw/unsup.parquet", columns=["text"])["text"][:reviews]
    return seqs + [encoder.vocab.encode(tokenize(t)) for t in texts], len(encoder.vocab)


def run_path(path: str, args: argparse.Namespace, out: Path) -> dict:
    """One path in this process: its figures, and its vectors saved to `out`."""
    seqs, vocab_size = load_corpus(args.root, args.reviews)
    baseline = peak_rss_mb()
    t0 = time.perf_counter()
    counts = cooccurrence(seqs, vocab_size, args.context_size, args.window)
    M = ppmi(counts)
    nnz = (counts.nnz, M.nnz)
    del counts
    t1 = time.perf_counter()
    if path == "dense":
        M = M.toarray()
    U, S = randomized_svd(M, args.dim, np.random.default_rng(args.seed))
    t2 = time.perf_counter()
    np.save(out, U * np.sqrt(S))
    return {"path": path, "tokens": int(sum(len(s) for s in seqs)), "vocab": vocab_size,
            "counts_nnz": nnz[0], "ppmi_nnz": nnz[1], "corpus_rss_mb": round(baseline),
            "peak_rss_mb": round(peak_rss_mb()), "count_ppmi_s": round(t1 - t0, 1),
            "svd_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1)}


def compare(a: np.ndarray, b: np.ndarray, top: int = 2000) -> dict:
    """How far apart two sets of word vectors are, up to a rotation of the singular subspace."""
    qa, _ = np.linalg.qr(a.astype(np.float64))
    qb, _ = np.linalg.qr(b.astype(np.float64))
    cosines = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1.0, 1.0)
    words = slice(2, 2 + top)  # ids 0, 1 are PAD and UNK, then the most frequent words
    ua = a[words] / np.linalg.norm(a[words], axis=1, keepdims=True)
    ub = b[words] / np.linalg.norm(b[words], axis=1, keepdims=True)
    return {"max_principal_angle_deg": float(np.degrees(np.arccos(cosines.min()))),
            "max_word_cosine_diff": float(np.abs(ua @ ua.T - ub @ ub.T).max())}


def main() -> None:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", default="dense,sparse", help="comma list of dense, sparse")
    p.add_argument("--root", type=Path, default=ROOT, help="project root holding data/")
    p.add_argument("--reviews", type=int, default=None, help="unlabelled reviews to use (all)")
    p.add_argument("--dim", type=int, default=params["train"]["embed_dim"])
    p.add_argument("--context-size", type=int, default=params["embed"]["context_size"])
    p.add_argument("--window", type=int, default=params["embed"]["window"])
    p.add_argument("--seed", type=int, default=params["embed"]["seed"])
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:  # one path, in a fresh process: print its figures as JSON
        print(json.dumps(run_path(args.paths, args, args.child)))
        return
    vectors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths.split(","):
            if path not in ("dense", "sparse"):
                p.error(f"--paths: unknown path {path!r} (dense, sparse)")
            out = Path(tmp) / f"{path}.npy"
            argv = ["--root", str(args.root), "--dim", str(args.dim), "--context-size", str(args.context_size),
                    "--window", str(args.window), "--seed", str(args.seed), "--paths", path, "--child", str(out)]
            argv += ["--reviews", str(args.reviews)] if args.reviews is not None else []
            proc = subprocess.run([sys.executable, __file__, *argv],
                                  capture_output=True, text=True, check=True)
            print(proc.stdout.strip().splitlines()[-1], flush=True)
            vectors[path] = np.load(out)
    if len(vectors) == 2:
        print(json.dumps({"dense_vs_sparse": compare(vectors["dense"], vectors["sparse"])}))


if __name__ == "__main__":
    main()
