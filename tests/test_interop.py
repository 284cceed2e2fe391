"""rnn.interop without torch: exact round trips, torch's names and shapes, gate order, refusals."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from helpers import make_model
from rnn.interop import (from_torch_model_state, from_torch_state_dict, to_torch_model_state,
                         to_torch_state_dict, torch_module_spec)
from rnn.model import SentimentModel

V, E, H = 30, 5, 4
CELL_CONFIGS = [("rnn", False), ("gru", True), ("lstm", False)]


# biases are mostly zero at init: random ones make every entry distinct, so a misplaced block shows
make = partial(make_model, biases=1.0, vocab_size=V, embed_dim=E, hidden_size=H)


@pytest.mark.parametrize("cell,reset_after", CELL_CONFIGS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_round_trip_is_exact(cell, reset_after, num_layers, bidirectional):
    model = make(cell, reset_after, num_layers=num_layers, bidirectional=bidirectional)
    cfg, params = model.config, model.params
    back = from_torch_state_dict(cfg, to_torch_state_dict(cfg, params))
    recurrent = {k: v for k, v in params.items() if k.startswith("rnn.")}
    assert back.keys() == recurrent.keys()
    for k, v in recurrent.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
        assert back[k].dtype == v.dtype

    full = from_torch_model_state(cfg, to_torch_model_state(cfg, params))
    assert full.keys() == params.keys()
    for k, v in params.items():
        np.testing.assert_array_equal(full[k], v, err_msg=k)
    SentimentModel(cfg, full)                # loads


def expected_torch_shapes(G: int, num_layers: int, bidirectional: bool) -> dict[str, tuple]:
    """Written out as torch.nn.RNN/GRU/LSTM name their parameters."""
    shapes = {}
    for k in range(num_layers):
        D = E if k == 0 else H * (2 if bidirectional else 1)
        for sfx in ["", "_reverse"][:1 + bidirectional]:
            shapes[f"weight_ih_l{k}{sfx}"] = (G * H, D)
            shapes[f"weight_hh_l{k}{sfx}"] = (G * H, H)
            shapes[f"bias_ih_l{k}{sfx}"] = (G * H,)
            shapes[f"bias_hh_l{k}{sfx}"] = (G * H,)
    return shapes


@pytest.mark.parametrize("cell,reset_after,G", [("rnn", False, 1), ("gru", True, 3), ("lstm", False, 4)])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_names_and_shapes_are_torchs(cell, reset_after, G, num_layers, bidirectional):
    model = make(cell, reset_after, num_layers=num_layers, bidirectional=bidirectional)
    state = to_torch_state_dict(model.config, model.params)
    assert {k: v.shape for k, v in state.items()} == expected_torch_shapes(G, num_layers, bidirectional)
    assert all(v.flags.c_contiguous for v in state.values())   # torch.from_numpy needs no copy

    full = to_torch_model_state(model.config, model.params)
    F = H * (2 if bidirectional else 1)
    assert full["embedding.weight"].shape == (V, E)
    assert full["fc.weight"].shape == (1, F) and full["fc.bias"].shape == (1,)
    assert set(full) == {"embedding.weight", "fc.weight", "fc.bias"} | {"rnn." + k for k in state}

    name, kwargs = torch_module_spec(model.config)
    assert name == {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}[cell]
    assert kwargs["batch_first"] and kwargs["hidden_size"] == H and kwargs["input_size"] == E
    assert kwargs.get("nonlinearity", "tanh") == "tanh"


def test_lstm_gate_blocks_move_to_torch_order():
    model = make("lstm")
    W_x, W_h, b = (model.params[f"rnn.l0.{n}"] for n in ("W_x", "W_h", "b"))
    state = to_torch_state_dict(model.config, model.params)
    for torch_block, ours in enumerate([0, 1, 3, 2]):         # torch i, f, g, o <- ours i, f, o, g
        t, o = slice(torch_block * H, (torch_block + 1) * H), slice(ours * H, (ours + 1) * H)
        np.testing.assert_array_equal(state["weight_ih_l0"][t], W_x[:, o].T)
        np.testing.assert_array_equal(state["weight_hh_l0"][t], W_h[:, o].T)
        np.testing.assert_array_equal(state["bias_ih_l0"][t], b[o])
    np.testing.assert_array_equal(state["bias_hh_l0"], 0)


def test_gru_biases_split_and_fold():
    model = make("gru", reset_after=True)
    cfg, p = model.config, model.params
    state = to_torch_state_dict(cfg, p)
    np.testing.assert_array_equal(state["bias_ih_l0"], p["rnn.l0.b"])
    np.testing.assert_array_equal(state["bias_hh_l0"], np.r_[np.zeros(2 * H), p["rnn.l0.b_hn"]])

    rng = np.random.default_rng(5)
    b_ih, b_hh = rng.normal(size=3 * H), rng.normal(size=3 * H)
    back = from_torch_state_dict(cfg, {**state, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh})
    np.testing.assert_allclose(back["rnn.l0.b"], np.r_[b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]])
    np.testing.assert_array_equal(back["rnn.l0.b_hn"], b_hh[2 * H:])


def test_import_folds_both_biases_and_casts_to_config_dtype():
    model = make("lstm", dtype="float32")
    state = {k: v.astype(np.float64) for k, v in to_torch_state_dict(model.config, model.params).items()}
    state["bias_hh_l0"] = np.arange(4 * H, dtype=np.float64)
    back = from_torch_state_dict(model.config, state)
    assert all(v.dtype == np.float32 for v in back.values())
    reordered = np.r_[np.arange(2 * H), np.arange(3 * H, 4 * H), np.arange(2 * H, 3 * H)]
    np.testing.assert_allclose(back["rnn.l0.b"], model.params["rnn.l0.b"] + reordered, rtol=1e-6)


def test_article_gru_refuses_to_convert():
    model = make("gru", reset_after=False)
    for call in (lambda: to_torch_state_dict(model.config, model.params),
                 lambda: to_torch_model_state(model.config, model.params),
                 lambda: from_torch_state_dict(model.config, {}),
                 lambda: torch_module_spec(model.config)):
        with pytest.raises(ValueError, match="reset_after=True"):
            call()


def test_mismatched_state_is_refused():
    model = make("lstm", num_layers=2)
    state = to_torch_state_dict(model.config, model.params)
    with pytest.raises(ValueError, match="missing.*bias_hh_l1"):
        from_torch_state_dict(model.config, {k: v for k, v in state.items() if k != "bias_hh_l1"})
    with pytest.raises(ValueError, match="unexpected.*weight_ih_l2"):
        from_torch_state_dict(model.config, {**state, "weight_ih_l2": state["weight_ih_l1"]})
    with pytest.raises(ValueError, match="weight_hh_l0 has shape"):
        from_torch_state_dict(model.config, {**state, "weight_hh_l0": state["weight_hh_l0"][:, :-1]})
    with pytest.raises(ValueError, match="rnn.l0.W_h has shape"):
        to_torch_state_dict(model.config, {**model.params, "rnn.l0.W_h": np.zeros((H, H))})
