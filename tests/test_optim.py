"""Optimizers against updates computed by hand, their state and sparse (embedding) updates, and
gradient clipping. (That fit's Adam uses the global step across epochs is in test_train.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from rnn.layers import SparseRows
from rnn.optim import SGD, Adam, AdamW, clip_gradients, global_norm, group_norms, make_optimizer

SHAPE = (4, 3)


def grad_sequence(steps=3, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, scale, SHAPE) for _ in range(steps)]


def start_params(seed=1):
    return {"w": np.random.default_rng(seed).normal(0, 1, SHAPE)}


def run(opt, grads, params=None):
    params = params or start_params()
    trajectory = []
    for g in grads:
        opt.step(params, {"w": g.copy()})
        trajectory.append(params["w"].copy())
    return trajectory


# -------------------------------------------------------------------------- reference updates
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_momentum_matches_hand_computed_updates(weight_decay):
    lr, mu = 0.1, 0.9
    grads = grad_sequence()
    got = run(SGD(lr, momentum=mu, weight_decay=weight_decay), grads)
    p, buf = start_params()["w"], np.zeros(SHAPE)
    for k, g in enumerate(grads):
        buf = mu * buf + (g + weight_decay * p)
        p = p - lr * buf
        np.testing.assert_allclose(got[k], p, rtol=1e-13, atol=1e-15, err_msg=f"step {k + 1}")


def test_sgd_without_momentum_is_plain_gradient_descent():
    grads = grad_sequence()
    got = run(SGD(0.5), grads)
    np.testing.assert_allclose(got[-1], start_params()["w"] - 0.5 * sum(grads), rtol=1e-13)


def adam_reference(grads, lr, betas, eps, weight_decay=0.0, decoupled=False, p=None):
    """Kingma & Ba's Algorithm 1 written out; L2 (Adam) or decoupled (AdamW) weight decay."""
    b1, b2 = betas
    p = start_params()["w"] if p is None else p
    m = v = np.zeros(SHAPE)
    out = []
    for t, g in enumerate(grads, start=1):
        if weight_decay and not decoupled:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        if decoupled:
            p = p * (1 - lr * weight_decay)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(p)
    return out


