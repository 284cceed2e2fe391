"""Adversarial training on the embeddings (rnn.model.adversarial_perturbation and the second pass in
SentimentModel.share_loss): the gradient of the embedded input against central differences, the
perturbation's size and direction, and the whole objective's gradient with the perturbation held
fixed (as the method defines it: r is a constant of the step, not differentiated through)."""
from __future__ import annotations

import numpy as np
import pytest

from gradcheck import H_STEP, assert_grad_close, numeric_grad, sample_index
from helpers import TINY, make_model
from rnn.losses import bce_with_logits
from rnn.model import adversarial_perturbation, dense_grad
from test_model import CELL_VARIANTS, VARIANT_IDS, make_batch

E = TINY["embed_dim"]


def loss_at(model, ids, lengths, labels, seed, perturbation=None):
    logits, _ = model.forward(ids, lengths, seed, perturbation=perturbation)
    return bce_with_logits(logits, labels)[0]


def clean_pass(model, ids, lengths, labels, seed):
    """The clean forward and backward: the cache and the gradient of the embedded input (T, B, E)."""
    logits, cache = model.forward(ids, lengths, seed)
    _, dlogits = bce_with_logits(logits, labels)
    _, _, d_embedded = model.backward_to_input(dlogits, cache, input_grad=True)
    return cache, d_embedded


@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_gradient_of_the_embedded_input(variant, frozen):
    model = make_model(*variant, seed=2, biases=0.3, num_layers=2, pooling="mean", dropout=0.3,
                       embed_dropout=0.3, freeze_embedding=frozen)
    ids, lengths, labels = make_batch([2, 5, 1, 4], seed=3)
    _, d_embedded = clean_pass(model, ids, lengths, labels, seed=11)
    perturbation = np.zeros_like(d_embedded)
    num = numeric_grad(lambda: loss_at(model, ids, lengths, labels, 11, perturbation), perturbation)
    assert_grad_close(num, d_embedded, "embedded input")


def test_perturbation_size_direction_and_padding():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(TINY["vocab_size"], E))
    weight[0] = 0
    ids = np.array([[1, 2, 3, 4], [5, 6, 0, 0]])
    lengths = np.array([4, 2])
    g = rng.normal(size=(4, 2, E))
    g[2:, 1] = 0                                         # a padded step has no gradient
    r = adversarial_perturbation(g, weight, ids, lengths, epsilon=0.5)
    for b in range(2):
        rms = np.sqrt(np.sum(weight[ids[b, :lengths[b]]] ** 2) / lengths[b])
        assert np.isclose(np.linalg.norm(r[:, b]), 0.5 * rms)
        cosine = np.sum(r[:, b] * g[:, b]) / (np.linalg.norm(r[:, b]) * np.linalg.norm(g[:, b]))
        assert np.isclose(cosine, 1.0)
    assert not r[2:, 1].any()
    assert not adversarial_perturbation(np.zeros_like(g), weight, ids, lengths, 0.5).any()   # no 0/0


def test_perturbation_raises_the_loss():
    model = make_model("lstm", seed=5, biases=0.3, pooling="concat")
    ids, lengths, labels = make_batch([6, 4, 3], seed=6)
    cache, d_embedded = clean_pass(model, ids, lengths, labels, seed=None)
    enc = cache["encoder"]
    r = adversarial_perturbation(d_embedded, model.params["embedding.weight"], enc["ids"], enc["lengths"], 0.05)
    clean = loss_at(model, ids, lengths, labels, None)
    assert loss_at(model, ids, lengths, labels, None, r) > clean
    random = np.random.default_rng(0).normal(size=r.shape) * np.linalg.norm(r) / np.sqrt(r.size)
    assert loss_at(model, ids, lengths, labels, None, r) - clean > abs(loss_at(model, ids, lengths, labels, None, random) - clean)


@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
def test_adversarial_objective_gradients(variant):
    """share_loss with adversarial training returns L(x) + w L(x + r) and its gradient, r fixed."""
    epsilon, weight, seed = 0.3, 0.7, 17
    model = make_model(*variant, seed=4, biases=0.3, pooling="mean", dropout=0.2, embed_dropout=0.2,
                       adversarial_epsilon=epsilon, adversarial_weight=weight)
    ids, lengths, labels = make_batch([2, 5, 1, 4], seed=8)
    batch = {"ids": ids, "lengths": lengths, "labels": labels}
    loss, grads, extras = model.share_loss(batch, seed, np.arange(4), 4)
    cache, d_embedded = clean_pass(model, ids, lengths, labels, seed)
    enc = cache["encoder"]
    r = adversarial_perturbation(d_embedded, model.params["embedding.weight"], enc["ids"], enc["lengths"], epsilon)

    def objective():
        return loss_at(model, ids, lengths, labels, seed) + weight * loss_at(model, ids, lengths, labels, seed, r)

    assert np.isclose(loss, objective(), rtol=1e-12)
    assert np.array_equal(extras["logits"], model.forward(ids, lengths, seed)[0])   # the clean logits
    rng = np.random.default_rng(0)
    for name, p in model.params.items():
        index = sample_index(p.size, 6, rng)
        if name == "embedding.weight":
            index = np.unique(ids[0, :2])[:, None] * E + np.arange(E)[None]
            index = index.reshape(-1)
        assert_grad_close(numeric_grad(objective, p, index, H_STEP), dense_grad(grads[name]), name)


def test_adversarial_shares_add_up_to_the_batch():
    """Data-parallel workers perturb their own rows: the shares' sum is the whole batch's step."""
    model = make_model("gru", seed=1, pooling="concat", dropout=0.3, adversarial_epsilon=0.5)
    ids, lengths, labels = make_batch([5, 2, 6, 3, 4], seed=2)
    batch = {"ids": ids, "lengths": lengths, "labels": labels}
    loss, grads, _ = model.share_loss(batch, 9, np.arange(5), 5)
    parts = [np.array([0, 3]), np.array([1, 2, 4])]
    shares = [model.share_loss({k: v[rows] for k, v in batch.items()}, 9, rows, 5) for rows in parts]
    assert np.isclose(loss, sum(s[0] for s in shares), rtol=1e-12)
    for name in grads:
        total = sum(dense_grad(s[1][name]) for s in shares)
        np.testing.assert_allclose(total, dense_grad(grads[name]), rtol=1e-10, atol=1e-13)


def test_off_and_inference_change_nothing():
    """epsilon 0 is the plain step, and inference never perturbs."""
    ids, lengths, labels = make_batch([4, 3], seed=3)
    batch = {"ids": ids, "lengths": lengths, "labels": labels}
    plain = make_model("lstm", seed=7, dropout=0.2)
    adv = make_model("lstm", seed=7, dropout=0.2, adversarial_epsilon=1.0)
    a, b = plain.share_loss(batch, 3, np.arange(2), 2), adv.share_loss(batch, 3, np.arange(2), 2)
    assert b[0] > a[0] and np.array_equal(a[2]["logits"], b[2]["logits"])
    assert np.array_equal(plain.logits(ids, lengths), adv.logits(ids, lengths))
    assert np.array_equal(plain.share_loss(batch, None, np.arange(2), 2)[0],
                          adv.share_loss(batch, None, np.arange(2), 2)[0])
