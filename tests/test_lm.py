"""The language model (rnn/lm.py): gradients of the sampled-softmax training loss against central
differences for every cell, exactness of the next-token shift, perplexity, generation, and the
encoder a classifier inherits from it."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from gradcheck import assert_directional_close, assert_grad_close, numeric_grad, sample_index
from helpers import make_model
from rnn.lm import LanguageModel, _shift
from rnn.losses import softmax_cross_entropy
from rnn.model import ModelConfig, dense_grad, encoder_names
from rnn.losses import PAD

V, E, H = 12, 3, 4
CELL_VARIANTS = [("rnn", False), ("gru", False), ("gru", True), ("lstm", False)]
VARIANT_IDS = ["rnn", "gru", "gru_after", "lstm"]


make_lm = partial(make_model, task="language_model", biases=0.3, vocab_size=V, embed_dim=E, hidden_size=H,
                  num_sampled=6)


def make_batch(lengths, seed=0, T=7):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    ids = rng.integers(1, V, (len(lengths), T))
    ids[np.arange(T)[None, :] >= lengths[:, None]] = rng.integers(1, V)     # padding holds junk
    return {"ids": ids, "lengths": lengths}


def test_shift_pairs_each_token_with_the_next():
    ids = np.array([[5, 6, 7, 9], [4, 3, 0, 0], [8, 2, 2, 2]])
    inputs, lengths, targets = _shift(ids, np.array([4, 2, 1]))
    assert lengths.tolist() == [3, 1, 1]
    assert inputs.tolist() == [[5, 6, 7, 0], [4, 0, 0, 0], [8, 0, 0, 0]]
    assert targets.tolist() == [[6, 7, 9, 0], [3, 0, 0, 0], [0, 0, 0, 0]]    # PAD: nothing to predict
    assert LanguageModel.loss_denominator(np.array([4, 2, 1])) == 4


@pytest.mark.parametrize("variant", CELL_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("layers", [1, 2])
def test_sampled_loss_gradients(variant, layers):
    model = make_lm(*variant, seed=layers, num_layers=layers, dropout=0.3, embed_dropout=0.2)
    batch = make_batch([5, 2, 7, 1], seed=layers)
    positions, total, seed = np.arange(4), LanguageModel.loss_denominator(batch["lengths"]), 11
    loss, grads, extras = model.share_loss(batch, seed, positions, total)
    assert extras["predictions"] == total == 4 + 1 + 6
    assert set(grads) == set(model.params)
    rng = np.random.default_rng(0)

    def f():
        return model.share_loss(batch, seed, positions, total)[0]

    for name, p in model.params.items():
        ana = dense_grad(grads[name])
        index = sample_index(p.size, 6, rng)
        if name in ("embedding.weight", "lm.W", "lm.b"):               # sparse: some touched rows too
            rows = np.flatnonzero(np.abs(ana).reshape(p.shape[0], -1).sum(1))
            index = np.unique(np.r_[index, rows[:4] * (p.size // p.shape[0])])
        assert_grad_close(numeric_grad(f, p, index), ana, name)
        assert_directional_close(f, p, ana, name, rng)


def test_shares_of_a_batch_add_up_to_the_batch():
    model = make_lm("gru", seed=3, dropout=0.4)
    batch = make_batch([6, 3, 7, 2, 5], seed=4)
    total = LanguageModel.loss_denominator(batch["lengths"])
    whole, grads, _ = model.share_loss(batch, 5, np.arange(5), total)
    parts = [model.share_loss({k: v[rows] for k, v in batch.items()}, 5, rows, total)
             for rows in (np.array([0, 3]), np.array([1, 2, 4]))]
    assert np.isclose(whole, sum(p[0] for p in parts), rtol=1e-12)
    for name in grads:
        added = sum(dense_grad(p[1][name]) for p in parts)
        np.testing.assert_allclose(added, dense_grad(grads[name]), rtol=1e-12, atol=1e-15)


def test_nll_is_the_full_softmax_of_each_next_token():
    model = make_lm("lstm", seed=6)
    batch = make_batch([6, 3, 1], seed=7)
    total, count = model.nll(batch["ids"], batch["lengths"])
    assert count == 5 + 2
    # By hand: run the whole batch, read the hidden state before each prediction.
    inputs, lengths, targets = _shift(batch["ids"], batch["lengths"])
    expected = 0.0
    for row in range(3):
        L = int(lengths[row])
        X = model.params["embedding.weight"][inputs[row, :L]][:, None]
        from rnn.recurrent import sequence_forward
        sub = {k.rsplit(".", 1)[1]: v for k, v in model.params.items() if k.startswith("rnn.l0.")}
        out = sequence_forward(X, np.array([L]), sub, "lstm")[0][:, 0]
        logits = out @ model.params["lm.W"].T + model.params["lm.b"]
        logits[:, PAD] = -np.inf
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        t = targets[row, :L]
        expected -= sum(logp[i, t[i]] for i in range(L) if t[i] != PAD)
    assert np.isclose(total, expected, rtol=1e-12)
    assert np.isclose(model.perplexity(batch["ids"], batch["lengths"], batch_size=2), np.exp(expected / 7))


def test_sampled_loss_tends_to_the_full_softmax_with_every_word_as_candidate():
    # With K far above V every word is drawn: the sampled loss differs from the full one only by
    # the log-count corrections, which vanish in expectation; checked loosely on one draw.
    model = make_lm("rnn", seed=8, num_sampled=20000)
    batch = make_batch([7, 7, 7], seed=9)
    sampled = model.share_loss(batch, 3, np.arange(3), LanguageModel.loss_denominator(batch["lengths"]))[0]
    full_sum, count = model.nll(batch["ids"], batch["lengths"])
    assert abs(sampled - full_sum / count) < 0.05


def test_generation_is_reproducible_for_a_seed_and_continues_the_state():
    model = make_lm("gru", seed=10, dtype=np.float32)
    prompt = np.array([3, 4, 5])
    a = model.generate(prompt, 8, 0.8, np.random.default_rng(0))
    b = model.generate(prompt, 8, 0.8, np.random.default_rng(0))
    assert a.tolist() == b.tolist() and len(a) == 8 and not set(a.tolist()) & {0, 1}
    assert model.generate(prompt, 8, 0.8, np.random.default_rng(1)).tolist() != a.tolist()
    # Greedy: each token is the argmax after reading the prompt and the tokens before it.
    greedy = model.generate(prompt, 3, 0.0, np.random.default_rng(0))
    seq = list(prompt)
    for token in greedy:
        ids = np.array([seq + [1]])                       # the last id is only a placeholder target
        inputs, lengths, _ = _shift(ids, np.array([len(seq) + 1]))
        from rnn.model import encode, sort_batch
        _, ids_s, lengths_s, _ = sort_batch(model.config, inputs, lengths, None, None)
        X = encode(model.config, model.params, ids_s, lengths_s, keep_cache=False)[0]
        logits = X[-1, 0] @ model.params["lm.W"].T + model.params["lm.b"]
        logits[[0, 1]] = -np.inf
        assert token == int(np.argmax(logits))
        seq.append(int(token))


def test_language_model_configs_are_checked():
    with pytest.raises(ValueError, match="bidirectional"):
        ModelConfig(vocab_size=V, task="language_model", bidirectional=True)
    with pytest.raises(ValueError, match="task 'language_model'"):
        LanguageModel(ModelConfig(vocab_size=V), {})
    cfg = ModelConfig(vocab_size=V, embed_dim=E, hidden_size=H, task="language_model")
    assert encoder_names(cfg) == ["embedding.weight", "rnn.l0.W_x", "rnn.l0.W_h", "rnn.l0.b"]
    assert softmax_cross_entropy is not None


def counting_corpus(n: int, seed: int, T: int = 9) -> "Dataset":
    """Sequences that count upwards from a random word (wrapping after V-1 back to 2): each next
    token is determined by the current one, so a language model can learn the corpus exactly."""
    from rnn.train import Dataset

    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, n)
    start = rng.integers(2, V, n)
    ids = (start[:, None] - 2 + np.arange(T)[None, :]) % (V - 2) + 2
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return Dataset(ids, lengths, np.zeros(n, np.int8))


def test_fit_trains_a_language_model_and_keeps_its_best_perplexity():
    from rnn.optim import Adam
    from rnn.train import TrainConfig, evaluate, fit

    model = make_lm("gru", seed=11, dtype=np.float32, hidden_size=16, num_sampled=8)
    train, val = counting_corpus(256, 1), counting_corpus(64, 2)
    before = evaluate(model, val)["perplexity"]
    result = fit(model, Adam(0.03), train, val, TrainConfig(epochs=4, batch_size=32, trace=False, patience=0),
                 np.random.default_rng(0))
    perplexities = [r["val_perplexity"] for r in result["history"]]
    assert before > 5 and min(perplexities) < 1.5, (before, perplexities)
    assert result["best_val_accuracy"] is None and "train_accuracy" not in result["history"][0]
    assert evaluate(model, val)["perplexity"] == pytest.approx(min(perplexities), rel=1e-6)


def test_language_model_gradients_agree_across_worker_counts():
    from rnn.parallel import LocalRunner, WorkerPool

    data = counting_corpus(24, 3)._asdict()
    rows, seed = np.array([3, 17, 5, 0, 9, 21, 11]), 99
    model = make_lm("lstm", seed=12, dropout=0.3, embed_dropout=0.2)
    loss1, grads1, _ = LocalRunner(model, data).gradients(rows, seed)
    with WorkerPool(make_lm("lstm", seed=12, dropout=0.3, embed_dropout=0.2), 2, data) as pool:
        loss2, grads2, shares = pool.gradients(rows, seed)
        ppl = make_lm("lstm", seed=12).perplexity(data["ids"], data["lengths"], 5)
        assert pool.model.perplexity(data["ids"], data["lengths"], 5, runner=pool) == pytest.approx(ppl, rel=1e-12)
    assert len(shares) == 2 and abs(loss1 - loss2) <= 1e-12 * abs(loss1)
    for name in grads1:
        a, b = dense_grad(grads1[name]), dense_grad(grads2[name])
        assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(a)), name


def test_a_classifier_started_from_the_language_model_reads_with_its_encoder():
    from rnn.lm import load_encoder
    from rnn.model import encode, sort_batch

    lm = make_lm("lstm", seed=13, num_layers=2)
    classifier = make_model("lstm", vocab_size=V, embed_dim=E, hidden_size=H, num_layers=2, pooling="last")
    head = {k: classifier.params[k].copy() for k in ("fc.W", "fc.b")}
    load_encoder(classifier, lm)
    batch = make_batch([6, 3, 7], seed=14)
    _, cache = classifier.forward(batch["ids"], batch["lengths"])        # the first forward pass
    order, ids, lengths, _ = sort_batch(lm.config, batch["ids"], batch["lengths"], None, None)
    _, finals, _ = encode(lm.config, lm.params, ids, lengths)
    np.testing.assert_array_equal(cache["fc_in"], finals[0])            # the LM's state at the last token
    assert all(np.array_equal(classifier.params[k], v) for k, v in head.items())   # the head is its own
    wider = make_model("lstm", vocab_size=V, embed_dim=E, hidden_size=H + 1)
    with pytest.raises(ValueError, match="hidden_size = 4, the classifier 5"):
        load_encoder(wider, lm)


def test_a_bidirectional_classifier_reads_backward_with_the_backward_language_model():
    """Its reverse direction on a review is the backward model reading the reversed review."""
    from rnn.lm import reverse_sequences
    from rnn.lm import load_encoder
    from rnn.model import encode, sort_batch

    forward, backward = make_lm("gru", seed=15), make_lm("gru", seed=16)
    backward.params["embedding.weight"][...] = forward.params["embedding.weight"]   # pretrain's way
    classifier = make_model("gru", vocab_size=V, embed_dim=E, hidden_size=H, bidirectional=True, pooling="last")
    with pytest.raises(ValueError, match="forward and a backward language model"):
        load_encoder(classifier, forward)
    load_encoder(classifier, forward, backward)
    batch = make_batch([6, 3, 7], seed=17)
    _, cache = classifier.forward(batch["ids"], batch["lengths"])
    for lm, ids, half in ((forward, batch["ids"], 0), (backward, reverse_sequences(batch["ids"], batch["lengths"]), 1)):
        _, ids_sorted, lengths, _ = sort_batch(lm.config, ids, batch["lengths"], None, None)
        _, finals, _ = encode(lm.config, lm.params, ids_sorted, lengths)
        np.testing.assert_allclose(cache["fc_in"][:, half * H:(half + 1) * H], finals[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(classifier.params["embedding.weight"], forward.params["embedding.weight"])
    deep = make_model("gru", vocab_size=V, embed_dim=E, hidden_size=H, bidirectional=True, num_layers=2)
    with pytest.raises(ValueError, match="only with num_layers 1"):
        load_encoder(deep, make_lm("gru", seed=1, num_layers=2), make_lm("gru", seed=2, num_layers=2))


def test_reverse_sequences_reverses_within_each_length():
    from rnn.lm import reverse_sequences

    ids = np.array([[1, 2, 3, 0], [4, 5, 6, 7], [8, 0, 0, 0]])
    out = reverse_sequences(ids, np.array([3, 4, 1]))
    assert out.tolist() == [[3, 2, 1, 0], [7, 6, 5, 4], [8, 0, 0, 0]]
    assert np.array_equal(reverse_sequences(out, np.array([3, 4, 1])), ids)


def test_the_output_bias_can_start_at_the_words_log_frequencies():
    from rnn.lm import token_counts, unigram_log_probs

    ids = np.array([[2, 3, 3, 0], [3, 5, 0, 0]])
    counts = token_counts(ids, np.array([3, 2]), V)
    assert counts[[0, 2, 3, 5]].tolist() == [0, 1, 3, 1] and counts.sum() == 5
    config = ModelConfig(vocab_size=V, embed_dim=E, hidden_size=H, task="language_model")
    model = LanguageModel.create(config, np.random.default_rng(0), token_counts=counts)
    bias = model.params["lm.b"]
    assert bias.dtype == np.float32 and np.allclose(np.exp(unigram_log_probs(counts)).sum(), 1.0)
    assert bias[3] > bias[2] == bias[5] > bias[4]                 # seen 3 times > once > never
    np.testing.assert_allclose(bias, unigram_log_probs(counts), rtol=1e-6)
    assert np.all(LanguageModel.create(config, np.random.default_rng(0)).params["lm.b"] == 0)
