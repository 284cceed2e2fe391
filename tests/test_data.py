"""rnn/data.py: the validation split and the language models' corpus."""

from __future__ import annotations

import numpy as np
import pytest

from rnn.data import language_model_corpus, stratified_split


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.9])
def test_stratified_split_partitions_each_class_in_proportion(fraction):
    labels = np.array([1] * 30 + [0] * 10 + [1] * 10)
    train, val = stratified_split(labels, fraction, np.random.default_rng(0))
    assert np.array_equal(np.sort(np.r_[train, val]), np.arange(50))          # a partition
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)            # sorted
    for label, n in ((1, 40), (0, 10)):
        # Every class in both parts, else its rounded share.
        assert (labels[val] == label).sum() == min(max(round(n * fraction), 1), n - 1)


def test_stratified_split_follows_the_generator():
    labels = np.arange(40) % 2
    one, two = (stratified_split(labels, 0.25, np.random.default_rng(3)) for _ in range(2))
    other = stratified_split(labels, 0.25, np.random.default_rng(4))
    assert np.array_equal(one[1], two[1]) and not np.array_equal(one[1], other[1])


def test_language_model_corpus_stacks_parts_and_drops_one_token_reviews():
    a_ids, a_len = np.array([[5, 6, 0], [7, 0, 0]], np.int32), np.array([2, 1], np.int32)
    b_ids, b_len = np.array([[8, 9, 10, 11, 12], [3, 4, 0, 0, 0]], np.int32), np.array([5, 2], np.int32)
    ids, lengths = language_model_corpus([(a_ids, a_len), (b_ids, b_len)], None, np.random.default_rng(0))
    assert ids.dtype == np.int32 and ids.shape == (3, 5) and lengths.tolist() == [2, 5, 2]
    assert ids.tolist() == [[5, 6, 0, 0, 0], [8, 9, 10, 11, 12], [3, 4, 0, 0, 0]]


def test_language_model_corpus_token_budget_is_a_seeded_subset_in_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 20, 200).astype(np.int32)
    ids = (np.arange(20)[None, :] < lengths[:, None]) * np.arange(1, 201)[:, None]   # row i holds i + 1
    kept, kept_lengths = language_model_corpus([(ids, lengths)], 500, np.random.default_rng(7))
    assert 500 - 20 < kept_lengths.sum() <= 500
    rows = kept[:, 0] - 1
    assert np.all(np.diff(rows) > 0) and np.array_equal(kept_lengths, lengths[rows])
    again = language_model_corpus([(ids, lengths)], 500, np.random.default_rng(7))[0]
    other = language_model_corpus([(ids, lengths)], 500, np.random.default_rng(8))[0]
    assert np.array_equal(kept, again) and not np.array_equal(kept, other)
