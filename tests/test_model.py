"""The whole model: gradients of SentimentModel.loss against central differences for every cell,
depth, direction, pooling and dropout, plus masking, sorting, gradient traces and initialisation."""
from __future__ import annotations

import itertools
from functools import partial

import numpy as np
import pytest

from gradcheck import H_STEP, assert_directional_close, assert_grad_close, numeric_grad, sample_index
from helpers import TINY, make_model
from rnn.layers import FEW_USES, SparseRows, embedding_backward
from rnn.losses import bce_with_logits
from rnn.model import ModelConfig, SentimentModel, dense_grad
from rnn.recurrent import sequence_forward

V, E, H = TINY["vocab_size"], TINY["embed_dim"], TINY["hidden_size"]
biased_model = partial(make_model, biases=0.3)      # nonzero biases, so that their gradients show
CELL_VARIANTS = [("rnn", False), ("gru", False), ("gru", True), ("lstm", False)]
VARIANT_IDS = ["rnn", "gru", "gru_after", "lstm"]


def make_batch(lengths, seed=0, T=6, pad_id=0):
    """ids (B, T) with real tokens in [1, V-1) and padded positions set to `pad_id`, or with
    pad_id='random' to random non-zero ids, the first of them V-1, a row no real token uses.
    Returns ids, lengths (B,), labels (B,)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    ids = rng.integers(1, V - 1, (len(lengths), T))
    padded = np.arange(T)[None, :] >= lengths[:, None]
    fill = pad_id
    if pad_id == "random":
        fill = rng.integers(1, V, ids.shape)
        fill.reshape(-1)[np.flatnonzero(padded)[:1]] = V - 1
    ids = np.where(padded, fill, ids)
    labels = rng.integers(0, 2, len(lengths))
    return ids, lengths, labels


def forward_loss(model, ids, lengths, labels, dropout_seed, max_positions=None):
    """The loss with the dropout masks that `dropout_seed` draws: the same on every call.

    max_positions: for max pooling, the positions the unperturbed model picked; a perturbation
    that changes them crossed a kink, where a difference quotient says nothing."""
    logits, cache = model.forward(ids, lengths, dropout_seed)
    if max_positions is not None:
        assert np.array_equal(cache["pool"], max_positions), "max pooling switched position: " \
            "the check straddles a kink; pick another seed"
    return bce_with_logits(logits, labels)[0]


def check_model_gradients(model, ids, lengths, labels, dropout_seed, samples=5, seed=0):
    """Every parameter: a per-element check on a sample of elements (for the embedding, elements
    of the rows the batch uses, of row 0 and of rows it uses at most at padded positions, whose
    gradient must be zero) and a directional check of all elements at once."""
    rng = np.random.default_rng(seed)
    loss, grads, _, _ = model.loss(ids, lengths, labels, dropout_seed)
    assert loss == forward_loss(model, ids, lengths, labels, dropout_seed)
    expected = set(model.params) - ({"embedding.weight"} if model.config.freeze_embedding else set())
    assert set(grads) == expected
    positions, h = None, H_STEP
    if model.config.pooling in ("max", "concat"):     # smaller steps keep clear of max pooling's kinks
        positions, h = model.forward(ids, lengths, dropout_seed)[1]["pool"], H_STEP / 10

    def f():
        return forward_loss(model, ids, lengths, labels, dropout_seed, positions)

    for name, p in model.params.items():
        if name not in grads:
            continue
        ana = dense_grad(grads[name])
        if name == "embedding.weight":
            assert isinstance(grads[name], SparseRows)
            used = np.unique(ids[np.arange(ids.shape[1])[None, :] < lengths[:, None]])
            not_real = np.setdiff1d(np.arange(1, V), used)[::-1]     # V-1 first: padding only
            pick = np.concatenate([[0], not_real[:2], rng.choice(used, size=samples)]).astype(int)
            index = pick * E + rng.integers(0, E, pick.size)
        else:
            index = sample_index(p.size, samples, rng)
        assert_grad_close(numeric_grad(f, p, index, h), ana, name)
        assert_directional_close(f, p, ana, name, rng, h=h)


GRID = list(itertools.product(CELL_VARIANTS, [1, 2], [False, True], ["last", "mean", "max"]))


@pytest.mark.parametrize(
    "variant,num_layers,bidirectional,pooling", GRID,
    ids=[f"{VARIANT_IDS[CELL_VARIANTS.index(v)]}-L{n}-{'bi' if b else 'uni'}-{p}" for v, n, b, p in GRID])
def test_model_gradients_with_dropout(variant, num_layers, bidirectional, pooling):
    cell, reset_after = variant
    model = biased_model(cell, reset_after, seed=num_layers, num_layers=num_layers,
                       bidirectional=bidirectional, pooling=pooling, dropout=0.3)
    ids, lengths, labels = make_batch([2, 5, 1, 4], seed=1, pad_id="random")
    check_model_gradients(model, ids, lengths, labels, dropout_seed=123)


@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_model_gradients_concat_pooling_and_embedding_dropout(variant, bidirectional):
    model = biased_model(*variant, seed=8, num_layers=2, bidirectional=bidirectional, pooling="concat",
                       dropout=0.3, embed_dropout=0.4)
    assert model.params["fc.W"].shape == (3 * H * (2 if bidirectional else 1), 1)
    ids, lengths, labels = make_batch([2, 5, 1, 4], seed=4, pad_id="random")
    check_model_gradients(model, ids, lengths, labels, dropout_seed=7)


def test_embedding_dropout_drops_a_feature_for_the_whole_sequence():
    model = biased_model("gru", seed=9, embed_dropout=0.5)
    ids, lengths, _ = make_batch([5, 3], seed=5)
    _, cache = model.forward(ids, lengths, dropout_seed=1)
    mask = cache["encoder"]["embed_mask"]
    assert mask.shape == (2, E) and set(np.unique(mask)) <= {0.0, 2.0} and (mask == 0).any()
    assert model.forward(ids, lengths)[1]["encoder"]["embed_mask"] is None       # inference: none
    assert np.array_equal(model.forward(ids, lengths, dropout_seed=1)[0], model.forward(ids, lengths, 1)[0])


@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
def test_model_gradients_without_dropout_batch_of_one(variant):
    model = biased_model(*variant, seed=3, num_layers=2, bidirectional=True, pooling="mean")
    ids, lengths, labels = make_batch([4], seed=2)
    check_model_gradients(model, ids, lengths, labels, dropout_seed=None)


@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
def test_model_gradients_frozen_embedding(variant):
    model = biased_model(*variant, seed=4, freeze_embedding=True, pooling="max", dropout=0.2)
    ids, lengths, labels = make_batch([3, 5, 2], seed=3)
    _, grads, _, _ = model.loss(ids, lengths, labels, dropout_seed=0)
    assert "embedding.weight" not in grads
    check_model_gradients(model, ids, lengths, labels, dropout_seed=5)


def test_dropout_masks_come_from_the_seed():
    model = biased_model("lstm", num_layers=2, dropout=0.5, seed=5)
    ids, lengths, labels = make_batch([3, 5, 2, 5], seed=4)
    same = [model.forward(ids, lengths, 7)[0] for _ in range(2)]
    np.testing.assert_array_equal(*same)
    other = model.forward(ids, lengths, 8)[0]
    inference = model.forward(ids, lengths)[0]
    assert not np.allclose(same[0], other) and not np.allclose(same[0], inference)
    np.testing.assert_allclose(model.predict_logits(ids, lengths), inference, rtol=1e-12)
    no_dropout = biased_model("lstm", num_layers=2, dropout=0.0, seed=5)
    np.testing.assert_array_equal(no_dropout.forward(ids, lengths, 7)[0],
                                  no_dropout.forward(ids, lengths)[0])


def reference_logits(model, ids, lengths):
    """Each example alone and unpadded through the layers (the reverse direction as the forward
    loop over the flipped sequence), pooled over its real steps: what the model must compute."""
    cfg, p = model.config, model.params
    out = []
    for row, n in zip(ids, lengths):
        X = p["embedding.weight"][row[:n]][:, None, :]                       # (n, 1, E)
        for k in range(cfg.num_layers):
            outs, finals = [], []
            for name in [f"rnn.l{k}", f"rnn.l{k}_reverse"][:cfg.directions]:
                sub = {key.rsplit(".", 1)[1]: v for key, v in p.items() if key.startswith(name + ".")}
                flip = name.endswith("_reverse")
                o, f, _ = sequence_forward(X[::-1] if flip else X, np.array([n]), sub, cfg.kind)
                outs.append(o[::-1] if flip else o)
                finals.append(f[0])
            X = np.concatenate(outs, axis=-1)
        pooled = {"last": np.concatenate(finals, axis=-1)[0], "mean": X.mean(0)[0],
                  "max": X.max(0)[0]}[cfg.pooling]
        out.append(pooled @ p["fc.W"][:, 0] + p["fc.b"][0])
    return np.array(out)


REFERENCE_GRID = list(itertools.product(CELL_VARIANTS, [1, 2], ["last", "mean", "max"]))


@pytest.mark.parametrize(
    "variant,num_layers,pooling", REFERENCE_GRID,
    ids=[f"{VARIANT_IDS[CELL_VARIANTS.index(v)]}-L{n}-{p}" for v, n, p in REFERENCE_GRID])
def test_bidirectional_forward_matches_reference(variant, num_layers, pooling):
    model = biased_model(*variant, seed=14, num_layers=num_layers, bidirectional=True, pooling=pooling)
    ids, lengths, _ = make_batch([2, 6, 1, 5], seed=12)
    np.testing.assert_allclose(model.forward(ids, lengths)[0], reference_logits(model, ids, lengths),
                               rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------- masking
MASK_CONFIGS = [dict(cell="lstm", pooling="mean", bidirectional=True, num_layers=2),
                dict(cell="gru", reset_after=True, pooling="max", bidirectional=True),
                dict(cell="rnn", pooling="last", num_layers=2, bidirectional=True)]


@pytest.mark.parametrize("config", MASK_CONFIGS, ids=["lstm-mean", "gru_after-max", "rnn-last"])
def test_padded_token_ids_change_nothing(config):
    model = biased_model(seed=6, **config)
    ids, lengths, labels = make_batch([2, 6, 3, 1], seed=5, pad_id=0)
    garbage, _, _ = make_batch([2, 6, 3, 1], seed=5, pad_id="random")
    padded = np.arange(ids.shape[1])[None, :] >= lengths[:, None]
    assert np.array_equal(ids[~padded], garbage[~padded]) and np.all(garbage[padded] != 0)
    loss0, grads0, logits0, _ = model.loss(ids, lengths, labels)
    loss1, grads1, logits1, _ = model.loss(garbage, lengths, labels)
    assert loss0 == loss1
    np.testing.assert_array_equal(logits0, logits1)
    for name in grads0:
        np.testing.assert_array_equal(dense_grad(grads0[name]), dense_grad(grads1[name]), err_msg=name)
    only_padded = np.setdiff1d(garbage[padded], garbage[~padded])
    assert V - 1 in only_padded
    assert np.all(dense_grad(grads1["embedding.weight"])[only_padded] == 0)
    assert 0 not in grads0["embedding.weight"].rows


def test_rows_used_only_at_padding_are_not_listed():
    model = biased_model(seed=6, **MASK_CONFIGS[0])
    ids, lengths, labels = make_batch([2, 6, 3, 1], seed=5, pad_id="random")
    _, grads, _, _ = model.loss(ids, lengths, labels)
    padded = np.arange(ids.shape[1])[None, :] >= lengths[:, None]
    np.testing.assert_array_equal(grads["embedding.weight"].rows, np.unique(ids[~padded]))


def test_pad_row_never_gets_a_gradient():
    """Even where id 0 sits inside a sequence, the padding row stays out of the gradient."""
    model = biased_model(seed=7, pooling="mean")
    ids, lengths, labels = make_batch([4, 6, 3], seed=6)
    ids[:, 1] = 0
    _, grads, _, _ = model.loss(ids, lengths, labels, dropout_seed=0)
    g = grads["embedding.weight"]
    assert 0 not in g.rows
    assert len(np.unique(g.rows)) == len(g.rows) and g.values.shape == (len(g.rows), E)
    assert g.shape == (V, E)


def test_embedding_backward_sums_every_use_of_a_row():
    """Rows used once, a few times and more than FEW_USES times (summed by different paths), and
    padding: the sums equal a plain accumulation, in float64 to rounding."""
    rng = np.random.default_rng(3)
    uses = {1: 1, 2: 2, 3: FEW_USES, 4: FEW_USES + 1, 5: 3 * FEW_USES, 0: 7}     # row: how often
    ids = rng.permutation(np.repeat(list(uses), list(uses.values()))).reshape(-1, 3)
    d_out = rng.normal(size=(*ids.shape, 4))
    g = embedding_backward(d_out, ids, (10, 4))
    want = np.zeros((10, 4))
    np.add.at(want, ids.reshape(-1), d_out.reshape(-1, 4))
    np.testing.assert_array_equal(g.rows, [1, 2, 3, 4, 5])
    np.testing.assert_allclose(g.values, want[1:6], rtol=1e-12, atol=0)
    assert g.values.dtype == d_out.dtype and g.shape == (10, 4)
    empty = embedding_backward(d_out[:1, :1], np.zeros((1, 1), int), (10, 4))
    assert empty.rows.size == 0 and empty.values.shape == (0, 4)


# ----------------------------------------------------------------------- sorting and batching
SORT_CONFIGS = [dict(cell="lstm", pooling="last", bidirectional=True, num_layers=2),
                dict(cell="gru", reset_after=True, pooling="mean"),
                dict(cell="rnn", pooling="max", bidirectional=True)]


@pytest.mark.parametrize("config", SORT_CONFIGS, ids=["lstm-last", "gru_after-mean", "rnn-max"])
def test_batch_equals_examples_run_alone(config):
    """The model sorts by length internally; the caller's order is kept, and each example's
    logit and gradient are what it gives alone (the batch gradient is their mean)."""
    model = biased_model(seed=8, **config)
    ids, lengths, labels = make_batch([2, 6, 1, 6, 4], seed=7)
    loss, grads, logits, _ = model.loss(ids, lengths, labels)
    mean_grads = {k: 0.0 for k in grads}
    losses = []
    for b in range(len(lengths)):
        l_b, g_b, logit_b, _ = model.loss(ids[b:b + 1], lengths[b:b + 1], labels[b:b + 1])
        np.testing.assert_allclose(logits[b], logit_b[0], rtol=1e-12)
        losses.append(l_b)
        for k in grads:
            mean_grads[k] = mean_grads[k] + dense_grad(g_b[k]) / len(lengths)
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-12)
    for k in grads:
        np.testing.assert_allclose(dense_grad(grads[k]), mean_grads[k], rtol=1e-10, atol=1e-14,
                                   err_msg=k)
    perm = np.random.default_rng(0).permutation(len(lengths))
    np.testing.assert_allclose(model.forward(ids[perm], lengths[perm])[0], logits[perm], rtol=1e-12)
    np.testing.assert_allclose(model.predict_logits(ids, lengths, batch_size=2), logits, rtol=1e-12)
    np.testing.assert_allclose(model.predict_proba(ids, lengths), 1 / (1 + np.exp(-logits)), rtol=1e-12)


@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
def test_batch_of_one_in_float32(variant):
    model = biased_model(*variant, seed=9, dtype=np.float32, dropout=0.3, num_layers=2)
    ids, lengths, labels = make_batch([1], seed=8)
    loss, grads, logits, traces = model.loss(ids, lengths, labels, dropout_seed=0, trace=True)
    assert logits.shape == (1,) and np.isfinite(loss)
    for name, g in grads.items():
        values = g.values if isinstance(g, SparseRows) else g
        assert values.dtype == np.float32 and np.all(np.isfinite(values)), name
    assert traces["a"][1][0] == 1


def test_forward_validates_lengths():
    model = biased_model(seed=10)
    ids, lengths, _ = make_batch([3, 2], seed=9)
    with pytest.raises(ValueError, match="at least one token"):
        model.forward(ids, np.array([3, 0]))


# --------------------------------------------------------------------------- gradient traces
@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_trace_with_last_pooling(variant, bidirectional):
    """At distance 0 the trace is the batch-mean norm of dL/d(final state); the count at distance
    d is the number of sequences longer than d."""
    model = biased_model(*variant, seed=11, dtype=np.float32, bidirectional=bidirectional)
    ids, lengths, labels = make_batch([2, 6, 1, 6, 4], seed=10)
    loss, grads, logits, traces = model.loss(ids, lengths, labels, trace=True)
    _, dlogits = bce_with_logits(logits.astype(np.float64), labels)
    d_final = dlogits[:, None] * model.params["fc.W"][:H, 0].astype(np.float64)[None, :]
    sums, counts = traces["a"]
    assert sums.dtype == np.float64
    np.testing.assert_array_equal(counts, [(lengths > d).sum() for d in range(lengths.max())])
    np.testing.assert_allclose(sums[0] / counts[0], np.linalg.norm(d_final, axis=1).mean(), rtol=1e-5)
    assert np.all(sums[counts > 0] > 0)
    if variant[0] == "lstm":
        c_sums, c_counts = traces["c"]
        np.testing.assert_array_equal(c_counts, counts)
        assert c_sums[0] == 0, "the final cell state reaches the classifier only through a"


def test_no_trace_unless_asked():
    model = biased_model(seed=12)
    ids, lengths, labels = make_batch([3, 2], seed=11)
    assert model.loss(ids, lengths, labels)[3] is None


# ------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
def test_init_is_reproducible_and_seed_dependent(variant):
    cfg = ModelConfig(vocab_size=50, cell=variant[0], reset_after=variant[1], embed_dim=4,
                      hidden_size=5, num_layers=2, bidirectional=True)
    a = SentimentModel.create(cfg, np.random.default_rng(0)).params
    b = SentimentModel.create(cfg, np.random.default_rng(0)).params
    c = SentimentModel.create(cfg, np.random.default_rng(1)).params
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == np.float32 and a[name].flags.c_contiguous, name
        assert a[name].tobytes() == b[name].tobytes(), name
        if name.endswith(("W_x", "W_h", "weight", "fc.W")):
            assert not np.array_equal(a[name], c[name]), name
    assert np.all(a["embedding.weight"][0] == 0)


def test_init_biases_and_recurrent_weights():
    cfg = ModelConfig(vocab_size=20, cell="lstm", embed_dim=4, hidden_size=5, forget_bias=1.5)
    p = SentimentModel.create(cfg, np.random.default_rng(0)).params
    b = p["rnn.l0.b"]
    np.testing.assert_array_equal(b[5:10], 1.5)                      # gate order i, f, o, g
    np.testing.assert_array_equal(np.delete(b, np.s_[5:10]), 0)
    W_h = p["rnn.l0.W_h"].astype(np.float64)
    for k in range(4):                                              # each gate block orthogonal
        block = W_h[:, 5 * k:5 * (k + 1)]
        np.testing.assert_allclose(block.T @ block, np.eye(5), atol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_init_input_weights_are_glorot_uniform(cell):
    """Whether Glorot is taken per gate block (D + H) or over the fused matrix (D + G*H), no input
    weight may exceed sqrt(6 / (D + H)); fc.W (F, 1) is bounded by sqrt(6 / (F + 1))."""
    D, H = 10, 40
    cfg = ModelConfig(vocab_size=5, cell=cell, embed_dim=D, hidden_size=H)
    p = SentimentModel.create(cfg, np.random.default_rng(0)).params
    assert np.abs(p["fc.W"]).max() <= np.sqrt(6 / (H + 1))
    assert np.abs(p["rnn.l0.W_x"]).max() <= np.sqrt(6 / (D + H))


def test_init_with_pretrained_embeddings():
    cfg = ModelConfig(vocab_size=6, embed_dim=3, hidden_size=2)
    emb = np.arange(18, dtype=np.float64).reshape(6, 3) + 1
    model = SentimentModel.create(cfg, np.random.default_rng(0), embeddings=emb)
    np.testing.assert_array_equal(model.params["embedding.weight"][1:], emb[1:])
    assert np.all(model.params["embedding.weight"][0] == 0) and emb[0, 0] == 1, "copy, PAD row zeroed"
    with pytest.raises(ValueError, match="shape"):
        SentimentModel.create(cfg, np.random.default_rng(0), embeddings=emb[:5])


def test_astype_copies():
    model = biased_model(seed=13, dtype=np.float32)
    wide = model.astype(np.float64)
    assert wide.config.dtype == "float64" and model.config.dtype == "float32"
    for name, p in wide.params.items():
        assert p.dtype == np.float64
        np.testing.assert_array_equal(p, model.params[name])
        assert not np.shares_memory(p, model.params[name])


@pytest.mark.parametrize("config", SORT_CONFIGS, ids=["lstm-last", "gru_after-mean", "rnn-max"])
def test_dropout_masks_do_not_depend_on_the_split(config):
    """With dropout on, any split of a batch into shares (each told its rows' positions and the
    batch size) gives every row the logit it has in the whole batch, and shares' losses and
    gradients add up to the batch's: a row's masks come from (seed, position) only."""
    model = biased_model(seed=8, dropout=0.4, **config)
    ids, lengths, labels = make_batch([2, 6, 1, 6, 4], seed=7)
    loss, grads, logits, _ = model.loss(ids, lengths, labels, dropout_seed=11)
    assert not np.allclose(logits, model.forward(ids, lengths)[0]), "dropout must be on"
    for shares in ([[0, 1, 2, 3, 4]], [[3], [0, 4], [1, 2]], [[4, 2, 0], [3, 1]]):
        total_loss, total = 0.0, {k: 0.0 for k in grads}
        for rows in shares:
            rows = np.array(rows)
            batch = {"ids": ids[rows], "lengths": lengths[rows], "labels": labels[rows]}
            l_s, g_s, extras = model.share_loss(batch, 11, rows, len(lengths))
            np.testing.assert_allclose(extras["logits"], logits[rows], rtol=1e-12)
            total_loss += l_s
            total = {k: total[k] + dense_grad(g_s[k]) for k in grads}
        np.testing.assert_allclose(total_loss, loss, rtol=1e-12)
        for k in grads:
            np.testing.assert_allclose(total[k], dense_grad(grads[k]), rtol=1e-10, atol=1e-14, err_msg=k)
    other = model.loss(ids, lengths, labels, dropout_seed=12)[2]
    assert not np.allclose(other, logits), "another seed, other masks"
