"""The models: a shared encoder (embedding -> recurrent layers) under one of two heads.

    SentimentModel   many-to-one: encoder -> pooling -> dropout -> dense -> one logit (the article's
                     sentiment classifier)
    LanguageModel    many-to-many (rnn/lm.py): encoder -> dropout -> output layer at every step,
                     predicting the next token; pretrains the encoder for the classifier

Parameters live in one flat dict of named arrays, so optimizers, clipping, checkpoints and the
PyTorch converter are each one loop over it:

    embedding.weight            (V, E)           row 0 is padding and stays zero
    rnn.l{k}.W_x                (D_k, G*H)       D_0 = E; D_k = H (or 2H if bidirectional)
    rnn.l{k}.W_h                (H, G*H)
    rnn.l{k}.b                  (G*H,)
    rnn.l{k}.b_hn               (H,)             GRU with reset_after only
    rnn.l{k}_reverse.*                           the reverse direction, if bidirectional
    fc.W                        (F, 1)           classifier: F = H (2H if bidirectional, 3x for concat)
    fc.b                        (1,)
    lm.W                        (V, H)           language model: the output layer
    lm.b                        (V,)

The encoder's names are the same in both, so a language model's encoder loads into a classifier.
"""
from __future__ import annotations

import numpy as np

from .config import GATES, ModelConfig
from .layers import (SparseRows, dense_backward, dense_forward, embedding_backward, embedding_forward,
                     row_dropout_mask, row_generators)
from .losses import bce_with_logits, sigmoid
from .parallel import LocalRunner, WorkerPool, resolve_workers
from .recurrent import sequence_backward, sequence_forward

def layer_names(config: ModelConfig) -> list[str]:
    """Prefixes of the recurrent sub-layers, bottom up, forward before reverse."""
    return [f"rnn.l{k}{sfx}" for k in range(config.num_layers)
            for sfx in ("", "_reverse")[:config.directions]]


def parameter_shapes(config: ModelConfig) -> dict[str, tuple]:
    """The name and shape of every parameter: what a model file must contain."""
    H, G = config.hidden_size, GATES[config.cell]
    shapes = {"embedding.weight": (config.vocab_size, config.embed_dim)}
    for name in layer_names(config):
        k = int(name.split(".l")[1].split("_")[0])
        D = config.embed_dim if k == 0 else H * config.directions
        shapes.update({f"{name}.W_x": (D, G * H), f"{name}.W_h": (H, G * H), f"{name}.b": (G * H,)})
        if config.kind == "gru_after":
            shapes[f"{name}.b_hn"] = (H,)
    if config.task == "language_model":
        shapes.update({"lm.W": (config.vocab_size, H), "lm.b": (config.vocab_size,)})
    else:
        width = H * config.directions * (3 if config.pooling == "concat" else 1)
        shapes.update({"fc.W": (width, 1), "fc.b": (1,)})
    return shapes


def encoder_names(config: ModelConfig) -> list[str]:
    """The parameters a language model hands to a classifier: the embedding and recurrent layers."""
    return [name for name in parameter_shapes(config) if not name.startswith(("fc.", "lm."))]


