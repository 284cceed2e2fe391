"""Using a trained model on raw text: probabilities, labels and word-level explanations.

    predictor = rnn.load_model("models/lstm")
    predictor.predict(["A wonderful film.", "Dull and far too long."])
    # [('positive', 0.93), ('negative', 0.08)]
    predictor.explain("Not a bad film at all")    # [(token, change in logit), ...]
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import read_model
from .losses import sigmoid
from .model import SentimentModel
from .text import UNK, TextEncoder, tokenize, truncate

LABELS = ("negative", "positive")


def load_model(path: str | Path) -> "Predictor":
    """Load a model folder written by `rnn.io.save_model` with its text encoder."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such model folder")
    model, encoder, metadata = read_model(path)
    if encoder is None:
        raise InputError(f"{path}: no encoder.json: the model was trained without a text encoder, "
                         "so raw text cannot be encoded for it")
    try:
        encoder = TextEncoder.from_dict(encoder)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path / 'encoder.json'}: bad text encoder: {e}") from None
    if len(encoder.vocab) != model.config.vocab_size:
        raise InputError(f"{path}: encoder has {len(encoder.vocab)} tokens, "
                         f"model expects {model.config.vocab_size}")
    return Predictor(model, encoder, metadata)


class Predictor:
    """A model together with the text encoder it was trained with."""

    def __init__(self, model: SentimentModel, encoder: TextEncoder, metadata: dict | None = None):
        self.model, self.encoder, self.metadata = model, encoder, metadata or {}

    def logits(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Logits (N,) float64 of raw texts, encoded (tokenized, truncated) as in training."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got a single string")
        ids, lengths = self.encoder.encode(texts)
        return self.model.predict_logits(ids, lengths, batch_size)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """P(positive) (N,) float64."""
        return sigmoid(self.logits(texts))

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, probability of that label) per text; 'positive' when P(positive) >= 0.5."""
        return [(LABELS[int(p >= 0.5)], float(p if p >= 0.5 else 1 - p)) for p in self.predict_proba(texts)]

    def explain(self, text: str, batch_size: int = 256) -> list[tuple[str, float]]:
        """Each token the model reads, in order, with logit(text) - logit(text without it).

        Positive scores pushed the prediction towards 'positive'. Tokens cut off by truncation are
        not listed, since the model never sees them. All L leave-one-out variants go through the
        model as one batch (in chunks of `batch_size` to bound memory)."""
        tokens = tokenize(text)
        kept = truncate(np.arange(len(tokens)), self.encoder.max_len, self.encoder.truncate)
        L = len(kept)
        if L == 0:
            return []
        ids = self.encoder.vocab.encode(tokens)[kept]
        batch = np.zeros((L + 1, L), dtype=np.int32)
        batch[0] = ids
        # Row i + 1 is the sequence without token i (an empty one becomes [UNK], as in encoding).
        batch[1:, :L - 1] = np.broadcast_to(ids, (L, L))[~np.eye(L, dtype=bool)].reshape(L, L - 1)
        lengths = np.full(L + 1, max(L - 1, 1), dtype=np.int32)
        lengths[0] = L
        if L == 1:
            batch[1, 0] = UNK
        logits = self.model.predict_logits(batch, lengths, batch_size)
        return [(tokens[k], float(logits[0] - s)) for k, s in zip(kept, logits[1:])]
