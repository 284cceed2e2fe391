"""Using a trained model on raw text: probabilities, labels and word-level explanations.

    predictor = rnn.load_model("models/lstm/seed0")
    predictor.predict(["A wonderful film.", "Dull and far too long."])
    # [('positive', 0.93), ('negative', 0.08)]
    predictor.explain("Not a bad film at all")    # [(token, change in logit), ...]
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import read_model
from .losses import sigmoid
from .lm import LanguageModel
from .model import SentimentModel
from .text import UNK, TextEncoder, tokenize, truncate

LABELS = ("negative", "positive")


def load_model(path: str | Path) -> "Predictor":
    """Load a sentiment model folder written by `rnn.io.save_model`, with its text encoder."""
    model, encoder, metadata = _read_with_encoder(path)
    if model.config.task != "sentiment":
        raise InputError(f"{path}: a language model, not a sentiment classifier (such as models/lstm/seed0); "
                         "write with it: rnn generate --model " + str(path))
    return Predictor(model, encoder, metadata)


def load_language_model(path: str | Path) -> "Writer":
    """Load a language model folder (models/lm/<cell>, written by the pretrain stage)."""
    model, encoder, metadata = _read_with_encoder(path)
    if model.config.task != "language_model":
        raise InputError(f"{path}: a sentiment classifier, not a language model; the pretrain stage "
                         f"writes those to models/lm/<cell>")
    return Writer(model, encoder, metadata)


def _read_with_encoder(path: str | Path):
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
    return model, encoder, metadata


class Writer:
    """A language model together with the text encoder it was trained with: text in, text out."""

    def __init__(self, model: LanguageModel, encoder: TextEncoder, metadata: dict | None = None):
        self.model, self.encoder, self.metadata = model, encoder, metadata or {}

    def generate(self, prompt: str, tokens: int = 60, temperature: float = 0.8, seed: int = 0) -> list[str]:
        """The words that follow `prompt` (tokenized as in training; an empty prompt starts from
        the most frequent word), `tokens` of them, drawn at `temperature` with a seeded generator."""
        if not (math.isfinite(temperature) and temperature >= 0):     # inf would write only <pad>
            raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
        ids = self.encoder.vocab.encode(tokenize(prompt))
        if len(ids) == 0:
            ids = np.array([UNK + 1])
        out = self.model.generate(ids, tokens, temperature, np.random.default_rng(seed))
        return [self.encoder.vocab.tokens[i] for i in out]


class Predictor:
    """A model together with the text encoder it was trained with."""

    def __init__(self, model: SentimentModel, encoder: TextEncoder, metadata: dict | None = None):
        self.model, self.encoder, self.metadata = model, encoder, metadata or {}

    def logits(self, texts: Sequence[str], batch_size: int = 256, workers: int | str = 1) -> np.ndarray:
        """Logits (N,) float64 of raw texts, encoded (tokenized, truncated) as in training; `workers`
        processes share the batches (an integer, or "auto" for the cores this process may use)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got a single string")
        ids, lengths = self.encoder.encode(texts)
        return self.model.predict_logits(ids, lengths, batch_size, workers=workers)

    def predict_proba(self, texts: Sequence[str], workers: int | str = 1) -> np.ndarray:
        """P(positive) (N,) float64."""
        return sigmoid(self.logits(texts, workers=workers))

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
