"""Convert parameters between this package's flat dict and PyTorch's state-dict layout.

PyTorch is never imported here: both sides are NumPy arrays. To load into a torch module, wrap each
array with `torch.from_numpy`; to read one, pass `{k: v.detach().numpy() for k, v in
module.state_dict().items()}`.

Conventions, ours -> torch's `nn.RNN(nonlinearity='tanh')`, `nn.GRU`, `nn.LSTM`:

    rnn.l{k}{sfx}.W_x  (D, G*H)   <->  weight_ih_l{k}{sfx}  (G*H, D)   transposed, gate blocks reordered
    rnn.l{k}{sfx}.W_h  (H, G*H)   <->  weight_hh_l{k}{sfx}  (G*H, H)   transposed, gate blocks reordered
    rnn.l{k}{sfx}.b    (G*H,)     <->  bias_ih_l{k}{sfx} + bias_hh_l{k}{sfx}     (G*H,)
    rnn.l{k}{sfx}.b_hn (H,)       <->  n block of bias_hh_l{k}{sfx}             (GRU only)

where sfx is '' or '_reverse', G = 1 (rnn), 3 (gru), 4 (lstm), and D = E for layer 0, H or 2H above.
Gate blocks: LSTM ours [i, f, o, g], torch [i, f, g, o]; GRU both [r, z, n]; RNN one block.

Torch keeps two biases that only ever appear summed, except GRU's b_hn, which the reset gate
multiplies. Importing therefore folds them into our single `b` (for the GRU: b = b_ih +
[b_hr, b_hz, 0] and b_hn = b_hn); exporting puts `b` into bias_ih and zeros (GRU: [0, 0, b_hn])
into bias_hh. Import then export is thus exact up to that re-split of the biases; export then
import is exact.

Only a GRU with `reset_after=True` computes torch's GRU; the article's GRU (reset_after=False)
applies the reset gate before the recurrent product and has no torch counterpart.
"""
from __future__ import annotations

import numpy as np

from .config import GATES, ModelConfig
from .model import layer_names, parameter_shapes

# Our gate blocks listed in torch's order: torch block j is our block _TORCH_ORDER[kind][j].
# Each permutation is its own inverse, so the same list reorders either way.
_TORCH_ORDER = {"rnn": [0], "gru_after": [0, 1, 2], "lstm": [0, 1, 3, 2]}
_TORCH_CLASS = {"rnn": "RNN", "gru_after": "GRU", "lstm": "LSTM"}


def _check_convertible(config: ModelConfig) -> str:
    kind = config.kind
    if kind == "gru":
        raise ValueError(
            "a GRU with reset_after=False (the article's form: reset gate applied to a<t-1> before "
            "the recurrent product) computes a different function from torch.nn.GRU, which applies "
            "it after the product with a separate bias b_hn; only reset_after=True GRUs convert")
    return kind


def _reorder(blocks: np.ndarray, kind: str) -> np.ndarray:
    """Permute the gate blocks along axis 0 between our order and torch's (shapes checked by the
    callers)."""
    parts = np.split(blocks, len(_TORCH_ORDER[kind]), axis=0)
    return np.concatenate([parts[j] for j in _TORCH_ORDER[kind]], axis=0)


def _torch_suffix(prefix: str) -> str:
    """'rnn.l1_reverse' -> '_l1_reverse'."""
    return "_" + prefix.split(".", 1)[1]


def torch_module_spec(config: ModelConfig) -> tuple[str, dict]:
    """The torch.nn class name ('RNN', 'GRU' or 'LSTM') and keyword arguments of the recurrent
    module whose state dict `to_torch_state_dict` produces (batch_first=True; for 'RNN',
    nonlinearity='tanh', the only one our cell computes)."""
    kind = _check_convertible(config)
    kwargs = dict(input_size=config.embed_dim, hidden_size=config.hidden_size,
                  num_layers=config.num_layers, bidirectional=config.bidirectional,
                  batch_first=True, dropout=config.dropout if config.num_layers > 1 else 0.0)
    if kind == "rnn":
        kwargs["nonlinearity"] = "tanh"
    return _TORCH_CLASS[kind], kwargs


