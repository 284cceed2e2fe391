"""rnn.predict (loading, predicting, explaining) and rnn.metrics, on a toy model trained here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rnn
from rnn.io import save_model
from rnn.metrics import binary_metrics, roc_auc, roc_curve
from rnn.predict import Predictor, load_model
from rnn.text import TextEncoder, Vocabulary

POS, NEG = ["great", "wonderful"], ["awful", "boring"]
FILLER = "the movie plot was and a film actor story it".split()


def toy_sentences(rng: np.random.Generator, n: int) -> tuple[list[str], np.ndarray]:
    """Filler sentences of 4-9 words with exactly one sentiment word, which decides the label."""
    texts, labels = [], rng.integers(0, 2, n)
    for y in labels:
        words = list(rng.choice(FILLER, int(rng.integers(3, 9))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(POS if y else NEG)))
        texts.append(" ".join(words))
    return texts, labels


def train_toy_model(folder: Path, seed: int = 0) -> Path:
    """Train a small mean-pooled LSTM until it separates the toy sentences; save it to `folder`."""
    rng = np.random.default_rng(seed)
    encoder = TextEncoder(Vocabulary(["<pad>", "<unk>", *POS, *NEG, *FILLER]), max_len=12, truncate="head")

    def dataset(n):
        texts, labels = toy_sentences(rng, n)
        return rnn.Dataset(*encoder.encode(texts), labels)

    train, val = dataset(400), dataset(100)
    config = rnn.ModelConfig(vocab_size=len(encoder.vocab), cell="lstm", embed_dim=8, hidden_size=8,
                             pooling="mean")
    model = rnn.SentimentModel.create(config, rng)
    run = rnn.fit(model, rnn.make_optimizer("adam", 0.05), train, val,
                  rnn.TrainConfig(epochs=10, batch_size=32, patience=0, trace=False), rng)
    assert run["best_val_accuracy"] == 1.0, run["history"]
    save_model(folder, model, encoder=encoder.to_dict(), metadata={"note": "toy"})
    return folder


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return load_model(train_toy_model(tmp_path_factory.mktemp("model") / "lstm"))


def test_load_model_keeps_model_and_encoder(predictor):
    assert predictor.model.config.cell == "lstm"
    assert predictor.encoder.max_len == 12 and "great" in predictor.encoder.vocab
    assert predictor.metadata == {"note": "toy"}


def test_predict_labels_and_probabilities(predictor):
    texts = ["the movie was great", "it was a boring film", "wonderful story", "awful"]
    probs = predictor.predict_proba(texts)
    assert probs.shape == (4,) and probs.dtype == np.float64
    assert list(probs > 0.5) == [True, False, True, False]
    labels = predictor.predict(texts)
    assert [label for label, _ in labels] == ["positive", "negative", "positive", "negative"]
    # The probability is that of the predicted label.
    assert [p for _, p in labels] == pytest.approx([probs[0], 1 - probs[1], probs[2], 1 - probs[3]])


def test_predict_handles_empty_unknown_and_very_long_texts(predictor):
    texts = ["", "   \n", "zzz qqq", "great " * 5000, "<br /> !!"]
    probs = predictor.predict_proba(texts)
    assert np.isfinite(probs).all() and probs[3] > 0.9
    # Empty and whitespace-only texts both become [UNK], like an unknown word.
    assert probs[0] == probs[1] == pytest.approx(predictor.predict_proba(["zzz"])[0])


def test_predict_rejects_a_single_string(predictor):
    with pytest.raises(TypeError, match="list of texts"):
        predictor.predict_proba("the movie was great")


@pytest.mark.parametrize("word", POS + NEG)
def test_explain_puts_the_deciding_word_first(predictor, word):
    text = f"the movie was {word} and the plot"
    words = predictor.explain(text)
    assert [w for w, _ in words] == text.split()
    top, score = max(words, key=lambda ws: abs(ws[1]))
    assert top == word and (score > 0) == (word in POS)


def test_explain_is_the_leave_one_out_change_in_logit(predictor):
    tokens = "a film with a wonderful actor".split()
    full = predictor.logits([" ".join(tokens)])[0]
    without = predictor.logits([" ".join(tokens[:i] + tokens[i + 1:]) for i in range(len(tokens))])
    scores = [s for _, s in predictor.explain(" ".join(tokens))]
    np.testing.assert_allclose(scores, full - without, rtol=1e-5, atol=1e-5)


def test_explain_edge_cases(predictor):
    assert predictor.explain("") == [] and predictor.explain("  .,; ") == []
    [(word, score)] = predictor.explain("Great!")[:1]
    assert word == "great" and score > 0
    # A single word is compared with the empty text, which encodes as [UNK].
    only = predictor.explain("boring")[0][1]
    assert only == pytest.approx(predictor.logits(["boring"])[0] - predictor.logits([""])[0], abs=1e-5)
    # Only the tokens the model reads (max_len = 12, head) are explained.
    long = predictor.explain(" ".join(["film"] * 30 + ["great"]))
    assert len(long) == 12 and all(w == "film" for w, _ in long)


def test_load_model_errors(tmp_path, predictor):
    with pytest.raises(ValueError, match="no such model folder"):
        load_model(tmp_path / "missing")
    folder = tmp_path / "bare"
    save_model(folder, predictor.model)          # no encoder
    with pytest.raises(ValueError, match="trained without a text encoder"):
        load_model(folder)
    small = TextEncoder(Vocabulary(["<pad>", "<unk>", "great"]), max_len=5)
    save_model(folder, predictor.model, encoder=small.to_dict())
    with pytest.raises(ValueError, match="encoder has 3 tokens, model expects"):
        load_model(folder)


def test_package_exports():
    assert rnn.load_model is load_model and rnn.Predictor is Predictor


# ------------------------------------------------------------------------------------ metrics
def test_binary_metrics_hand_computed():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.5, 0.8]
    m = binary_metrics(y, p)
    # predicted positive (p >= 0.5): 0.9 0.6 0.7 0.5 0.8 -> tp 3 (0.9, 0.6, 0.8), fp 2 (0.7, 0.5)
    assert m["confusion"] == [[2, 2], [1, 3]]
    assert m["n"] == 8 and m["accuracy"] == 5 / 8
    assert m["precision"] == 3 / 5 and m["recall"] == 3 / 4
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    # Pairs (positive, negative) ranked correctly: 0.9 beats 4, 0.8 beats 4, 0.6 beats 3, 0.4 beats 2.
    assert m["roc_auc"] == pytest.approx(13 / 16)
    expected_loss = -np.mean(np.log([0.9, 0.6, 0.4, 0.3, 0.8, 0.9, 0.5, 0.8]))
    assert m["log_loss"] == pytest.approx(expected_loss)
    assert binary_metrics(y, p, threshold=0.65)["confusion"] == [[3, 1], [2, 2]]


def test_roc_auc_ties_and_extremes():
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5                    # a tie counts one half
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8]) == pytest.approx(7 / 8)
    assert roc_auc([0, 1, 1], [0.1, 0.7, 0.9]) == 1.0
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert roc_auc([1, 1], [0.2, 0.3]) is None                   # one class only
    m = binary_metrics([0, 0], [0.1, 0.2])
    assert m["precision"] == m["recall"] == m["f1"] == 0.0 and m["roc_auc"] is None
    assert m["accuracy"] == 1.0


def test_log_loss_is_finite_for_confident_mistakes():
    assert 30 < binary_metrics([1, 0], [0.0, 1.0])["log_loss"] < 40


def test_roc_curve_hand_computed():
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.1])
    # The area under the (unthinned) curve is the rank statistic.
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.4, 0.8]))


def test_roc_curve_thinning_keeps_both_ends():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 1000), rng.random(1000)
    fpr, tpr, thr = roc_curve(y, p, max_points=50)
    assert len(fpr) == len(tpr) == len(thr) == 50
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)


@pytest.mark.parametrize("labels, probs, message", [
    ([], [], "no examples"),
    ([0, 1], [0.5], "equal length"),
    ([0, 2], [0.5, 0.5], "0 or 1"),
    ([0, 1], [0.5, 1.5], r"\[0, 1\]"),
    ([0, 1], [0.5, np.nan], "finite"),
])
def test_metrics_reject_bad_input(labels, probs, message):
    with pytest.raises(ValueError, match=message):
        binary_metrics(labels, probs)


def test_metrics_agree_with_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for trial in range(50):
        n = int(rng.integers(2, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = rng.integers(0, 5, n) / 4 if trial % 2 else rng.random(n)     # many ties, or none
        m = binary_metrics(y, p)
        pred = (p >= 0.5).astype(int)
        assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
        assert m["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
        assert m["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
        assert m["log_loss"] == pytest.approx(skm.log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)))
        assert m["confusion"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
        fpr, tpr, thr = roc_curve(y, p, max_points=10_000)
        sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, p, drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)
        np.testing.assert_allclose(thr[1:], sk_thr[1:])
