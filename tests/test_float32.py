"""Training runs in float32, the gradient checks in float64: the same model in both dtypes must give
the same loss and gradients to float32 precision, so that what the checks prove holds for what
training computes (issue 17 item 13).

The float32 model's parameters are the float64 model's rounded once, then the float64 model takes
those exact values back, so only the arithmetic differs. Measured worst relative error of a
parameter's gradient over these variants: 1.0e-6 (30 steps, batch 16). The bound 1e-4 leaves a
margin of 100 and still catches a sum kept in half precision (its resolution is 1e-3) or a
gradient that is not the float64 one at all.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import make_model
from rnn.model import dense_grad

TOLERANCE = 1e-4
VARIANTS = [("rnn", {}), ("rnn", {"pooling": "mean"}), ("gru", {}), ("gru", {"reset_after": True, "pooling": "max"}),
            ("lstm", {}), ("lstm", {"num_layers": 2, "bidirectional": True, "dropout": 0.3}),
            ("lstm", {"pooling": "mean", "forget_bias": 2.0})]


@pytest.mark.parametrize("cell, options", VARIANTS, ids=[f"{c}-{'-'.join(o) or 'last'}" for c, o in VARIANTS])
def test_float32_gradients_agree_with_float64(cell, options):
    rng = np.random.default_rng(0)
    B, T, V = 16, 30, 50
    lengths = rng.integers(1, T + 1, B)
    ids = np.where(np.arange(T) < lengths[:, None], rng.integers(1, V, (B, T)), 0)
    labels = rng.integers(0, 2, B)
    single = make_model(cell, seed=1, vocab_size=V, embed_dim=8, hidden_size=12, **options).astype(np.float32)
    double = single.astype(np.float64)
    # The same dropout masks in both: the same seed draws the same uniforms.
    loss32, grads32, *_ = single.loss(ids, lengths, labels, dropout_seed=2)
    loss64, grads64, *_ = double.loss(ids, lengths, labels, dropout_seed=2)
    assert abs(loss32 - loss64) <= TOLERANCE * abs(loss64)
    assert sorted(grads32) == sorted(grads64)
    for name in grads64:
        g32, g64 = dense_grad(grads32[name]), dense_grad(grads64[name])
        assert g32.dtype == np.float32, f"{name}: float32 training computed a {g32.dtype} gradient"
        error = np.linalg.norm(g32.astype(np.float64) - g64) / max(np.linalg.norm(g64), 1e-12)
        assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"
