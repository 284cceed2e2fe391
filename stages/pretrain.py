"""Stage `pretrain@<cell>`: pretrain one cell as a next-token language model on reviews without labels.

    python -m stages.pretrain <cell>        # cell: rnn | gru | lstm

Text: the training part (data/prepared/train.npz; never validation or test) and the 50,000
unlabelled reviews (data/raw/unsup.parquet), encoded with the same vocabulary and truncation.
Shape: the cell's train settings (so that its encoder fits the classifier); training: the `pretrain`
section. After each epoch, the full-softmax perplexity of the first `pretrain.val_reviews`
validation reviews. An interrupted run resumes from checkpoints/lm/<cell>/<key>/, like train.
Writes models/lm/<cell>/, metrics/<cell>/pretrain.json and plots/<cell>/pretrain.csv.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

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
FINISHED = "finished"          # in the checkpoint folder: the outputs of a completed run of that key
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_perplexity", "seconds", "tokens_per_s",
                   "grad_norm_mean", "clipped_fraction")


def main() -> None:
    cell = settings.cell_argument(sys.argv)
    root = project_root()
    params = settings.load(root / "params.yaml")
    cfg = settings.pretrain_settings(params, cell)
    workers = resolve_workers(params["train"]["workers"])
    run_hash = settings.run_hash(params, cell, "pretrain", workers)
    inputs = [root / f for f in INPUTS]
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run the stages before pretrain first)")
    key = f"{run_hash[:12]}-{settings.digest([outputs.file_digest(f) for f in inputs])[:12]}-{code_digest(__file__)}"
    checkpoint_dir, resumed = checkpoint_folder(root, f"lm/{cell}", key)
    if (checkpoint_dir / FINISHED).is_dir():
        reuse(root, cell, checkpoint_dir / FINISHED)
        return
    corpus = load_corpus(root, cfg)

    from stages.tracking import Tracker, flatten

    tracker = Tracker.start(params, cell, f"pretrain@{cell}", run_hash, checkpoint_dir / "mlflow_run.json", resumed)
    with finishing(tracker, f"{cell} language model", "try a lower pretrain.lr"):
        tracker.log_params(flatten(cfg, "pretrain"))
        model, result, seconds = pretrain(cell, cfg, corpus, checkpoint_dir, workers, tracker)
        result["resumed"] = resumed
        write_outputs(root, cell, cfg, run_hash, model, result, seconds, corpus, tracker)
    best = min(r["val_perplexity"] for r in result["history"])
    print(f"{cell} language model: validation perplexity {best:.1f}, {seconds:.0f}s")


def reuse(root: Path, cell: str, finished: Path) -> None:
    """Publish the outputs of the finished run kept under this stage's key: DVC reruns the stage when
    any of the cell's train overrides changes (it cannot depend on just the shape keys among them),
    but only the key's settings, inputs and code decide the language model."""
    with Outputs(root) as out:
        shutil.copytree(finished / "model", out.path(f"models/lm/{cell}", folder=True), dirs_exist_ok=True)
        for name, rel in (("pretrain.json", f"metrics/{cell}/pretrain.json"), ("pretrain.csv", f"plots/{cell}/pretrain.csv")):
            out.write(rel, lambda f, name=name: f.write((finished / name).read_bytes()))
    print(f"{cell} language model: unchanged settings, inputs and code; reused {finished.relative_to(root)}")


def load_corpus(root: Path, cfg: dict) -> dict:
    """The language model's text: training part + unlabelled reviews (encoded as prepare encodes),
    at most `tokens_per_epoch` tokens of them, and the validation reviews it is measured on."""
    encoder = outputs.load_vocab(root / "data/prepared/vocab.json")
    text = TextEncoder.from_dict(encoder)
    train = outputs.load_split(root / "data/prepared/train.npz")
    val = outputs.load_split(root / "data/prepared/val.npz")
    unsup_ids, unsup_lengths = text.encode(pd.read_parquet(root / "data/raw/unsup.parquet", columns=["text"])["text"])
    width = max(train["ids"].shape[1], unsup_ids.shape[1])
    ids = np.zeros((len(train["lengths"]) + len(unsup_lengths), width), np.int32)
    ids[:len(train["lengths"]), :train["ids"].shape[1]] = train["ids"]
    ids[len(train["lengths"]):, :unsup_ids.shape[1]] = unsup_ids
    lengths = np.r_[train["lengths"], unsup_lengths]
    keep = lengths >= 2                                  # a one-token review predicts nothing
    if cfg["tokens_per_epoch"] is not None:              # a seeded subset of about that many tokens
        order = np.random.default_rng([cfg["seed"], 2]).permutation(len(lengths))
        chosen = order[np.cumsum(lengths[order]) <= cfg["tokens_per_epoch"]]
        keep &= np.isin(np.arange(len(lengths)), chosen)
    n_val = min(cfg["val_reviews"], len(val["lengths"]))
    embeddings = np.load(root / "data/embeddings.npy", allow_pickle=False)
    return {"train": Dataset(ids[keep], lengths[keep], np.zeros(int(keep.sum()), np.int8)),
            "val": Dataset(val["ids"][:n_val], val["lengths"][:n_val], val["labels"][:n_val]),
            "encoder": encoder, "embeddings": embeddings}


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
    result["checkpoint_dir"] = checkpoint_dir
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
        out.write_json(f"metrics/{cell}/pretrain.json", metrics)
        out.write_text(f"plots/{cell}/pretrain.csv",
                       outputs.csv_text(HISTORY_COLUMNS, ([r[c] for c in HISTORY_COLUMNS] for r in history)))
    tracker.log_metrics({("perplexity/val_best" if k == "val_perplexity" else f"train/{k}"): float(v)
                         for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.log_artifact(root / "plots" / cell / "pretrain.csv", "plots")
    tracker.log_artifacts(root / "models" / "lm" / cell, "language_model")
    finished = result["checkpoint_dir"] / FINISHED       # kept for `reuse`; the checkpoint is done
    shutil.copytree(root / "models" / "lm" / cell, finished / "model")
    shutil.copy(root / "metrics" / cell / "pretrain.json", finished / "pretrain.json")
    shutil.copy(root / "plots" / cell / "pretrain.csv", finished / "pretrain.csv")
    (result["checkpoint_dir"] / "checkpoint.npz").unlink(missing_ok=True)


if __name__ == "__main__":
    run_stage(main)