def init_params(config: ModelConfig, rng: np.random.Generator,
                embeddings: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Glorot-uniform input weights, orthogonal recurrent blocks (they keep the gradient's scale
    through many steps at initialisation), zero biases but the LSTM forget gate's."""
    dtype = np.dtype(config.dtype)
    H = config.hidden_size
    params = {}
    for name, shape in parameter_shapes(config).items():
        if name == "embedding.weight":
            if embeddings is not None:
                if embeddings.shape != shape:
                    raise ValueError(f"embeddings have shape {embeddings.shape}, expected {shape}")
                w = np.array(embeddings, dtype=dtype)
            else:
                w = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
            w[0] = 0
        elif name.endswith(".W_h"):
            w = np.concatenate([_orthogonal(H, rng) for _ in range(shape[1] // H)], axis=1)
        elif name.endswith((".W_x", "fc.W", "lm.W")):
            fan_in, fan_out = ((shape[1], shape[0]) if name == "lm.W" else   # lm.W is (V, H): rows are words
                               (shape[0], H if name.endswith("W_x") else shape[1]))   # W_x: per gate block
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-limit, limit, shape)
        else:
            w = np.zeros(shape)
            if config.cell == "lstm" and name.startswith("rnn.") and name.endswith(".b"):
                w[H:2 * H] = config.forget_bias      # gate order i, f, o, g
        params[name] = np.ascontiguousarray(w, dtype=dtype)
    return params


def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def checked_params(config: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parameters `config` needs, taken from `params`; ValueError naming a missing one or a
    wrong shape."""
    expected = parameter_shapes(config)
    missing = set(expected) - set(params)
    if missing:
        raise ValueError(f"missing parameters: {', '.join(sorted(missing))}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, expected {shape}")
    return {name: params[name] for name in expected}


class Model:
    """What both models are: a config of their task and a flat dict of parameters."""

    task: str                 # the config's task a model class serves

    def __init__(self, config: ModelConfig, params: dict[str, np.ndarray]):
        if config.task != self.task:
            raise ValueError(f"{type(self).__name__} needs a config with task {self.task!r}, "
                             f"got {config.task!r}")
        self.config = config
        self.params = checked_params(config, params)

    @classmethod
    def create(cls, config: ModelConfig, rng: np.random.Generator, embeddings: np.ndarray | None = None):
        """A new model, its parameters from `init_params`."""
        return cls(config, init_params(config, rng, embeddings))

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def astype(self, dtype):
        """A copy with every parameter in `dtype` (float64 for gradient checks)."""
        config = ModelConfig.from_dict({**self.config.to_dict(), "dtype": np.dtype(dtype).name})
        return type(self)(config, {k: v.astype(dtype) for k, v in self.params.items()})


class SentimentModel(Model):
    """The classifier: forward, backward and prediction."""

    task = "sentiment"

    # ----------------------------------------------------------------------------- forward
    def forward(self, ids: np.ndarray, lengths: np.ndarray, dropout_seed: int | None = None,
                keep_cache: bool = True, positions: np.ndarray | None = None,
                perturbation: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """ids: (B, T) token ids, right-padded with 0; lengths: (B,) real lengths, each >= 1.

        `dropout_seed` turns dropout on (training); None is inference. The masks of a row are
        drawn from (dropout_seed, its position in the batch) alone, positions (B,) being 0..B-1
        unless given: a worker that runs some rows of a batch draws what the whole batch would.
        `perturbation` (T', B, E), in the cache's sorted order (T' the longest length), is added
        to the embedded input (adversarial training). Returns logits (B,) and the cache for
        `backward` (without `keep_cache`, nothing a backward pass would need is kept)."""
        cfg, p = self.config, self.params
        order, ids, lengths, rngs = sort_batch(cfg, ids, lengths, dropout_seed, positions)
        X, finals, enc = encode(cfg, p, ids, lengths, rngs, keep_cache, perturbation)
        pooled, pool_cache = _pool(cfg.pooling, X, finals, lengths)
        fc_mask = row_dropout_mask(pooled.shape, cfg.dropout, rngs, X.dtype) if rngs is not None else None
        fc_in = pooled * fc_mask if fc_mask is not None else pooled
        logits_sorted = dense_forward(fc_in, p["fc.W"], p["fc.b"])[:, 0]
        logits = np.empty_like(logits_sorted)
        logits[order] = logits_sorted
        cache = dict(order=order, encoder=enc, pool=pool_cache, fc_mask=fc_mask, fc_in=fc_in,
                     out_shape=X.shape)
        return logits, cache

    # ---------------------------------------------------------------------------- backward
    def backward(self, dlogits: np.ndarray, cache: dict, trace: bool = False
                 ) -> tuple[dict, dict | None]:
        """dlogits: (B,) gradient of the loss w.r.t. the logits from `forward`.

        Returns the gradient of every trainable parameter (the embedding's as `SparseRows`) and,
        when `trace` is set, the per-timestep trace of the bottom forward layer (`align_trace`)."""
        grads, traces, d_embedded = self.backward_to_input(dlogits, cache, trace)
        return {**grads, **embedding_gradient(self.config, self.params, d_embedded, cache["encoder"])}, traces

    def backward_to_input(self, dlogits: np.ndarray, cache: dict, trace: bool = False,
                          input_grad: bool | None = None) -> tuple[dict, dict | None, np.ndarray | None]:
        """`backward` down to the embedded input: the gradients of every parameter but the
        embedding, the trace, and the gradient of the embedded input (T', B, E) in the cache's
        sorted order (None when the embedding is frozen, unless `input_grad`)."""
        cfg, p, c = self.config, self.params, cache
        d_sorted = dlogits[c["order"]].astype(p["fc.W"].dtype)[:, None]
        d_fc_in, dW, db = dense_backward(d_sorted, c["fc_in"], p["fc.W"])
        d_pooled = d_fc_in * c["fc_mask"] if c["fc_mask"] is not None else d_fc_in
        d_out, d_finals = _pool_backward(cfg.pooling, d_pooled, c["pool"], c["out_shape"],
                                         c["encoder"]["lengths"], cfg.directions)
        grads, traces, d_embedded = layers_backward(cfg, d_out, d_finals, c["encoder"], trace, input_grad)
        return {"fc.W": dW, "fc.b": db, **grads}, traces, d_embedded

    # ------------------------------------------------------------------------- conveniences
    def loss(self, ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
             dropout_seed: int | None = None, trace: bool = False
             ) -> tuple[float, dict, np.ndarray, dict | None]:
        """One training step's computation on a whole batch: returns (loss, grads, logits, trace).
        `dropout_seed` turns dropout on (see `forward`)."""
        B = len(lengths)
        batch = {"ids": ids, "lengths": lengths, "labels": labels}
        loss, grads, extras = self.share_loss(batch, dropout_seed, np.arange(B), B, trace)
        return loss, grads, extras["logits"], extras["trace"]

    @staticmethod
    def loss_denominator(lengths: np.ndarray) -> int:
        """What the loss of a batch of sequences of these lengths is a mean over: its examples."""
        return len(lengths)

    def share_loss(self, batch: dict, seed: int | None, positions: np.ndarray, total: int,
                   trace: bool = False) -> tuple[float, dict, dict]:
        """Loss and gradients of some rows of a training batch: the part of data-parallel training
        that knows the model (rnn.parallel runs it in each worker).

        batch: these rows' "ids" (n, T), "lengths" (n,) and "labels" (n,); seed: the step's seed,
        from which the dropout masks come; positions: (n,) the rows' places in the whole batch;
        total: the whole batch's size. The loss and gradients are sums over these rows divided by
        `total`, so the shares of a batch add up to the batch mean. Returns (loss, grads, extras),
        extras = {"logits": (n,), "trace": per-timestep trace sums and counts or None}.
        """
        cfg = self.config
        ids, lengths, labels = batch["ids"], batch["lengths"], batch["labels"]
        logits, cache = self.forward(ids, lengths, seed, positions=positions)
        loss, dlogits = _share_loss(logits, labels, total)
        if not (cfg.adversarial_epsilon > 0 and seed is not None):
            grads, traces = self.backward(dlogits, cache, trace)
            return loss, grads, {"logits": logits, "trace": traces}
        # Adversarial training: the loss again at the input moved the way that raises it most.
        grads, traces, d_embedded = self.backward_to_input(dlogits, cache, trace, input_grad=True)
        enc = cache["encoder"]
        r = adversarial_perturbation(d_embedded, self.params["embedding.weight"], enc["ids"], enc["lengths"],
                                     cfg.adversarial_epsilon)
        adv_logits, adv_cache = self.forward(ids, lengths, seed, positions=positions, perturbation=r)
        adv_loss, d_adv = _share_loss(adv_logits, labels, total)
        weight = d_adv.dtype.type(cfg.adversarial_weight)
        adv_grads, _, d_adv_embedded = self.backward_to_input(d_adv * weight, adv_cache, input_grad=True)
        grads = {k: g + adv_grads[k] for k, g in grads.items()}
        grads.update(embedding_gradient(cfg, self.params, d_embedded + d_adv_embedded, enc))
        return loss + cfg.adversarial_weight * adv_loss, grads, {"logits": logits, "trace": traces}

    def logits(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits (B,) of one batch, ids (B, T) and lengths (B,): inference, nothing kept."""
        return self.forward(ids, lengths, keep_cache=False)[0]

    def predict_logits(self, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 256,
                       workers: int | str = 1) -> np.ndarray:
        """Logits (N,) for many sequences, in batches of similar length (inference, no dropout).

        With workers > 1 (or "auto": all cores) the batches are spread over up to that many worker
        processes (no more than there are batches), started for this call in about a second; see
        rnn.parallel, whose WorkerPool serves many calls from one set of workers."""
        workers = min(resolve_workers(workers), -(-len(lengths) // batch_size))
        if workers > 1:
            with WorkerPool(self, workers) as pool:
                return pool.predict_logits(ids, lengths, batch_size)
        return LocalRunner(self).predict_logits(ids, lengths, batch_size)

    def predict_proba(self, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 256,
                      workers: int | str = 1) -> np.ndarray:
        """P(positive) (N,)."""
        return sigmoid(self.predict_logits(ids, lengths, batch_size, workers))


# ------------------------------------------------------------------------------------ encoder
def sort_batch(config: ModelConfig, ids: np.ndarray, lengths: np.ndarray, dropout_seed: int | None,
               positions: np.ndarray | None) -> tuple:
    """The batch sorted longest first, as the recurrent loop needs it (its active prefix).

    ids: (B, T); lengths: (B,). Returns (order (B,), ids (B, T') with T' the longest length and
    padding set to PAD whatever it held, lengths (B,) sorted, and one dropout Generator per row,
    keyed on (dropout_seed, the row's unsorted position), or None without a seed or dropout)."""
    lengths = np.asarray(lengths)
    if lengths.size and lengths.min() < 1:
        raise ValueError("every sequence needs at least one token (encode empty text as UNK)")
    order = np.argsort(-lengths, kind="stable")
    rngs = None
    if dropout_seed is not None and (config.dropout > 0 or config.embed_dropout > 0):
        positions = np.arange(len(lengths)) if positions is None else np.asarray(positions)
        rngs = row_generators(dropout_seed, positions[order])
    lengths = lengths[order]
    T = int(lengths[0]) if lengths.size else 0
    ids = ids[order, :T]
    ids = np.where(np.arange(T) < lengths[:, None], ids, 0)
    return order, ids, lengths, rngs


def encode(config: ModelConfig, params: dict, ids: np.ndarray, lengths: np.ndarray,
           rngs: list | None = None, keep_cache: bool = True, perturbation: np.ndarray | None = None
           ) -> tuple[np.ndarray, list, dict]:
    """Embedding -> recurrent layers, over a batch from `sort_batch`.

    ids: (B, T); lengths: (B,) longest first; rngs: per-row dropout generators (training) or None;
    perturbation: (T, B, E) added to the embedded input after its dropout, or None.
    Returns the top layer's outputs (T, B, F) (F = H, or 2H bidirectional), its final states
    [per direction] (B, H), and the cache for `encode_backward`."""
    cfg, p = config, params
    X = embedding_forward(p["embedding.weight"], ids.T)          # (T, B, E)
    dtype = X.dtype
    embed_mask = None
    if rngs is not None and cfg.embed_dropout > 0:
        embed_mask = row_dropout_mask((len(lengths), X.shape[2]), cfg.embed_dropout, rngs, dtype)
        X = X * embed_mask[None]
    if perturbation is not None:
        X = X + perturbation.astype(dtype, copy=False)
    layers, masks = [], []
    for k in range(cfg.num_layers):
        outs, finals = [], []
        for d, name in enumerate(layer_names(cfg)[k * cfg.directions:(k + 1) * cfg.directions]):
            sub = {key.rsplit(".", 1)[1]: v for key, v in p.items() if key.startswith(name + ".")}
            out, final, cache = sequence_forward(X, lengths, sub, cfg.kind, reverse=d == 1,
                                                 keep_cache=keep_cache)
            outs.append(out)
            finals.append(final[0])
            layers.append(cache)
        X = np.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
        if k < cfg.num_layers - 1 and rngs is not None and cfg.dropout > 0:
            masks.append(row_dropout_mask(X.shape, cfg.dropout, rngs, dtype, lengths))
            X = X * masks[-1]
    return X, finals, dict(ids=ids, lengths=lengths, layers=layers, masks=masks, embed_mask=embed_mask)


def encode_backward(config: ModelConfig, params: dict, d_out: np.ndarray | None, d_finals: list | None,
                    cache: dict, trace: bool = False) -> tuple[dict, dict | None]:
    """Backward of `encode`: d_out (T, B, F) gradient of the top outputs, or None; d_finals: of the
    top final states [per direction] (B, H), or None. Returns the gradients of the embedding (as
    SparseRows, unless frozen) and recurrent parameters, and the bottom layer's trace (see
    rnn.recurrent.align_trace) when `trace` is set."""
    grads, traces, d_embedded = layers_backward(config, d_out, d_finals, cache, trace)
    return {**grads, **embedding_gradient(config, params, d_embedded, cache)}, traces


def layers_backward(config: ModelConfig, d_out: np.ndarray | None, d_finals: list | None, cache: dict,
                    trace: bool = False, input_grad: bool | None = None
                    ) -> tuple[dict, dict | None, np.ndarray | None]:
    """`encode_backward` through the recurrent layers only: their gradients, the trace, and the
    gradient of the embedded input (T, B, E), computed when the embedding trains or `input_grad`
    asks for it (else None)."""
    cfg, c = config, cache
    names, traces, grads = layer_names(cfg), None, {}
    H = cfg.hidden_size
    if input_grad is None:
        input_grad = not cfg.freeze_embedding
    for k in range(cfg.num_layers - 1, -1, -1):
        if k < cfg.num_layers - 1 and c["masks"]:
            d_out = d_out * c["masks"][k]
        d_in = None
        for d in range(cfg.directions):
            idx = k * cfg.directions + d
            d_o = None if d_out is None else d_out[..., d * H:(d + 1) * H]
            d_f = (d_finals[d], None) if d_finals is not None else None
            dX, g, _, tr = sequence_backward(d_o, d_f, c["layers"][idx], trace and idx == 0, k > 0 or input_grad)
            grads.update({f"{names[idx]}.{key}": v for key, v in g.items()})
            traces = tr if idx == 0 else traces
            d_in = dX if d_in is None else d_in + dX
        d_out, d_finals = d_in, None
    return grads, traces, d_out


def embedding_gradient(config: ModelConfig, params: dict, d_embedded: np.ndarray | None, cache: dict) -> dict:
    """{"embedding.weight": SparseRows} from the gradient of the embedded input (T, B, E) (through
    the embedding dropout), or {} when the embedding is frozen."""
    if config.freeze_embedding:
        return {}
    if cache["embed_mask"] is not None:
        d_embedded = d_embedded * cache["embed_mask"][None]
    return {"embedding.weight": embedding_backward(d_embedded, cache["ids"].T, params["embedding.weight"].shape)}


def adversarial_perturbation(d_embedded: np.ndarray, weight: np.ndarray, ids: np.ndarray, lengths: np.ndarray,
                             epsilon: float) -> np.ndarray:
    """The perturbation r (T, B, E) of an embedded batch that raises the loss most to first order
    (Goodfellow et al. 2015; Miyato et al. 2017 on word embeddings): r = eps * s_b * g / ||g||,
    the norm over each review's whole sequence, s_b the root-mean-square norm of its word vectors
    (so that epsilon means the same whatever scale the embedding has or grows to).

    d_embedded: (T, B, E) gradient g of the loss w.r.t. the embedded input; weight: (V, E) the
    embedding; ids: (B, T) and lengths: (B,) the sorted batch. Padded steps get no perturbation."""
    g_norm = np.sqrt(np.einsum("tbe,tbe->b", d_embedded, d_embedded, dtype=np.float64))
    rows = weight[ids]                                          # (B, T, E); padding rows are zero
    scale = np.sqrt(np.einsum("bte,bte->b", rows, rows, dtype=np.float64) / lengths)
    factor = epsilon * scale / np.maximum(g_norm, np.finfo(np.float64).tiny)
    return d_embedded * factor.astype(d_embedded.dtype)[None, :, None]


# ------------------------------------------------------------------------------------ pooling
def _pool(mode: str, X: np.ndarray, finals: list, lengths: np.ndarray):
    """Classifier input (B, F) ((B, 3F) for concat) from the top layer's outputs X (T, B, F) or
    its final states."""
    if mode == "last":
        return (np.concatenate(finals, axis=-1) if len(finals) > 1 else finals[0]), None
    if mode == "mean":
        return X.sum(0) / lengths[:, None].astype(X.dtype), None
    if mode == "concat":
        parts = [_pool(m, X, finals, lengths) for m in ("last", "mean", "max")]
        return np.concatenate([v for v, _ in parts], axis=-1), parts[2][1]
    padded = np.arange(X.shape[0])[:, None] >= lengths[None, :]          # (T, B)
    masked = np.where(padded[:, :, None], -np.inf, X)
    arg = masked.argmax(0)                                               # (B, F)
    return np.take_along_axis(X, arg[None], 0)[0], arg


def _pool_backward(mode, d_pooled, pool_cache, out_shape, lengths, directions):
    """Gradient of the pooling: per-step output gradients (T, B, F) and/or final-state gradients."""
    if mode == "last":
        return None, np.split(d_pooled, directions, axis=-1)
    T, B, F = out_shape
    if mode == "concat":
        d_last, d_mean, d_max = np.split(d_pooled, 3, axis=-1)
        d_out = _pool_backward("mean", d_mean, None, out_shape, lengths, directions)[0]
        d_out = d_out + _pool_backward("max", d_max, pool_cache, out_shape, lengths, directions)[0]
        return d_out, _pool_backward("last", d_last, None, out_shape, lengths, directions)[1]
    if mode == "mean":
        valid = (np.arange(T)[:, None] < lengths[None, :])[:, :, None]
        return valid * (d_pooled / lengths[:, None].astype(d_pooled.dtype)), None
    d_out = np.zeros(out_shape, d_pooled.dtype)
    np.put_along_axis(d_out, pool_cache[None], d_pooled[None], 0)
    return d_out, None


def _share_loss(logits: np.ndarray, labels: np.ndarray, total: int) -> tuple[float, np.ndarray]:
    """Binary cross-entropy of some rows of a batch as their part of the batch mean, and its
    gradient w.r.t. their logits (n,)."""
    loss, dlogits = bce_with_logits(logits, labels)
    if len(logits) != total:
        scale = len(logits) / total
        loss, dlogits = loss * scale, dlogits * dlogits.dtype.type(scale)
    return loss, dlogits


def dense_grad(g) -> np.ndarray:
    """A gradient as a dense array, whether it is one already or `SparseRows`."""
    return g.to_dense() if isinstance(g, SparseRows) else g