# eps = 0.05 with gradients of size 0.1 makes eps matter: it must be added to sqrt(v_hat).
@pytest.mark.parametrize("cls,decoupled", [(Adam, False), (AdamW, True)], ids=["adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
@pytest.mark.parametrize("eps", [1e-8, 0.05])
def test_adam_matches_hand_computed_updates(cls, decoupled, weight_decay, eps):
    lr, betas = 0.01, (0.8, 0.95)
    grads = grad_sequence(scale=0.1)
    got = run(cls(lr, betas, eps, weight_decay), grads)
    want = adam_reference(grads, lr, betas, eps, weight_decay, decoupled)
    for k in range(len(grads)):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15, err_msg=f"step {k + 1}")


def test_adamw_decay_is_decoupled():
    grads = grad_sequence()
    adam, adamw = run(Adam(0.01, weight_decay=0.5), grads), run(AdamW(0.01, weight_decay=0.5), grads)
    assert not np.allclose(adam[-1], adamw[-1], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(run(Adam(0.01), grads)[-1], run(AdamW(0.01), grads)[-1])
    # with zero gradients only the decay acts: AdamW shrinks by exactly (1 - lr * wd) per step
    zeros = [np.zeros(SHAPE)] * 3
    np.testing.assert_allclose(run(AdamW(0.01, weight_decay=0.5), zeros)[-1],
                               start_params()["w"] * (1 - 0.005) ** 3, rtol=1e-12)


def test_bias_correction_uses_the_optimizer_step_count():
    """Starting from a state whose counter says step 10, the update uses t = 11, not t = 1."""
    grads = grad_sequence(steps=1)
    opt = Adam(0.01)
    opt.load_state_dict({"t": 10, "arrays": {"w/m": np.zeros(SHAPE), "w/v": np.zeros(SHAPE)}})
    got = run(opt, grads)[0]
    g, b1, b2 = grads[0], 0.9, 0.999
    m_hat = (1 - b1) * g / (1 - b1 ** 11)
    v_hat = (1 - b2) * g * g / (1 - b2 ** 11)
    np.testing.assert_allclose(got, start_params()["w"] - 0.01 * m_hat / (np.sqrt(v_hat) + 1e-8),
                               rtol=1e-12)
    assert opt.t == 11


# ------------------------------------------------------------------------------------- state
OPTIMIZERS = {"sgd": lambda: SGD(0.1, momentum=0.9, weight_decay=0.01),
              "adam": lambda: Adam(0.01, weight_decay=0.01),
              "adamw": lambda: AdamW(0.01, weight_decay=0.1)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    rng = np.random.default_rng(3)
    steps = [{"w": rng.normal(size=SHAPE),
              "emb": SparseRows(np.sort(rng.choice(6, 2, replace=False)), rng.normal(size=(2, 3)), (6, 3))}
             for _ in range(5)]

    def copy(g):
        return {"w": g["w"].copy(), "emb": g["emb"]._replace(values=g["emb"].values.copy())}

    a, params_a = OPTIMIZERS[name](), {**start_params(), "emb": rng.normal(size=(6, 3))}
    for g in steps[:2]:
        a.step(params_a, copy(g))
    state = a.state_dict()
    assert state["t"] == 2 and state["arrays"]
    b, params_b = OPTIMIZERS[name](), {k: v.copy() for k, v in params_a.items()}
    b.load_state_dict(state)
    snapshot = {k: v.copy() for k, v in state["arrays"].items()}
    for g in steps[2:]:
        b.step(params_b, copy(g))
    for k, v in a.state_dict()["arrays"].items():          # b does not share a's moments
        np.testing.assert_array_equal(v, snapshot[k])
    for g in steps[2:]:
        a.step(params_a, copy(g))
    for k in params_a:
        np.testing.assert_array_equal(params_a[k], params_b[k])
    assert a.t == b.t == 5


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sparse_update_touches_only_given_rows(name):
    rng = np.random.default_rng(5)
    V, E = 6, 3
    params = {"emb": rng.normal(size=(V, E))}
    before = params["emb"].copy()
    opt = OPTIMIZERS[name]()
    rows = np.array([1, 4])
    for _ in range(3):
        opt.step(params, {"emb": SparseRows(rows, rng.normal(size=(2, E)), (V, E))})
    untouched = np.setdiff1d(np.arange(V), rows)
    np.testing.assert_array_equal(params["emb"][untouched], before[untouched])
    assert np.all(params["emb"][rows] != before[rows])
    for k, st in opt.state_dict()["arrays"].items():
        assert st.shape == (V, E), k
        assert np.all(st[untouched] == 0), f"{k}: state of rows never used must stay zero"


@pytest.mark.parametrize("chunk", [1024, 2])          # 2: the rows are updated in several chunks
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sparse_update_with_all_rows_equals_dense_update(name, chunk, monkeypatch):
    monkeypatch.setattr("rnn.optim.SPARSE_CHUNK", chunk)
    rng = np.random.default_rng(6)
    V, E = 5, 3
    grads = [rng.normal(size=(V, E)) for _ in range(3)]
    start = rng.normal(size=(V, E))
    dense_p, sparse_p = {"emb": start.copy()}, {"emb": start.copy()}
    dense_opt, sparse_opt = OPTIMIZERS[name](), OPTIMIZERS[name]()
    for g in grads:
        dense_opt.step(dense_p, {"emb": g.copy()})
        sparse_opt.step(sparse_p, {"emb": SparseRows(np.arange(V), g.copy(), (V, E))})
    np.testing.assert_allclose(sparse_p["emb"], dense_p["emb"], rtol=1e-14, atol=1e-15)


def test_sparse_adam_is_lazy_on_rows_a_batch_does_not_use():
    """SparseAdam semantics: a row absent from a step keeps its moments and parameters."""
    V, E = 4, 2
    params = {"emb": np.ones((V, E))}
    opt = Adam(0.1)
    opt.step(params, {"emb": SparseRows(np.arange(V), np.full((V, E), 0.5), (V, E))})
    m_before = opt.state_dict()["arrays"]["emb/m"].copy()
    p_before = params["emb"].copy()
    opt.step(params, {"emb": SparseRows(np.array([2]), np.full((1, E), 0.5), (V, E))})
    m_after = opt.state_dict()["arrays"]["emb/m"]
    keep = [0, 1, 3]
    np.testing.assert_array_equal(m_after[keep], m_before[keep])
    np.testing.assert_array_equal(params["emb"][keep], p_before[keep])
    assert np.all(params["emb"][2] != p_before[2])


def test_make_optimizer():
    assert type(make_optimizer("sgd", 0.1)) is SGD and make_optimizer("sgd", 0.1).momentum == 0.9
    opt = make_optimizer("adamw", 0.01, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    assert type(opt) is AdamW and (opt.b1, opt.b2, opt.eps, opt.weight_decay) == (0.8, 0.9, 1e-6, 0.1)
    assert type(make_optimizer("adam", 0.01)) is Adam
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", 0.01)
    for lr in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="learning rate"):
            make_optimizer("adam", lr)


# ----------------------------------------------------------------------------------- clipping
def make_grads(dtype=np.float64):
    rng = np.random.default_rng(7)
    return {"a": rng.normal(0, 3, (3, 4)).astype(dtype), "b": rng.normal(0, 3, 5).astype(dtype),
            "emb": SparseRows(np.array([0, 3]), rng.normal(0, 3, (2, 4)).astype(dtype), (6, 4))}


def flat(grads):
    return np.concatenate([(g.values if isinstance(g, SparseRows) else g).ravel() for g in grads.values()])


def test_norms():
    grads = make_grads()
    norms = group_norms(grads)
    assert norms["emb"] == pytest.approx(np.linalg.norm(grads["emb"].values))
    assert global_norm(grads) == pytest.approx(np.linalg.norm(flat(grads)), rel=1e-12)
    tiny = {"x": np.array([3e-30, 4e-30], np.float32)}       # squares underflow in float32
    assert global_norm(tiny) == pytest.approx(5e-30, rel=1e-6)


def test_clip_norm_rescales_to_threshold_keeping_direction():
    grads = make_grads()
    original = flat(grads)
    norm = np.linalg.norm(original)
    threshold = norm / 4
    rows = grads["emb"].rows.copy()
    pre, post, clipped = clip_gradients(grads, "norm", threshold)
    assert clipped and pre == pytest.approx(norm, rel=1e-12)
    assert post == pytest.approx(threshold, rel=1e-9)
    np.testing.assert_allclose(np.linalg.norm(flat(grads)), threshold, rtol=1e-9)
    np.testing.assert_allclose(flat(grads), original * (threshold / norm), rtol=1e-9)
    np.testing.assert_array_equal(grads["emb"].rows, rows)


def test_clip_norm_below_threshold_leaves_gradients_alone():
    grads = make_grads()
    original = flat(grads)
    pre, post, clipped = clip_gradients(grads, "norm", np.linalg.norm(original) * 1.01)
    assert not clipped and pre == post
    np.testing.assert_array_equal(flat(grads), original)


def test_clip_value_clamps_elementwise():
    grads = make_grads()
    original = flat(grads)
    pre, post, clipped = clip_gradients(grads, "value", 2.0)
    got = flat(grads)
    assert clipped and np.any(np.abs(original) > 2.0)
    np.testing.assert_array_equal(got, np.clip(original, -2.0, 2.0))
    assert pre == pytest.approx(np.linalg.norm(original), rel=1e-12)
    assert post == pytest.approx(np.linalg.norm(got), rel=1e-12) and post < pre
    grads = make_grads()
    pre, post, clipped = clip_gradients(grads, "value", 100.0)
    assert not clipped and pre == post
    np.testing.assert_array_equal(flat(grads), original)


def test_clip_none_leaves_gradients_alone():
    grads = make_grads()
    original = flat(grads)
    pre, post, clipped = clip_gradients(grads, "none", 1e-6)
    assert not clipped and pre == post == pytest.approx(np.linalg.norm(original), rel=1e-12)
    np.testing.assert_array_equal(flat(grads), original)


def test_clip_float32_in_place():
    grads = make_grads(np.float32)
    ids = {k: id(g) for k, g in grads.items()}
    clip_gradients(grads, "norm", 1.0)
    assert {k: id(g) for k, g in grads.items()} == ids
    assert all((g.values if isinstance(g, SparseRows) else g).dtype == np.float32 for g in grads.values())
    assert global_norm(grads) == pytest.approx(1.0, rel=1e-6)


def test_clip_unknown_mode_raises():
    with pytest.raises(ValueError, match="unknown clip mode 'global'"):
        clip_gradients(make_grads(), "global", 1.0)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_lr_scale_slows_the_named_parameters_only(name):
    params = {"encoder": np.ones(3), "head": np.ones(3)}
    grads = {"encoder": np.array([0.5, -1.0, 2.0]), "head": np.array([0.5, -1.0, 2.0])}
    plain, scaled = ({k: v.copy() for k, v in params.items()} for _ in range(2))
    make_optimizer(name, 0.1, momentum=0.0).step(plain, grads)
    make_optimizer(name, 0.1, momentum=0.0, lr_scale={"encoder": 0.25}).step(scaled, grads)
    np.testing.assert_allclose(scaled["head"], plain["head"])
    np.testing.assert_allclose(1 - scaled["encoder"], 0.25 * (1 - plain["encoder"]), rtol=1e-12)
