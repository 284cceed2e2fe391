"""Tests for rnn.text: cleaning, tokenization, vocabulary, truncation, encoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnn.text import (
    PAD,
    UNK,
    TextEncoder,
    Vocabulary,
    clean,
    encode_texts,
    encode_tokenized,
    encoder_difference,
    tokenize,
    truncate,
)


def test_clean_strips_tags_entities_and_case():
    assert clean("Great<br /><br />Film &amp; <i>Fun</i>") == "great  film &  fun "
    assert "<" not in clean("a<br>b")
    assert clean("I <3 it") == "i <3 it"  # not a tag


def test_tokenize_keeps_negations_and_marks():
    assert tokenize("I don't like it. It isn't good!") == [
        "i", "don't", "like", "it", "it", "isn't", "good", "!",
    ]
    assert tokenize("Not bad?? 10/10") == ["not", "bad", "?", "?", "10", "10"]
    assert tokenize("didn\u2019t") == ["didn't"]  # curly apostrophe
    assert tokenize("Café Ñandú, naïve") == ["café", "ñandú", "naïve"]
    assert tokenize("'quoted' -- (parens) ... ; __") == ["quoted", "parens"]
    assert tokenize("line<br />break") == ["line", "break"]


def test_vocab_order_ties_and_specials():
    v = Vocabulary.build([["b", "a", "c", "c"], ["b", "d", "c"]])
    # c:3, then a tie b:2 ... a:1 d:1 alphabetical
    assert v.tokens == ["<pad>", "<unk>", "c", "b", "a", "d"]
    assert v.id("<pad>") == PAD and v.id("<unk>") == UNK
    assert len(v) == 6


def test_vocab_min_freq_and_max_size():
    lists = [["x"] * 5 + ["y"] * 3 + ["z"] * 1 + ["w"] * 3]
    assert Vocabulary.build(lists, min_freq=2).tokens[2:] == ["x", "w", "y"]
    assert Vocabulary.build(lists, max_size=4).tokens[2:] == ["x", "w"]
    assert len(Vocabulary.build(lists, max_size=2)) == 2
    with pytest.raises(ValueError):
        Vocabulary.build(lists, max_size=1)


def test_vocab_encode_unknown_and_round_trip():
    v = Vocabulary.from_texts(["good movie", "bad movie"])
    ids = v.encode(["movie", "unseen"])
    assert ids.dtype == np.int32
    assert ids[1] == UNK and v.tokens[ids[0]] == "movie"
    assert Vocabulary.from_dict(v.to_dict()).tokens == v.tokens
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])


@pytest.mark.parametrize(
    "mode, expected",
    [("head", [0, 1, 2, 3, 4]), ("tail", [5, 6, 7, 8, 9]), ("both", [0, 1, 2, 8, 9])],
)
def test_truncate_modes(mode, expected):
    assert truncate(list(range(10)), 5, mode) == expected
    assert truncate(np.arange(10), 5, mode).tolist() == expected
    assert truncate([1, 2], 5, mode) == [1, 2]


def test_encoder_difference_names_what_differs():
    enc = {"tokens": ["<pad>", "<unk>", "a", "b"], "max_len": 10, "truncate": "head"}
    assert encoder_difference(enc, dict(enc)) is None
    assert encoder_difference(enc, {**enc, "tokens": ["<pad>", "<unk>", "b"]}) == \
        "vocabularies of 4 and 3 tokens, first different at id 2"
    assert encoder_difference(enc, {**enc, "tokens": enc["tokens"][:3]}) == \
        "vocabularies of 4 and 3 tokens, first different at id 3"
    assert encoder_difference(enc, {**enc, "max_len": 12}) == "max_len 10 vs 12"


def test_encode_tokenized_reports_what_the_encoding_lost():
    encoder = TextEncoder(Vocabulary(["<pad>", "<unk>", "good", "film"]), max_len=3, truncate="head")
    arrays, stats = encode_tokenized([["good", "film"], ["good", "odd", "film", "good", "odd"], []], encoder)
    assert arrays["ids"].tolist() == [[2, 3, 0], [2, UNK, 3], [UNK, 0, 0]]
    assert arrays["lengths"].tolist() == [2, 3, 1] and arrays["raw_lengths"].tolist() == [2, 5, 0]
    assert stats["oov_rate"] == 2 / 7 and stats["truncated_fraction"] == 1 / 3
    assert stats["length_percentiles"]["p50"] == 2.0
    assert encode_tokenized([], encoder)[1] == {"oov_rate": 0.0, "truncated_fraction": 0.0,
                                                "length_percentiles": {"p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0}}


def test_truncate_rejects_bad_mode():
    with pytest.raises(ValueError, match="middle"):
        truncate([1, 2, 3], 2, "middle")


def test_encode_texts_padding_and_min_length():
    v = Vocabulary.from_texts(["a b c d e"])
    ids, lengths = encode_texts(["a b", "", "!!! ...", "a b c d e"], v, max_len=3, mode="head")
    assert ids.shape == (4, 3) and ids.dtype == np.int32 and lengths.dtype == np.int32
    assert lengths.tolist() == [2, 1, 3, 3]
    assert ids[1].tolist() == [UNK, PAD, PAD]
    assert ids[0, 2] == PAD
    assert v.decode(ids[3]) == ["a", "b", "c"]


def test_text_encoder_round_trip():
    enc = TextEncoder(Vocabulary.from_texts(["great film", "awful film"]), max_len=4, truncate="tail")
    again = TextEncoder.from_dict(enc.to_dict())
    texts = ["great great awful film film", "nothing known"]
    for a, b in zip(enc.encode(texts), again.encode(texts)):
        np.testing.assert_array_equal(a, b)
    assert enc.encode(texts)[0][0].tolist() == enc.vocab.encode(["great", "awful", "film", "film"]).tolist()
    with pytest.raises(ValueError):
        TextEncoder(enc.vocab, max_len=4, truncate="sideways")


VOCAB = Vocabulary.from_texts(["the great film don't stop ! ?", "awful café 10"])


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenize_never_crashes_and_tokens_are_clean(text):
    for tok in tokenize(text):
        assert tok and not any(ch.isspace() for ch in tok)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=200), max_size=5), st.integers(1, 50), st.sampled_from(["head", "tail", "both"]))
def test_encode_ids_in_range(texts, max_len, mode):
    ids, lengths = encode_texts(texts, VOCAB, max_len, mode)
    assert ids.shape == (len(texts), max_len)
    assert ((ids >= 0) & (ids < len(VOCAB))).all()
    assert ((lengths >= 1) & (lengths <= max_len)).all()
    for row, n in zip(ids, lengths):
        assert (row[:n] != PAD).all() and (row[n:] == PAD).all()
