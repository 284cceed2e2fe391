"""Stage `pretrain@<cell>`: pretrain one cell as a next-token language model on reviews without labels.

    python -m stages.pretrain <cell>        # cell: rnn | gru | lstm

Text: the training part (data/prepared/train.npz; never validation or test) and the 50,000
unlabelled reviews (data/raw/unsup.parquet), encoded with the same vocabulary and truncation
(rnn.data.language_model_corpus). Shape: the cell's train settings (so that its encoder fits the
classifier), which the check stage writes to data/lm/<cell>.json: that file, not the train section,
is the stage's dependency, so a train-only setting never reruns it. Training: the `pretrain` section.
After each epoch, the full-softmax perplexity of the first `pretrain.val_reviews` validation reviews.
An interrupted run resumes from checkpoints/lm/<cell>/<key>/, like train.
Writes models/lm/<cell>/, metrics/<cell>/pretrain.json and plots/<cell>/pretrain.csv.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rnn.data import language_model_corpus
from rnn.errors import InputError
from rnn.io import save_model
from rnn.lm import LanguageModel, token_counts
from rnn.optim import make_optimizer
from rnn.parallel import resolve_workers
from rnn.text import TextEncoder
from rnn.train import Dataset, fit
from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage
from stages.fitting import Progress, checkpoint_folder, code_digest, finishing

INPUTS = ("data/prepared/train.npz", "data/prepared/val.npz", "data/prepared/vocab.json",
          "data/raw/unsup.parquet", "data/embeddings.npy")
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_perplexity", "seconds", "tokens_per_s",
                   "grad_norm_mean", "clipped_fraction")


def main() -> None:
    cell = settings.cell_argument(sys.argv)
    root = project_root()
    params = settings.load(root / "params.yaml")
    cfg = settings.pretrain_settings(params, cell)
    shape = outputs.read_json(root / outputs.LM_SHAPES / f"{cell}.json", "check")
    if shape != outputs.lm_shape(params, cell):
        raise InputError(f"{root / outputs.LM_SHAPES / cell}.json does not hold {cell}'s settings in params.yaml; "
                         "run `dvc repro` (or python -m stages.check) again")
    workers = resolve_workers(params["train"]["workers"])
    run_hash = settings.run_hash(params, cell, "pretrain", workers)
    for path in (root / f for f in INPUTS):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run the stages before pretrain first)")
    corpus = load_corpus(root, cfg)
    inputs = settings.digest([outputs.file_digest(root / f) for f in INPUTS])
    checkpoint_dir, resumed = checkpoint_folder(root, f"lm/{cell}", f"{run_hash[:12]}-{inputs[:12]}-{code_digest(__file__)}")

    from stages.tracking import Tracker, flatten

    tracker = Tracker.start(params, cell, f"pretrain@{cell}", run_hash, checkpoint_dir / "mlflow_run.json", resumed)
    with finishing(tracker, f"{cell} language model", "try a lower pretrain.lr"):
        tracker.log_params(flatten(cfg, "pretrain"))
        model, result, seconds = pretrain(cell, cfg, corpus, checkpoint_dir, workers, tracker)
        write_outputs(root, cell, cfg, run_hash, model, {**result, "resumed": resumed}, seconds, corpus, tracker)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    best = min(r["val_perplexity"] for r in result["history"])
    print(f"{cell} language model: validation perplexity {best:.1f}, {seconds:.0f}s")


def load_corpus(root: Path, cfg: dict) -> dict:
    """The language model's text: training part + unlabelled reviews (encoded as prepare encodes),
    at most `tokens_per_epoch` tokens of them, and the validation reviews it is measured on."""
    encoder = outputs.load_vocab(root / "data/prepared/vocab.json")
    train = outputs.load_split(root / "data/prepared/train.npz")
    val = outputs.load_split(root / "data/prepared/val.npz")
    unsup = TextEncoder.from_dict(encoder).encode(pd.read_parquet(root / "data/raw/unsup.parquet", columns=["text"])["text"])
    ids, lengths = language_model_corpus([(train["ids"], train["lengths"]), unsup], cfg["tokens_per_epoch"],
                                         np.random.default_rng([cfg["seed"], 2]))
    n_val = min(cfg["val_reviews"], len(val["lengths"]))
    return {"train": Dataset(ids, lengths, np.zeros(len(lengths), np.int8)),
            "val": Dataset(val["ids"][:n_val], val["lengths"][:n_val], val["labels"][:n_val]),
            "encoder": encoder, "embeddings": np.load(root / "data/embeddings.npy", allow_pickle=False)}


def pretrain(cell: str, cfg: dict, corpus: dict, checkpoint_dir: Path, workers: int, tracker) -> tuple:
    """Build the language model and fit it (resuming a checkpoint in checkpoint_dir)."""
    t0 = time.perf_counter()
    config = settings.model_config(cfg, cell, len(corpus["encoder"]["tokens"]), task="language_model")
    if corpus["embeddings"].shape != (config.vocab_size, config.embed_dim):
        raise InputError(f"data/embeddings.npy: shape {corpus['embeddings'].shape} does not fit "
                         f"{config.vocab_size} words x embed_dim {config.embed_dim}; rerun the embed stage")
    train = corpus["train"]
    model = LanguageModel.create(config, np.random.default_rng(cfg["seed"]), corpus["embeddings"],
                                 token_counts(train.ids, train.lengths, config.vocab_size))
    optimizer = make_optimizer(cfg["optimizer"], cfg["lr"])
    tracker.log_params({"data.lm_reviews": len(train.lengths), "data.lm_tokens": int(train.lengths.sum()),
                        "model.num_parameters": model.num_parameters()})
    progress = Progress(f"{cell} lm", cfg["epochs"])
    fit_cfg = settings.train_config(cfg, workers, patience=0, trace=False)
    try:
        result = fit(model, optimizer, train, corpus["val"], fit_cfg, np.random.default_rng([cfg["seed"], 1]),
                     checkpoint_dir=checkpoint_dir, callbacks=[progress, tracker])
    finally:
        progress.close()
    return model, result, time.perf_counter() - t0


def write_outputs(root: Path, cell: str, cfg: dict, run_hash: str, model: LanguageModel, result: dict,
                  seconds: float, corpus: dict, tracker) -> None:
    history = result["history"]
    best = min(history, key=lambda r: r["val_perplexity"])
    metrics = {"cell": cell, "val_perplexity": best["val_perplexity"], "best_epoch": best["epoch"],
               "epochs_run": len(history), "steps": result["steps"],
               "tokens": int(corpus["train"].lengths.sum()), "reviews": len(corpus["train"].lengths),
               "train_seconds": sum(r["seconds"] + r["val_seconds"] for r in history), "wall_seconds": seconds,
               "tokens_per_s": sum(r["tokens_per_s"] for r in history) / len(history),
               "num_parameters": model.num_parameters(), "resumed": result["resumed"]}
    with Outputs(root) as out:
        folder = out.path(f"models/lm/{cell}", folder=True)
        save_model(folder, model, encoder=corpus["encoder"],
                   metadata={"cell": cell, "params_hash": run_hash, "best_epoch": best["epoch"],
                             "val_perplexity": best["val_perplexity"], "pretrain": cfg})
        out.write_metrics(f"metrics/{cell}/pretrain.json", metrics)
        out.write_text(f"plots/{cell}/pretrain.csv", outputs.history_csv(history, HISTORY_COLUMNS))
    tracker.log_metrics({("perplexity/val_best" if k == "val_perplexity" else f"train/{k}"): float(v)
                         for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.log_artifact(root / "plots" / cell / "pretrain.csv", "plots")
    tracker.log_artifacts(root / "models" / "lm" / cell, "language_model")


if __name__ == "__main__":
    run_stage(main)
