"""rnn.nbsvm: the naive-Bayes scaling and the weight interpolation of the NBSVM baseline."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

from rnn.nbsvm import interpolate_weights, nb_ratio


@pytest.mark.parametrize("as_sparse", [False, True])
def test_nb_ratio_is_the_smoothed_log_count_ratio(as_sparse):
    x = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    labels = np.array([1, 1, 0])
    # positive counts + 1: [3, 2, 1] / 6; negative: [1, 1, 2] / 4
    expected = np.log(np.array([3, 2, 1]) / 6) - np.log(np.array([1, 1, 2]) / 4)
    ratio = nb_ratio(sparse.csr_matrix(x) if as_sparse else x, labels, 1.0)
    assert ratio.dtype == np.float32 and ratio.shape == (3,)
    np.testing.assert_allclose(ratio, expected, rtol=1e-6)


def test_interpolate_weights_runs_from_equal_weights_to_the_classifiers():
    w = np.array([2.0, -1.0, 0.0, 3.0])
    np.testing.assert_array_equal(interpolate_weights(w, 1.0), w.astype(np.float32))
    np.testing.assert_array_equal(interpolate_weights(w, 0.0), np.full(4, 1.5, np.float32))     # mean |w|
    np.testing.assert_allclose(interpolate_weights(w, 0.5), [1.75, 0.25, 0.75, 2.25])
    assert interpolate_weights(w, 0.5).dtype == np.float32
