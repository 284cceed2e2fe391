"""The many-to-many language model: the classifier's encoder with an output layer at every step.

At every position t the model has read tokens x<1..t> and predicts the next one:

    a<t> = cell(a<t-1>, embedding[x<t>])            the same recurrent layers as the classifier
    P(x<t+1> = w) = softmax(lm.W a<t> + lm.b)[w]    over the V words of the vocabulary

Training uses a sampled softmax (rnn.losses.sampled_softmax_loss): each step draws K candidate words
from a log-uniform distribution over the frequency-sorted vocabulary, which stand in for all V; the
full softmax measures perplexity. Pretrained this way on the unlabelled reviews, the encoder starts
the sentiment classifier (Dai & Le, 2015, "Semi-supervised Sequence Learning"), and sampling from
it one word at a time writes text: the article's one-to-many shape.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import InputError
from .layers import row_dropout_mask
from .losses import (PAD, UNK, sample_log_uniform, sample_next_token, sampled_softmax_loss,
                     softmax_cross_entropy)
from .model import Model, encode, encode_backward, encoder_names, layer_names, sort_batch
from .parallel import LocalRunner, map_by_length
from .recurrent import reverse_index, sequence_forward

CANDIDATES_KEY = 2**32        # keys the step's candidate draw apart from the rows' dropout draws


class LanguageModel(Model):
    """A config of task "language_model" and a flat dict of parameters; `share_loss` trains it
    (alone or in rnn.parallel's workers), `nll` evaluates it, `generate` writes with it."""

    task = "language_model"

    @classmethod
    def create(cls, config: ModelConfig, rng: np.random.Generator, embeddings: np.ndarray | None = None,
               token_counts: np.ndarray | None = None) -> "LanguageModel":
        """A new model; with `token_counts` (V,) the output bias starts at each word's log
        frequency, what the model would learn first anyway: with a zero bias the sampled softmax
        spends its first thousand steps on word frequencies, one small step per row per draw."""
        model = super().create(config, rng, embeddings)
        if token_counts is not None:
            model.params["lm.b"][...] = unigram_log_probs(token_counts)
        return model

    # -------------------------------------------------------------------------------- training
    @staticmethod
    def loss_denominator(lengths: np.ndarray) -> int:
        """The number of predictions in sequences of these lengths: every token but the first."""
        return int(np.maximum(np.asarray(lengths) - 1, 0).sum())

    def share_loss(self, batch: dict, seed: int, positions: np.ndarray, total: int,
                   trace: bool = False) -> tuple[float, dict, dict]:
        """Sampled-softmax loss and gradients of some rows of a training batch (rnn.parallel runs it
        in each worker; see SentimentModel.share_loss).

        batch: these rows' "ids" (n, T) and "lengths" (n,); seed: the step's seed, from which the
        dropout masks of each row (keyed on its position in the batch) and the step's candidate
        words (the same in every worker) come; total: the whole batch's number of predictions
        (`loss_denominator`). Returns (loss, grads, extras) with the loss and gradients summed over
        these rows' predictions / total, and extras = {"predictions": count, "trace": None}."""
        cfg, p = self.config, self.params
        inputs, in_lengths, targets = _shift(batch["ids"], batch["lengths"])
        order, ids, lengths, rngs = sort_batch(cfg, inputs, in_lengths, seed, positions)
        targets = targets[order, :ids.shape[1]]
        X, _, enc = encode(cfg, p, ids, lengths, rngs)                        # (T, n, H)
        mask = row_dropout_mask(X.shape, cfg.dropout, rngs, X.dtype, lengths) if rngs is not None else None
        h = X * mask if mask is not None else X
        T, n, H = X.shape
        candidates, log_q = sample_log_uniform(cfg.vocab_size, cfg.num_sampled,
                                               np.random.default_rng([seed, CANDIDATES_KEY]))
        loss, count, dh, dW, db = sampled_softmax_loss(h.reshape(-1, H), p["lm.W"], p["lm.b"],
                                                       targets.T.reshape(-1), candidates, log_q,
                                                       denominator=max(total, 1))
        d_out = dh.reshape(T, n, H)
        if mask is not None:
            d_out *= mask
        grads, _ = encode_backward(cfg, p, d_out, None, enc)
        return loss, {"lm.W": dW, "lm.b": db, **grads}, {"predictions": count, "trace": None}

    # ------------------------------------------------------------------------------ evaluation
    def nll(self, ids: np.ndarray, lengths: np.ndarray, chunk_size: int = 512) -> tuple[float, int]:
        """Full-softmax negative log-likelihood of the next-token predictions in a batch: (sum, count).
        ids: (n, T); lengths: (n,). Perplexity over many batches = exp(sum of sums / sum of counts)."""
        cfg, p = self.config, self.params
        inputs, in_lengths, targets = _shift(ids, lengths)
        order, ids, lengths, _ = sort_batch(cfg, inputs, in_lengths, None, None)
        X, _, _ = encode(cfg, p, ids, lengths, keep_cache=False)
        targets = targets[order, :ids.shape[1]]
        return softmax_cross_entropy(X.reshape(-1, X.shape[2]), p["lm.W"], p["lm.b"],
                                     targets.T.reshape(-1), chunk_size=chunk_size)

    def perplexity(self, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 64, runner=None) -> float:
        """exp(mean negative log-likelihood per prediction) over many sequences, in batches of
        similar length; on a runner's workers when one is given (rnn.parallel). Raises InputError
        when every target is the same word: a model learns to always predict it, and its
        perplexity of 1.0 would look perfect (a vocabulary of only <unk> does that)."""
        _, _, targets = _shift(ids, lengths)
        real = targets[targets != PAD]
        if real.size and (real == real[0]).all():
            word = "<unk>" if real[0] == UNK else f"id {int(real[0])}"
            raise InputError(f"every one of the {real.size:,} next-token targets is the word {word}: a perplexity "
                             "over them says nothing (does the vocabulary know too few words?)")
        batches = map_by_length(runner or LocalRunner(self), "nll", ids, lengths, batch_size)
        total, count = map(sum, zip(*(result for _, result in batches)))
        return float(np.exp(total / max(count, 1)))

    # ------------------------------------------------------------------------------ generation
    def generate(self, prompt: np.ndarray, num_tokens: int, temperature: float,
                 rng: np.random.Generator, exclude: tuple[int, ...] = (PAD, UNK)) -> np.ndarray:
        """Continue the token ids `prompt` (L,) (L >= 1) by `num_tokens` ids, each drawn from the
        full softmax at `temperature` (0: the most likely word), never one of `exclude`. The state
        carries from step to step, so each new word costs one step of the network. Raises
        InputError when the scores overflow (weights finite but huge)."""
        cfg, p = self.config, self.params
        layers = [{k.rsplit(".", 1)[1]: v for k, v in p.items() if k.startswith(name + ".")}
                  for name in layer_names(cfg)]
        states = [None] * len(layers)
        tokens = np.asarray(prompt, dtype=np.int64).reshape(-1, 1)           # (L, 1): time-major
        out = []
        with np.errstate(over="ignore", invalid="ignore"):    # huge weights: refused below, not warned about
            for _ in range(num_tokens):
                X = p["embedding.weight"][tokens]                                 # (L, 1, E)
                for k, sub in enumerate(layers):
                    X, states[k], _ = sequence_forward(X, np.array([len(tokens)]), sub, cfg.kind, states[k],
                                                       keep_cache=False)
                logits = X[-1, 0] @ p["lm.W"].T + p["lm.b"]
                if not np.isfinite(logits).all():         # as rnn predict refuses such a classifier
                    raise InputError("the model gives no finite next-word scores "
                                     "(its weights overflow float arithmetic)")
                token = int(sample_next_token(logits, temperature, rng, exclude))
                out.append(token)
                tokens = np.array([[token]])
        return np.array(out, dtype=np.int64)


def unigram_log_probs(token_counts: np.ndarray) -> np.ndarray:
    """log P(word) from counts (V,), add-one smoothed; PAD, never predicted, gets the smallest value."""
    counts = np.asarray(token_counts, dtype=np.float64) + 1.0
    counts[PAD] = 1.0
    return np.log(counts / counts.sum())


def token_counts(ids: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """How often each id occurs in the real (unpadded) tokens of ids (N, T) with lengths (N,)."""
    real = np.arange(ids.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return np.bincount(ids[real], minlength=vocab_size)


def _shift(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs and next-token targets of right-padded sequences: ids (n, T), lengths (n,) ->
    inputs (n, T) (ids with each row's last token blanked), input lengths (n,) = max(L - 1, 1), and
    targets (n, T) = ids shifted left by one, PAD (ignored) past each row's last prediction. A
    one-token row keeps its token as input and predicts nothing."""
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    n, T = ids.shape
    real = np.arange(T)[None, :] < lengths[:, None]
    ids = np.where(real, ids, PAD)
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    in_lengths = np.maximum(lengths - 1, 1)
    inputs = np.where(np.arange(T)[None, :] < in_lengths[:, None], ids, PAD)
    return inputs, in_lengths, targets


def reverse_sequences(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each right-padded row of ids (N, T) reversed within its own length (N,); padding stays put:
    the text of the backward language model a bidirectional classifier's reverse direction starts from."""
    return np.take_along_axis(ids, reverse_index(lengths, ids.shape[1]).T, axis=1)


# The settings that fix the encoder's parameters: a classifier inherits a language model's encoder
# only where they agree.
ENCODER_SETTINGS = ("vocab_size", "cell", "reset_after", "embed_dim", "hidden_size", "num_layers")


def load_encoder(model, lm: LanguageModel, backward: LanguageModel | None = None) -> None:
    """Copy the language model's encoder (embedding and recurrent layers) into `model` (a
    SentimentModel), in place; its head keeps its own initialisation. A bidirectional classifier
    (one layer) takes its reverse direction from `backward`, a language model of the reversed
    reviews (ULMFiT's forward and backward pair, here in one model), and the embedding from `lm`
    (which the backward model should have read, frozen). Raises ValueError naming the first
    setting in which they differ."""
    if model.config.bidirectional and (backward is None or model.config.num_layers != 1):
        raise ValueError("a bidirectional classifier starts from a forward and a backward language model, "
                         "and only with num_layers 1")
    for name in ENCODER_SETTINGS:
        for source in (lm, backward) if model.config.bidirectional else (lm,):
            mine, theirs = getattr(model.config, name), getattr(source.config, name)
            if mine != theirs:
                raise ValueError(f"the language model has {name} = {theirs!r}, the classifier {mine!r}: "
                                 "pretrain with the classifier's settings")
    for name in encoder_names(model.config):
        source = backward if "_reverse." in name else lm       # the embedding: the forward model's
        model.params[name][...] = source.params[name.replace("_reverse.", ".")]
