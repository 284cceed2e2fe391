"""rnn/metrics.py: accuracy by review length (the scores themselves: test_predict.py, test_cli.py)."""

from __future__ import annotations

import numpy as np

from rnn.metrics import length_buckets


def test_length_buckets_bound_labels_and_accuracy():
    lengths = np.array([5, 99, 100, 250, 399, 400, 1000])
    correct = np.array([1, 0, 1, 1, 0, 1, 1], dtype=bool)
    rows = length_buckets(lengths, correct, [100, 200, 400])
    assert [(r["bucket"], r["count"], r["accuracy"]) for r in rows] == [
        ("<100", 2, 0.5), ("100-200", 1, 1.0), ("200-400", 2, 0.5), (">=400", 2, 1.0)]
    assert (rows[1]["min_length"], rows[1]["max_length"], rows[-1]["max_length"]) == (100, 200, None)


def test_length_buckets_leave_out_empty_buckets():
    rows = length_buckets(np.array([10, 20]), np.array([True, False]), [100, 200])
    assert [(r["bucket"], r["count"], r["accuracy"]) for r in rows] == [("<100", 2, 0.5)]
