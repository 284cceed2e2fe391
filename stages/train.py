"""Stage `train@<cell>`: train one recurrent cell on the prepared IMDB data.

    python -m stages.train <cell> <seed>     # cell: rnn | gru | lstm; seed: one of train.seeds

One replicate: `train` with `train.overrides.<cell>` on top; `seed` draws the new layers, the data
order and dropout. An interrupted run leaves checkpoints/<cell>/<key>/ (key: settings, input files and
code, so nothing else is ever resumed) and the next run continues from it. Writes models/<replicate>/,
metrics/<replicate>/train.json and plots/<replicate>/{history.csv, grad_trace.csv, grad_trace.png}.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np

from rnn.errors import InputError
from rnn.io import read_model, save_model
from rnn.lm import load_encoder
from rnn.model import SentimentModel, encoder_names
from rnn.optim import make_optimizer
from rnn.parallel import resolve_workers
from rnn.train import Dataset, fit
from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage
from stages.fitting import Progress, checkpoint_folder, code_digest, finishing
from stages.plots import grad_trace_figure


def main() -> None:
    root = project_root()
    params = settings.load(root / "params.yaml")
    cell, seed = settings.replicate_argument(sys.argv, params)
    cfg = settings.cell_settings(params, cell, seed)
    inputs = load_inputs(root, cfg["embed_dim"], f"models/lm/{cell}" if cfg["init"] == "lm" else None)
    workers = resolve_workers(params["train"]["workers"])
    run_hash = settings.run_hash(params, cell, "train", workers, seed)
    checkpoint_dir, resumed = checkpoint_folder(root, cell, f"{run_hash[:12]}-{inputs['digest'][:12]}-{code_digest(__file__)}")
    from stages.tracking import Tracker      # MLflow is imported only when tracking is on
    from sweeps.pruning import epoch_callbacks     # [] outside a sweep: Optuna only inside a trial

    # The run's id is kept beside the checkpoint: a resumed training continues the same run.
    tracker = Tracker.start(params, cell, f"train@{cell}-{seed}", run_hash, checkpoint_dir / "mlflow_run.json",
                            resumed, seed)
    with finishing(tracker, f"{cell} training", "try a lower train.lr or train.clip"):
        sweep = epoch_callbacks(cell, params["train"]["seeds"].index(seed))
        model, result, seconds = train(cell, cfg, inputs, root, checkpoint_dir, resumed, workers, tracker, sweep)
        write_outputs(root, cell, seed, cfg, run_hash, model, result, seconds, inputs["encoder"], tracker)
    print(f"{cell} seed {seed}: best val accuracy {result['best_val_accuracy']:.4f} (epoch {result['best_epoch']}), {seconds:.1f}s")


def load_inputs(root: Path, embed_dim: int, lm: str | None = None) -> dict:
    """Train/val splits, the encoder dict, the embeddings (V, embed_dim), the language models in `lm`
    (and lm/backward) if given, and the files' digest (the checkpoint key's)."""
    prepared = root / "data/prepared"
    files = [prepared / "train.npz", prepared / "val.npz", prepared / "vocab.json", root / "data/embeddings.npy"]
    language_model = backward = None
    if lm is not None:
        if not (root / lm).is_dir():
            raise FileNotFoundError(f"{root / lm}: not found (run the pretrain stage first, or set train.init: embeddings)")
        language_model, backward = (read_model(d)[0] if d.is_dir() else None for d in (root / lm, root / lm / "backward"))
        files += sorted(f for f in (*(root / lm).iterdir(), *(root / lm).glob("backward/*")) if f.is_file())
    encoder = outputs.load_vocab(files[2])
    if not files[3].is_file():
        raise FileNotFoundError(f"{files[3]}: not found (run the embed stage first)")
    embeddings = np.load(files[3], allow_pickle=False)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(encoder["tokens"]):
        raise InputError(f"{files[3]}: shape {embeddings.shape} does not fit the vocabulary of "
                         f"{len(encoder['tokens'])} words in {files[2]}; rerun the embed stage")
    if embeddings.shape[1] != embed_dim:
        raise settings.ParamsError(f"params.yaml: train.embed_dim = {embed_dim}: must equal the width "
                                   f"{embeddings.shape[1]} of {files[3]}, which the embed stage wrote")
    train, val = (outputs.load_split(f) for f in files[:2])
    return {"train": Dataset(train["ids"], train["lengths"], train["labels"]),
            "val": Dataset(val["ids"], val["lengths"], val["labels"]),
            "encoder": encoder, "embeddings": embeddings, "language_model": language_model, "backward_model": backward,
            "digest": settings.digest([outputs.file_digest(f) for f in files])}


def train(cell: str, cfg: dict, inputs: dict, root: Path, checkpoint_dir: Path, resumed: bool, workers: int,
          tracker, sweep: list) -> tuple:
    """Build the model (init lm: its encoder from the language model), fit it: (model, result, seconds)."""
    t0 = time.perf_counter()
    config = settings.model_config(cfg, cell, len(inputs["encoder"]["tokens"]))
    # Model initialisation and training draw from separate streams of the same seed.
    model = SentimentModel.create(config, np.random.default_rng(cfg["seed"]), inputs["embeddings"])
    lr_scale = {}
    if inputs["language_model"] is not None:
        try:
            load_encoder(model, inputs["language_model"], inputs["backward_model"])
        except ValueError as exc:
            raise InputError(f"models/lm/{cell}: {exc}") from None
        lr_scale = dict.fromkeys(encoder_names(config), cfg["pretrained_lr_scale"])
    optimizer = make_optimizer(cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["momentum"], lr_scale=lr_scale)
    train_data, val = inputs["train"], inputs["val"]
    tracker.log_params({"data.train_size": len(train_data.labels), "data.val_size": len(val.labels),
                        "data.max_len": train_data.ids.shape[1], "data.vocab_size": config.vocab_size,
                        "model.num_parameters": model.num_parameters()})
    tracker.log_datasets(root, {"train": len(train_data.labels), "val": len(val.labels)})
    with closing(Progress(cell, cfg["epochs"])) as progress:
        result = fit(model, optimizer, train_data, val, settings.train_config(cfg, workers),
                     np.random.default_rng([cfg["seed"], 1]), checkpoint_dir=checkpoint_dir,
                     callbacks=[progress, tracker, *sweep])
    result.update(resumed=resumed, checkpoint_dir=checkpoint_dir)
    return model, result, time.perf_counter() - t0


def write_outputs(root: Path, cell: str, seed: int, cfg: dict, run_hash: str, model: SentimentModel,
                  result: dict, seconds: float, encoder: dict, tracker) -> None:
    """models/, metrics/ and plots/ of the replicate, published together; then the MLflow run's."""
    replicate = settings.replicate_name(cell, seed)
    history, rows = result["history"], outputs.trace_rows(result["traces"])
    metrics = train_metrics(cell, seed, result, model, seconds)
    figure = grad_trace_figure({f"epoch {e}": outputs.trace_series(rows, e) for e in sorted({1, len(history)})},
                               f"{cell} (seed {seed}): gradient norm vs distance from the last token")
    with Outputs(root) as out:
        # No run id or time in the folder: identical training, identical bytes (one copy in a DVC remote).
        folder = out.path(f"models/{replicate}", folder=True)
        save_model(folder, model, encoder=encoder,
                   metadata={"cell": cell, "seed": seed, "params_hash": run_hash, "best_epoch": result["best_epoch"],
                             "best_val_accuracy": result["best_val_accuracy"], "train": cfg})
        out.write_metrics(f"metrics/{replicate}/train.json", metrics)
        out.write_text(f"plots/{replicate}/history.csv", outputs.history_csv(history))
        out.write_text(f"plots/{replicate}/grad_trace.csv", outputs.trace_csv(rows))
        out.save_figure(f"plots/{replicate}/grad_trace.png", figure)
    tracker.set_model_digest(root / "models" / replicate)
    tracker.log_model(root / "models" / replicate)
    tracker.log_summary(metrics, result["traces"])
    for name, where in (("history.csv", "plots"), ("grad_trace.csv", "grad_trace"), ("grad_trace.png", "grad_trace")):
        tracker.log_artifact(root / "plots" / replicate / name, where)     # every epoch, also after a resume
    shutil.rmtree(result["checkpoint_dir"], ignore_errors=True)


def train_metrics(cell: str, seed: int, result: dict, model: SentimentModel, wall_seconds: float) -> dict:
    history, last = result["history"], result["history"][-1]
    return {"cell": cell, "seed": seed, **{k: result[k] for k in ("best_val_accuracy", "best_epoch")},
            "epochs_run": len(history), "stopped_early": result["stopped_early"], "steps": result["steps"],
            # Summed over epochs, so a resumed run still reports its whole training time.
            "train_seconds": sum(r["seconds"] + r["val_seconds"] for r in history), "wall_seconds": wall_seconds,
            "tokens_per_s": sum(r["tokens_per_s"] for r in history) / len(history), "num_parameters": model.num_parameters(),
            **{f"final_{k}": last[k] for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")},
            "resumed": result["resumed"]}


if __name__ == "__main__":
    run_stage(main)
