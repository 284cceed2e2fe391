"""PyTorch as an oracle: random torch modules, converted through rnn.interop, must give our model's
logits, loss and every gradient to float64 precision, on variable-length (packed) batches."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from gradcheck import rel_err  # noqa: E402
from helpers import make_model  # noqa: E402
from rnn.interop import from_torch_model_state, to_torch_model_state, torch_module_spec  # noqa: E402
from rnn.model import ModelConfig, SentimentModel, dense_grad  # noqa: E402

V, E, H, B, T = 23, 5, 6, 6, 9
TOL = 1e-6


class Reference(nn.Module):
    """Embedding -> RNN/GRU/LSTM over packed sequences -> pooling -> Linear, as our model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        name, kwargs = torch_module_spec(config)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.rnn = getattr(nn, name)(**kwargs)
        self.fc = nn.Linear(config.hidden_size * config.directions, 1)
        self.config = config

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        packed = pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        out, h_n = self.rnn(packed)
        if isinstance(h_n, tuple):                       # LSTM: (h_n, c_n)
            h_n = h_n[0]
        if cfg.pooling == "last":                        # top layer, [forward, backward]
            top = h_n.view(cfg.num_layers, cfg.directions, len(lengths), cfg.hidden_size)[-1]
            pooled = torch.cat(list(top), dim=-1)
        else:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # (B, T, F)
            valid = (torch.arange(ids.shape[1])[None, :] < lengths[:, None])[..., None]
            if cfg.pooling == "mean":
                pooled = (out * valid).sum(1) / lengths[:, None].to(out.dtype)
            else:
                pooled = out.masked_fill(~valid, -torch.inf).max(1).values
        return self.fc(pooled)[:, 0]


def batch(seed: int):
    """Token ids (B, T) right-padded with 0, with lengths from 1 to T in shuffled order, and labels."""
    rng = np.random.default_rng(seed)
    lengths = rng.permutation(np.r_[1, T, rng.integers(1, T + 1, B - 2)])
    ids = rng.integers(1, 8, (B, T))                     # a small id range: rows repeat in the batch
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return ids, lengths, rng.integers(0, 2, B)


def both_models(cell, num_layers, bidirectional, pooling, seed):
    config = ModelConfig(vocab_size=V, cell=cell, embed_dim=E, hidden_size=H, num_layers=num_layers,
                         bidirectional=bidirectional, pooling=pooling, reset_after=cell == "gru",
                         dtype="float64")
    torch.manual_seed(seed)
    ref = Reference(config).double()
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return ref, SentimentModel(config, from_torch_model_state(config, state))


CASES = [(cell, layers, bi) for cell in ("rnn", "gru", "lstm") for layers in (1, 2) for bi in (False, True)]


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("cell,num_layers,bidirectional", CASES)
def test_logits_loss_and_gradients_match_torch(cell, num_layers, bidirectional, pooling):
    ref, ours = both_models(cell, num_layers, bidirectional, pooling, seed=num_layers + 2 * bidirectional)
    ids, lengths, labels = batch(seed=len(cell))

    logits_t = ref(torch.from_numpy(ids), torch.from_numpy(lengths))
    loss_t = nn.functional.binary_cross_entropy_with_logits(logits_t, torch.from_numpy(labels).double())
    loss_t.backward()
    loss, grads, logits, _ = ours.loss(ids, lengths, labels)

    assert rel_err(logits, logits_t.detach().numpy()) < TOL
    assert abs(loss - loss_t.item()) / abs(loss_t.item()) < TOL

    # Our gradients in torch's layout; the same linear map as the weights.
    mine = to_torch_model_state(ours.config, {k: dense_grad(g) for k, g in grads.items()})
    theirs = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    assert set(theirs) == set(mine)
    for name, g in theirs.items():
        if name.startswith("rnn.bias_hh"):
            # Our single b feeds both torch biases, whose gradients are equal, except GRU's n
            # block, which is b_hn (exported into bias_hh's n block).
            expected = mine[name.replace("bias_hh", "bias_ih")].copy()
            if cell == "gru":
                expected[2 * H:] = mine[name][2 * H:]
        else:
            expected = mine[name]
        assert rel_err(expected, g) < TOL, name
    assert np.all(theirs["embedding.weight"][0] == 0)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_our_parameters_load_into_torch(cell):
    """The other direction: our random model exported with strict names into a torch module."""
    # biases drawn too: zero at init, they would not show whether their mapping is right
    ours = make_model(cell, cell == "gru", biases=0.5, vocab_size=V, embed_dim=E, hidden_size=H, num_layers=2,
                      bidirectional=True)
    ref = Reference(ours.config).double()
    state = to_torch_model_state(ours.config, ours.params)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    ids, lengths, _ = batch(seed=3)
    with torch.no_grad():
        logits_t = ref(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
    assert rel_err(ours.forward(ids, lengths)[0], logits_t) < TOL
