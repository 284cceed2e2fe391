"""Stage `pretrain@<cell>`: pretrain one cell as a next-token language model on reviews without labels.

    python -m stages.pretrain <cell>        # cell: rnn | gru | lstm

Text: the training part (data/prepared/train.npz; never validation or test) and the 50,000
unlabelled reviews (data/raw/unsup.parquet), encoded with the same vocabulary and truncation
(rnn.data.language_model_corpus). Shape: the cell's train settings (so that its encoder fits the
classifier), which the check stage writes to data/lm/<cell>.json: that file, not the train section,
is the stage's dependency, so a train-only setting never reruns it. Training: the `pretrain` section.
After each epoch, the full-softmax perplexity of the first `pretrain.val_reviews` validation reviews.
For a bidirectional classifier a backward model reads the reviews right to left, for its reverse
direction. Resumes from checkpoints/lm/<cell>[-backward]/<key>/, like train. Writes models/lm/<cell>/
(and backward/), metrics/<cell>/pretrain.json and plots/<cell>/pretrain.csv.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np
import pandas as pd

from rnn.data import language_model_corpus
from rnn.errors import InputError
from rnn.io import save_model
from rnn.lm import LanguageModel, reverse_sequences, token_counts
from rnn.optim import make_optimizer
from rnn.parallel import resolve_workers
from rnn.text import TextEncoder
from rnn.train import Dataset, fit
from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage
from stages.fitting import Progress, checkpoint_folder, code_digest, finishing

INPUTS = ("data/prepared/train.npz", "data/prepared/val.npz", "data/prepared/vocab.json",
          "data/raw/unsup.parquet", "data/embeddings.npy")
DIRECTIONS = ("forward", "backward")
DIRECTIONS_FOLDER = {"forward": "", "backward": "backward"}      # inside models/lm/<cell>/
HISTORY_COLUMNS = ("direction", "epoch", "lr", "train_loss", "val_loss", "val_perplexity", "seconds", "tokens_per_s",
                   "grad_norm_mean", "clipped_fraction")


def main() -> None:
    cell = settings.cell_argument(sys.argv)
    root = project_root()
    params = settings.load(root / "params.yaml")
    cfg = settings.pretrain_settings(params, cell)
    shape = outputs.read_json(root / outputs.LM_SHAPES / f"{cell}.json", "check")
    if shape != outputs.lm_shape(params, cell):
        raise InputError(f"{root / outputs.LM_SHAPES / cell}.json does not hold {cell}'s settings in params.yaml; run `dvc repro` (or python -m stages.check) again")
    workers = resolve_workers(params["train"]["workers"])
    run_hash = settings.run_hash(params, cell, "pretrain", workers)
    for path in (root / f for f in INPUTS):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (run the stages before pretrain first)")
    corpus = load_corpus(root, cfg)
    key = f"{run_hash[:12]}-{settings.digest([outputs.file_digest(root / f) for f in INPUTS])[:12]}-{code_digest(__file__)}"
    from stages.tracking import Tracker

    fitted = {}
    with ExitStack() as stack:     # one MLflow run per direction, each closed with the stage's outcome
        for direction in DIRECTIONS[:2 if cfg["bidirectional"] else 1]:
            name = cell if direction == "forward" else f"{cell}-{direction}"
            checkpoint_dir, resumed = checkpoint_folder(root, f"lm/{name}", key)
            tracker = Tracker.start(params, cell, f"pretrain@{name}", run_hash, checkpoint_dir / "mlflow_run.json", resumed)
            stack.enter_context(finishing(tracker, f"{name} language model", "try a lower pretrain.lr"))
            tracker.log_params({**settings.flatten(cfg, "pretrain"), "pretrain.direction": direction})
            if direction == "backward":   # the same reviews right to left, on the forward model's embedding
                corpus.update({k: corpus[k]._replace(ids=reverse_sequences(corpus[k].ids, corpus[k].lengths))
                               for k in ("train", "val")}, embeddings=model.params["embedding.weight"])
            model, result = pretrain(cell, cfg, corpus, checkpoint_dir, workers, tracker, direction == "backward")
            fitted[direction] = (model, {**result, "resumed": resumed}, tracker, checkpoint_dir)
        write_outputs(root, cell, cfg, run_hash, fitted, corpus)
    for *_, checkpoint_dir in fitted.values():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    print(f"{cell} language model: validation perplexity "
          + ", ".join(f"{f[1]['metrics']['val_perplexity']:.1f} ({d})" for d, f in fitted.items()))


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


def pretrain(cell: str, cfg: dict, corpus: dict, checkpoint_dir: Path, workers: int, tracker, freeze_embedding: bool = False) -> tuple:
    """Build the language model and fit it (resuming a checkpoint in checkpoint_dir): (model, the
    fit's result with the stage's metrics)."""
    t0 = time.perf_counter()
    config = settings.model_config({**cfg, "bidirectional": False, "freeze_embedding": freeze_embedding},
                                   cell, len(corpus["encoder"]["tokens"]), task="language_model")
    if corpus["embeddings"].shape != (config.vocab_size, config.embed_dim):
        raise InputError(f"data/embeddings.npy: shape {corpus['embeddings'].shape} does not fit "
                         f"{config.vocab_size} words x embed_dim {config.embed_dim}; rerun the embed stage")
    train = corpus["train"]
    model = LanguageModel.create(config, np.random.default_rng(cfg["seed"]), corpus["embeddings"],
                                 token_counts(train.ids, train.lengths, config.vocab_size))
    optimizer = make_optimizer(cfg["optimizer"], cfg["lr"])
    tracker.log_params({"data.lm_reviews": len(train.lengths), "data.lm_tokens": int(train.lengths.sum()),
                        "model.num_parameters": model.num_parameters()})
    with closing(Progress(f"{cell} lm", cfg["epochs"])) as progress:
        result = fit(model, optimizer, train, corpus["val"], settings.train_config(cfg, workers, patience=0, trace=False),
                     np.random.default_rng([cfg["seed"], 1]), checkpoint_dir=checkpoint_dir, callbacks=[progress, tracker])
    history = result["history"]
    best = min(history, key=lambda r: r["val_perplexity"])
    result["metrics"] = {"cell": cell, "val_perplexity": best["val_perplexity"], "best_epoch": best["epoch"],
                         "epochs_run": len(history), "steps": result["steps"], "tokens": int(train.lengths.sum()),
                         "reviews": len(train.lengths), "wall_seconds": time.perf_counter() - t0,
                         "train_seconds": sum(r["seconds"] + r["val_seconds"] for r in history),
                         "tokens_per_s": sum(r["tokens_per_s"] for r in history) / len(history),
                         "num_parameters": model.num_parameters()}
    return model, result


def write_outputs(root: Path, cell: str, cfg: dict, run_hash: str, fitted: dict, corpus: dict) -> None:
    """models/lm/<cell>/ (a backward model in its backward/), metrics/<cell>/pretrain.json (the
    backward model's under "backward") and plots/<cell>/pretrain.csv (a row per direction and epoch)."""
    metrics = {d: {**f[1]["metrics"], "resumed": f[1]["resumed"]} for d, f in fitted.items()}
    with Outputs(root) as out:
        folder = out.path(f"models/lm/{cell}", folder=True)
        for direction, (model, *_) in fitted.items():
            m = metrics[direction]
            save_model(folder / DIRECTIONS_FOLDER[direction], model, encoder=corpus["encoder"],
                       metadata={"cell": cell, "params_hash": run_hash, "best_epoch": m["best_epoch"],
                                 "val_perplexity": m["val_perplexity"], "pretrain": cfg, "direction": direction})
        out.write_metrics(f"metrics/{cell}/pretrain.json", {**metrics["forward"], **{d: metrics[d] for d in fitted if d != "forward"}})
        rows = [{**r, "direction": d} for d, f in fitted.items() for r in f[1]["history"]]
        out.write_text(f"plots/{cell}/pretrain.csv", outputs.history_csv(rows, HISTORY_COLUMNS))
    for direction, (_, _, tracker, _) in fitted.items():
        tracker.log_metrics({("perplexity/val_best" if k == "val_perplexity" else f"train/{k}"): float(v)
                             for k, v in metrics[direction].items() if isinstance(v, (int, float))})
        tracker.log_artifact(root / "plots" / cell / "pretrain.csv", "plots")
        tracker.log_artifacts(root / "models/lm" / cell / DIRECTIONS_FOLDER[direction], "language_model")


if __name__ == "__main__":
    run_stage(main)
