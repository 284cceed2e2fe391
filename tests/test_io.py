"""Model folders: a save/read round trip reproduces predictions exactly, and every kind of broken
folder is refused with a ValueError that names the problem, without ever unpickling anything."""
from __future__ import annotations

import json
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from helpers import make_model
from rnn.io import atomic_file, load_arrays, read_model, save_arrays, save_model

ENCODER = {"vocab": ["<pad>", "<unk>", "good", "bad"], "max_len": 5, "truncate": "head"}


io_model = partial(make_model, vocab_size=12, embed_dim=4, hidden_size=3, dtype="float32")


def batch():
    rng = np.random.default_rng(1)
    lengths = np.array([3, 6, 1, 4])
    ids = np.where(np.arange(6)[None, :] < lengths[:, None], rng.integers(1, 12, (4, 6)), 0)
    return ids, lengths


@pytest.fixture
def saved(tmp_path) -> Path:
    folder = tmp_path / "model"
    save_model(folder, io_model(cell="gru", reset_after=True), ENCODER, {"epochs": 3})
    return folder


def rewrite_weights(folder: Path, edit) -> None:
    arrays = load_arrays(folder / "weights.npz")
    edit(arrays)
    save_arrays(folder / "weights.npz", arrays)


def rewrite_config(folder: Path, edit) -> None:
    meta = json.loads((folder / "config.json").read_text())
    edit(meta["model"])
    (folder / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("config", [dict(cell="lstm", num_layers=2, bidirectional=True, pooling="max"),
                                    dict(cell="gru", reset_after=True, pooling="mean"),
                                    dict(cell="gru", dtype="float64"),
                                    dict(cell="rnn", freeze_embedding=True)],
                         ids=["lstm", "gru_after", "gru64", "rnn"])
def test_round_trip_gives_identical_predictions(tmp_path, config):
    model = io_model(**config)
    save_model(tmp_path / "m", model, ENCODER, {"best_epoch": 2, "note": "x"})
    loaded, encoder, metadata = read_model(tmp_path / "m")
    assert loaded.config == model.config
    assert encoder == ENCODER and metadata == {"best_epoch": 2, "note": "x"}
    assert list(loaded.params) == list(model.params)
    for name, p in model.params.items():
        assert loaded.params[name].dtype == p.dtype
        np.testing.assert_array_equal(loaded.params[name], p)
    ids, lengths = batch()
    np.testing.assert_array_equal(loaded.predict_logits(ids, lengths), model.predict_logits(ids, lengths))


def test_round_trip_without_encoder(tmp_path):
    save_model(tmp_path / "m", io_model())
    assert not (tmp_path / "m" / "encoder.json").exists()
    _, encoder, metadata = read_model(tmp_path / "m")
    assert encoder is None and metadata == {}


@pytest.mark.parametrize("keep", [0, 30, 0.5, -1], ids=["empty", "header", "half", "last-byte"])
def test_truncated_weights(saved, keep):
    path = saved / "weights.npz"
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="weights.npz: not a readable .npz file"):
        read_model(saved)


def test_corrupted_weights(saved):
    path = saved / "weights.npz"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:                      # flip bytes inside the first array's data
        info = z.infolist()[0]
    start = info.header_offset + 30 + len(info.filename) + 128
    data[start:start + 16] = bytes(16)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="weights.npz"):
        read_model(saved)


class _Payload:
    """Unpickling this would create `marker`: proof of code execution."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_object_array_is_refused_without_unpickling(saved, tmp_path):
    marker = tmp_path / "pwned"

    def edit(arrays):
        arrays["fc.b"] = np.array([_Payload(str(marker))], dtype=object)

    model_arrays = load_arrays(saved / "weights.npz")
    edit(model_arrays)
    with open(saved / "weights.npz", "wb") as f:
        np.savez(f, **model_arrays)
    with pytest.raises(ValueError, match="weights.npz.*pickle"):
        read_model(saved)
    assert not marker.exists()


def test_missing_array(saved):
    rewrite_weights(saved, lambda a: a.pop("rnn.l0.b_hn"))
    with pytest.raises(ValueError, match=r"weights.npz: missing arrays rnn\.l0\.b_hn"):
        read_model(saved)


def test_wrong_shape(saved):
    def edit(arrays):
        arrays["fc.W"] = np.zeros((4, 1), np.float32)
    rewrite_weights(saved, edit)
    with pytest.raises(ValueError, match=r"fc\.W has shape \(4, 1\), config says \(3, 1\)"):
        read_model(saved)


def test_config_does_not_match_weights(saved):
    rewrite_config(saved, lambda m: m.update(hidden_size=5))
    with pytest.raises(ValueError, match="has shape .* config says"):
        read_model(saved)
    rewrite_config(saved, lambda m: m.update(hidden_size=3, cell="lstm", reset_after=False))
    with pytest.raises(ValueError, match="has shape .* config says"):
        read_model(saved)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(cell="transformer"), "unknown cell 'transformer'"),
    (lambda m: m.update(pooling="attention"), "unknown pooling 'attention'"),
    (lambda m: m.update(colour="blue"), "unknown model config keys: colour"),
    (lambda m: m.pop("vocab_size"), "vocab_size"),
    (lambda m: m.update(dtype="float33"), "dtype"),
    (lambda m: m.update(dtype="object"), "dtype"),
], ids=["cell", "pooling", "unknown-key", "missing-key", "bad-dtype", "object-dtype"])
def test_bad_config(saved, edit, message):
    rewrite_config(saved, edit)
    with pytest.raises(ValueError, match=f"config.json: bad model config: .*{message}"):
        read_model(saved)


def test_non_numeric_weights(saved):
    def edit(arrays):
        arrays["fc.b"] = np.array(["import os"])
    rewrite_weights(saved, edit)
    with pytest.raises(ValueError, match=r"weights.npz: fc\.b"):
        read_model(saved)


def test_config_not_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: bad model config"):
        read_model(saved)


def test_encoder_not_json(saved):
    (saved / "encoder.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match="encoder.json: not valid JSON"):
        read_model(saved)


@pytest.mark.parametrize("missing", ["weights.npz", "config.json"])
def test_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(ValueError, match=f"no {missing}: not a model folder"):
        read_model(saved)


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"], "no temporary file left behind"
    with atomic_file(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1
