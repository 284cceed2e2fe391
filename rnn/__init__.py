"""Recurrent networks from scratch in NumPy: RNN, GRU and LSTM cells with hand-derived
backpropagation through time, for many-to-one sentiment classification.

    import numpy as np, rnn
    model = rnn.SentimentModel.create(rnn.ModelConfig(vocab_size=1000, cell="lstm"), np.random.default_rng(0))
    loss, grads, logits, trace = model.loss(ids, lengths, labels, dropout_seed=0, trace=True)

Training and inference can spread over worker processes: `TrainConfig(workers=2)` for `fit`,
`model.predict_logits(ids, lengths, workers=2)`, or a `WorkerPool` (rnn.parallel) kept open.
"""
from .model import ModelConfig, SentimentModel
from .optim import SGD, Adam, AdamW, clip_gradients, global_norm, make_optimizer
from .train import Dataset, TrainConfig, evaluate, fit
from .io import read_model, save_model
from .parallel import WorkerDied, WorkerPool, resolve_workers

__all__ = ["ModelConfig", "SentimentModel", "SGD", "Adam", "AdamW", "clip_gradients", "global_norm",
           "make_optimizer", "Dataset", "TrainConfig", "evaluate", "fit", "read_model", "save_model",
           "WorkerDied", "WorkerPool", "resolve_workers"]
from .predict import Predictor, load_model  # noqa: E402
__all__ += ["Predictor", "load_model"]