def to_torch_state_dict(config: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our recurrent parameters as the state dict of the torch module from `torch_module_spec`.

    params: our flat dict (extra keys such as the embedding's are ignored). Returns, for every
    layer k and direction sfx ('' or '_reverse'), new contiguous arrays in the params' dtype:
    weight_ih_l{k}{sfx} (G*H, D), weight_hh_l{k}{sfx} (G*H, H), bias_ih_l{k}{sfx} (G*H,),
    bias_hh_l{k}{sfx} (G*H,), in torch's gate order.
    """
    kind = _check_convertible(config)
    H = config.hidden_size
    _check_shapes(config, params, recurrent_only=True)
    state = {}
    for prefix in layer_names(config):
        sfx = _torch_suffix(prefix)
        b = params[f"{prefix}.b"]
        b_hh = np.zeros_like(b)
        if kind == "gru_after":
            b_hh[2 * H:] = params[f"{prefix}.b_hn"]          # n is torch's and our third block
        state[f"weight_ih{sfx}"] = np.ascontiguousarray(_reorder(params[f"{prefix}.W_x"].T, kind))
        state[f"weight_hh{sfx}"] = np.ascontiguousarray(_reorder(params[f"{prefix}.W_h"].T, kind))
        state[f"bias_ih{sfx}"] = _reorder(b, kind)
        state[f"bias_hh{sfx}"] = b_hh
    return state


def from_torch_state_dict(config: ModelConfig, state: dict) -> dict[str, np.ndarray]:
    """Inverse of `to_torch_state_dict`: our recurrent parameters ('rnn.l{k}{sfx}.W_x', '.W_h',
    '.b' and, for the GRU, '.b_hn') in `config.dtype`, from a torch RNN/GRU/LSTM state dict of
    arrays (names and shapes as `to_torch_state_dict` returns; nothing missing, nothing extra)."""
    kind = _check_convertible(config)
    H, dtype = config.hidden_size, np.dtype(config.dtype)
    expected = _torch_shapes(config)
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise ValueError(f"torch state dict does not match the config: missing "
                         f"{sorted(missing) or 'none'}, unexpected {sorted(extra) or 'none'}")
    arrays = {}
    for name, shape in expected.items():
        arrays[name] = np.asarray(state[name])
        if arrays[name].shape != shape:
            raise ValueError(f"torch parameter {name} has shape {arrays[name].shape}, expected {shape}")
    params = {}
    for prefix in layer_names(config):
        sfx = _torch_suffix(prefix)
        b_ih, b_hh = arrays[f"bias_ih{sfx}"], arrays[f"bias_hh{sfx}"]
        b = b_ih + b_hh
        if kind == "gru_after":
            b[2 * H:] = b_ih[2 * H:]                      # b_hn sits inside the reset gate's product
            params[f"{prefix}.b_hn"] = np.array(b_hh[2 * H:], dtype=dtype)
        params[f"{prefix}.W_x"] = np.ascontiguousarray(_reorder(arrays[f"weight_ih{sfx}"], kind).T,
                                                       dtype=dtype)
        params[f"{prefix}.W_h"] = np.ascontiguousarray(_reorder(arrays[f"weight_hh{sfx}"], kind).T,
                                                       dtype=dtype)
        params[f"{prefix}.b"] = np.array(_reorder(b, kind), dtype=dtype)
    return params


def to_torch_model_state(config: ModelConfig, params: dict[str, np.ndarray],
                         rnn_prefix: str = "rnn.") -> dict[str, np.ndarray]:
    """The whole model as the state dict of a torch module with attributes `embedding`
    (nn.Embedding(V, E, padding_idx=0)), `rnn` (see `torch_module_spec`) and `fc` (nn.Linear(F, 1)):
    'embedding.weight' (V, E), '{rnn_prefix}weight_ih_l0' ... as in `to_torch_state_dict`,
    'fc.weight' (1, F), 'fc.bias' (1,). F = H, or 2H bidirectional, with features [forward, backward].
    """
    _check_shapes(config, params, recurrent_only=False)
    state = {"embedding.weight": np.array(params["embedding.weight"])}
    state.update({rnn_prefix + k: v for k, v in to_torch_state_dict(config, params).items()})
    state["fc.weight"] = np.ascontiguousarray(params["fc.W"].T)
    state["fc.bias"] = np.array(params["fc.b"])
    return state


def from_torch_model_state(config: ModelConfig, state: dict, rnn_prefix: str = "rnn.") -> dict[str, np.ndarray]:
    """Inverse of `to_torch_model_state`: our complete flat params in `config.dtype`."""
    dtype = np.dtype(config.dtype)
    shapes = parameter_shapes(config)
    rnn_state = {k[len(rnn_prefix):]: v for k, v in state.items() if k.startswith(rnn_prefix)}
    rest = {k: np.asarray(v) for k, v in state.items() if not k.startswith(rnn_prefix)}
    expected = {"embedding.weight": shapes["embedding.weight"], "fc.weight": shapes["fc.W"][::-1],
                "fc.bias": shapes["fc.b"]}
    missing, extra = set(expected) - set(rest), set(rest) - set(expected)
    if missing or extra:
        raise ValueError(f"torch model state does not match the config: missing "
                         f"{sorted(missing) or 'none'}, unexpected {sorted(extra) or 'none'}")
    for name, shape in expected.items():
        if rest[name].shape != shape:
            raise ValueError(f"torch parameter {name} has shape {rest[name].shape}, expected {shape}")
    params = {"embedding.weight": np.array(rest["embedding.weight"], dtype=dtype)}
    params.update(from_torch_state_dict(config, rnn_state))
    params["fc.W"] = np.ascontiguousarray(rest["fc.weight"].T, dtype=dtype)
    params["fc.b"] = np.array(rest["fc.bias"], dtype=dtype)
    return params


def _torch_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Name and shape of every parameter of the torch recurrent module."""
    G, H = GATES[config.cell], config.hidden_size
    shapes = {}
    for prefix in layer_names(config):
        sfx = _torch_suffix(prefix)
        D = config.embed_dim if prefix.startswith("rnn.l0") else H * config.directions
        shapes.update({f"weight_ih{sfx}": (G * H, D), f"weight_hh{sfx}": (G * H, H),
                       f"bias_ih{sfx}": (G * H,), f"bias_hh{sfx}": (G * H,)})
    return shapes


def _check_shapes(config: ModelConfig, params: dict, recurrent_only: bool) -> None:
    for name, shape in parameter_shapes(config).items():
        if recurrent_only and not name.startswith("rnn."):
            continue
        if name not in params:
            raise ValueError(f"missing parameter {name}")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, expected {shape}")
