"""Recurrent networks from scratch in NumPy: RNN, GRU and LSTM cells with hand-derived
backpropagation through time, for many-to-one sentiment classification and many-to-many language
modelling.

    import numpy as np, rnn
    model = rnn.SentimentModel.create(rnn.ModelConfig(vocab_size=1000, cell="lstm"), np.random.default_rng(0))
    loss, grads, logits, trace = model.loss(ids, lengths, labels, dropout_seed=0, trace=True)

Read `rnn/reference.py` first: the cells and BPTT in their plainest form.

Training and inference can spread over worker processes: `TrainConfig(workers=2)` for `fit`,
`model.predict_logits(ids, lengths, workers=2)`, or a `WorkerPool` (rnn.parallel) kept open.

The names below are loaded on first use (PEP 562), so that `import rnn.text` loads the tokenizer
alone: a pipeline stage imports only the modules it uses, which is what its DVC dependencies list.
"""
from importlib import import_module

_HOME = {
    "ModelConfig": "config", "TrainConfig": "config", "SentimentModel": "model", "LanguageModel": "lm",
    "SGD": "optim", "Adam": "optim", "AdamW": "optim", "clip_gradients": "optim", "global_norm": "optim",
    "make_optimizer": "optim",
    "Dataset": "train", "evaluate": "train", "fit": "train",
    "read_model": "io", "save_model": "io",
    "WorkerDied": "parallel", "WorkerPool": "parallel", "resolve_workers": "parallel",
    "Predictor": "predict", "load_model": "predict", "load_language_model": "predict",
    "InputError": "errors",
}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'rnn' has no attribute {name!r}")
