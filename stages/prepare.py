"""Stage `prepare`: tokenize, split off validation, build the vocabulary, encode to padded ids.

    python -m stages.prepare

The vocabulary comes from the training part only (after the validation split
is removed), so validation and test OOV rates are honest. A vocabulary that leaves most of the
training text <unk> is refused: the models would train to chance and the language model's
perplexity would look perfect.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from rnn.data import stratified_split
from rnn.errors import InputError
from rnn.text import TextEncoder, Vocabulary, encode_tokenized, tokenize
from stages import settings
from stages.common import Outputs, project_root, run_stage

MIN_COVERAGE = 0.5          # the share of the training part's tokens the vocabulary must know


def _read_raw(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the download stage first)")
    df = pd.read_parquet(path)
    missing = {"id", "text", "label"} - set(df.columns)
    if missing:
        raise InputError(f"{path}: missing columns {', '.join(sorted(missing))}")
    return df


def run(cfg: dict, root: Path) -> dict:
    """Write data/prepared/{train,val,test}.npz, vocab.json and metrics/prepare.json."""
    t0 = time.perf_counter()
    train_df = _read_raw(root / "data/raw/train.parquet")
    test_df = _read_raw(root / "data/raw/test.parquet")
    if len(train_df) < 2:
        raise InputError(f"{root / 'data/raw/train.parquet'}: need at least 2 reviews, got {len(train_df)}")

    tr_idx, va_idx = stratified_split(train_df["label"].to_numpy(), cfg["val_fraction"],
                                      np.random.default_rng(cfg["seed"]))
    parts = {
        "train": train_df.iloc[tr_idx],
        "val": train_df.iloc[va_idx],
        "test": test_df,
    }
    # The vocabulary needs the training part's tokens; the other parts are tokenized review by review
    # as they are encoded, so that not every review is held as Python strings at once (~0.75 GB).
    train_tokens = [tokenize(t) for t in parts["train"]["text"]]
    vocab = Vocabulary.build(train_tokens, cfg["vocab_size"], cfg["min_freq"])
    encoder = TextEncoder(vocab, cfg["max_len"], cfg["truncate"])

    metrics: dict = {"vocab_size": len(vocab), "splits": {}, "oov_rate": {}, "truncated_fraction": {}}
    arrays = {}
    for name, df in parts.items():
        docs = train_tokens if name == "train" else (tokenize(t) for t in df["text"])
        encoded, stats = encode_tokenized(docs, encoder)
        train_tokens = None
        # raw_lengths (before truncation) serve evaluate's accuracy by review length.
        arrays[name] = {"ids": encoded["ids"], "lengths": encoded["lengths"], "labels": df["label"].to_numpy(dtype=np.int8),
                        "review_ids": df["id"].to_numpy(dtype=np.int64), "raw_lengths": encoded["raw_lengths"]}
        metrics["splits"][name] = len(df)
        metrics["oov_rate"][name] = stats["oov_rate"]
        metrics["truncated_fraction"][name] = stats["truncated_fraction"]
        if name == "train":
            metrics["length_percentiles"] = stats["length_percentiles"]
            check_coverage(1.0 - stats["oov_rate"], len(vocab), cfg)
    with Outputs(root) as out:
        for name, arrs in arrays.items():
            out.save_npz(f"data/prepared/{name}.npz", **arrs)
        out.write_json("data/prepared/vocab.json", encoder.to_dict())
        out.write_metrics("metrics/prepare.json", metrics)
    print(f"prepared {sum(len(df) for df in parts.values())} reviews in {time.perf_counter() - t0:.1f}s")
    return metrics


def check_coverage(coverage: float, words: int, cfg: dict) -> None:
    """Refuse a vocabulary that knows less than MIN_COVERAGE of the training part's tokens."""
    if coverage < MIN_COVERAGE:
        raise InputError(f"params.yaml: the vocabulary ({words} words with prepare.min_freq {cfg['min_freq']}, "
                         f"prepare.vocab_size {cfg['vocab_size']}) covers {coverage:.1%} of the training text's "
                         f"tokens, less than {MIN_COVERAGE:.0%} (the rest would be <unk>): lower prepare.min_freq "
                         "or raise prepare.vocab_size")


def main() -> None:
    root = project_root()
    cfg = settings.load(root / "params.yaml")["prepare"]
    metrics = run(cfg, root)
    print(f"vocab {metrics['vocab_size']}, oov {metrics['oov_rate']}, splits {metrics['splits']}")


if __name__ == "__main__":
    run_stage(main)
