"""The train / evaluate / compare stages' own logic, on tiny synthetic prepared data (fast).

The real `dvc repro` of the whole pipeline is in test_pipeline_e2e.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rnn.errors import InputError
from stages import compare, evaluate, outputs, settings, train
from stages.settings import ParamsError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- csv writers
def test_history_csv_has_one_row_per_epoch_in_column_order():
    record = {c: i + 0.5 for i, c in enumerate(outputs.HISTORY_COLUMNS)} | {"epoch": 1, "step": 9}
    rows = list(csv.reader(io.StringIO(outputs.history_csv([record, {**record, "epoch": 2}]))))
    assert rows[0] == list(outputs.HISTORY_COLUMNS)
    assert [r[0] for r in rows[1:]] == ["1", "2"]
    assert float(rows[1][rows[0].index("val_accuracy")]) == record["val_accuracy"]


def test_trace_rows_skip_missing_distances_and_keep_zero_norms():
    traces = [{"a": [0.1, None, 0.0], "c": [0.0, 0.01]}, {"a": [1.0]}]
    rows = outputs.trace_rows(traces)
    assert rows == [(1, 0, "a", 0.1, -1.0), (1, 2, "a", 0.0, ""), (1, 0, "c", 0.0, ""),
                    (1, 1, "c", 0.01, -2.0), (2, 0, "a", 1.0, 0.0)]
    assert outputs.trace_rows({1: traces[0], 2: traces[1]}) == rows
    parsed = list(csv.DictReader(io.StringIO(outputs.trace_csv(rows))))
    assert list(parsed[0]) == list(outputs.TRACE_COLUMNS) and len(parsed) == 5
    series = outputs.trace_series(parsed, outputs.last_epoch(parsed))
    assert list(series) == ["a"] and series["a"][1].tolist() == [1.0]
    first = outputs.trace_series(rows, 1)
    assert first["c"][0].tolist() == [0, 1] and first["a"][1].tolist() == [0.1, 0.0]


def test_no_trace_gives_a_header_only_csv():
    assert outputs.trace_csv(outputs.trace_rows([{}, {}])) == ",".join(outputs.TRACE_COLUMNS) + "\n"


# ------------------------------------------------------------- stages on synthetic data
V, T, E = 30, 12, 8


def _split(rng: np.random.Generator, n: int) -> dict:
    """Reviews whose label is whether token 2 occurs: learnable, and every length 3..T."""
    lengths = rng.integers(3, T + 1, n).astype(np.int32)
    ids = np.zeros((n, T), np.int32)
    labels = rng.integers(0, 2, n).astype(np.int8)
    for i, (n_tok, y) in enumerate(zip(lengths, labels)):
        ids[i, :n_tok] = rng.integers(3, V, n_tok)
        if y:
            ids[i, rng.integers(0, n_tok)] = 2
    return {"ids": ids, "lengths": lengths, "labels": labels, "review_ids": np.arange(n)}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project dir with params.yaml (tiny model, tracking off) and synthetic prepared data."""
    rng = np.random.default_rng(0)
    prepared = tmp_path / "data/prepared"
    prepared.mkdir(parents=True)
    for name, n in (("train", 64), ("val", 16), ("test", 40)):
        np.savez(prepared / f"{name}.npz", **_split(rng, n))
    tokens = ["<pad>", "<unk>"] + [f"w{i}" for i in range(2, V)]
    (prepared / "vocab.json").write_text(json.dumps({"tokens": tokens, "max_len": T, "truncate": "head"}))
    emb = rng.normal(0, 0.3, (V, E)).astype(np.float32)
    emb[0] = 0
    np.save(tmp_path / "data/embeddings.npy", emb)
    (tmp_path / "data/raw").mkdir()
    unsup = [" ".join(f"w{i}" for i in rng.integers(2, V, rng.integers(2, T))) for _ in range(40)]
    pd.DataFrame({"text": unsup}).to_parquet(tmp_path / "data/raw/unsup.parquet", index=False)
    params = {"train": {"cells": ["rnn", "lstm"], "epochs": 2, "batch_size": 16, "hidden_size": 6,
                        "embed_dim": E, "lr": 0.01, "init": "embeddings", "workers": 1, "seeds": [0]},
              "pretrain": {"batch_size": 16, "num_sampled": 10, "val_reviews": 8},
              "evaluate": {"length_edges": [5, 10]},
              "mlflow": {"enabled": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _main(module, *argv: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()


def test_train_evaluate_compare_write_their_declared_outputs(project, monkeypatch):
    stale = project / "checkpoints/lstm/0123456789ab-stale"
    stale.mkdir(parents=True)
    (stale / "checkpoint.npz").write_bytes(b"from other settings")
    for cell in ("rnn", "lstm"):
        _main(train, cell, "0", monkeypatch=monkeypatch)
        _main(evaluate, cell, "0", monkeypatch=monkeypatch)

    assert not stale.exists(), "a checkpoint from other settings must be deleted, not resumed"
    assert not list((project / "checkpoints").rglob("*.npz")), "checkpoint kept after success"
    for cell in ("rnn", "lstm"):
        meta = json.loads((project / "models" / cell / "seed0" / "config.json").read_text())
        assert meta["model"]["cell"] == cell and meta["model"]["hidden_size"] == 6
        assert meta["metadata"]["best_epoch"] in (1, 2) and meta["metadata"]["params_hash"]
        assert sorted(p.name for p in (project / "models" / cell / "seed0").iterdir()) == [
            "config.json", "encoder.json", "weights.npz"]                # no run id in the model
        m = json.loads((project / "metrics" / cell / "seed0" / "train.json").read_text())
        assert m["epochs_run"] == 2 and m["steps"] == 8 and m["resumed"] is False
        hist = list(csv.DictReader(open(project / "plots" / cell / "seed0" / "history.csv")))
        assert max(float(r["val_accuracy"]) for r in hist) == m["best_val_accuracy"]
        trace = list(csv.DictReader(open(project / "plots" / cell / "seed0" / "grad_trace.csv")))
        assert {r["state"] for r in trace} == ({"a", "c"} if cell == "lstm" else {"a"})
        assert {int(r["epoch"]) for r in trace} == {1, 2}
        assert all(math.isclose(float(r["log10_grad_norm"]), math.log10(float(r["grad_norm"])))
                   for r in trace if r["log10_grad_norm"])
        ev = json.loads((project / "metrics" / cell / "seed0" / "eval.json").read_text())
        assert ev["n"] == 40 and sum(ev["confusion"].values()) == 40 and ev["seconds"] >= 0
        buckets = list(csv.DictReader(open(project / "plots" / cell / "seed0" / "length_buckets.csv")))
        assert sum(int(b["count"]) for b in buckets) == 40
        assert {b["bucket"] for b in buckets} <= {"<5", "5-10", ">=10"}
        assert len(list(csv.DictReader(open(project / "plots" / cell / "seed0" / "confusion.csv")))) == 40
        for png in ("grad_trace.png", "roc.png", "confusion.png"):
            assert (project / "plots" / cell / "seed0" / png).read_bytes()[:4] == b"\x89PNG"
        predictions = np.load(project / "data/predictions" / cell / "seed0.npz")
        labels = np.load(project / "data/prepared/test.npz")["labels"]
        assert predictions["labels"].tolist() == labels.tolist() and predictions["probabilities"].dtype == np.float32
        assert ((predictions["probabilities"] >= 0.5) == labels).mean() == ev["accuracy"]


def test_diverged_training_exits_2_and_saves_no_model(project, monkeypatch, capsys):
    emb = np.load(project / "data/embeddings.npy")
    emb[3] = np.nan                                   # every review uses some token >= 3
    np.save(project / "data/embeddings.npy", emb)
    with pytest.raises(SystemExit) as info:
        _main(train, "rnn", "0", monkeypatch=monkeypatch)
    assert info.value.code == 2
    assert "diverged" in capsys.readouterr().err
    assert not (project / "models/rnn/seed0").exists()
    assert not (project / "metrics/rnn/seed0").exists()


def test_embed_dim_must_match_the_embeddings(project, monkeypatch):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["overrides"] = {"lstm": {"embed_dim": E + 1}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=rf"train.overrides.lstm.embed_dim = {E + 1}: must equal train.embed_dim = {E}"):
        _main(train, "lstm", "0", monkeypatch=monkeypatch)
    params["train"].update(overrides={}, embed_dim=E + 1)       # embeddings older than the setting
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=rf"train.embed_dim = {E + 1}: must equal the width {E}"):
        _main(train, "lstm", "0", monkeypatch=monkeypatch)


def _write_lm_shapes(project: Path, params: dict) -> None:
    """data/lm/<cell>.json as the check stage writes them."""
    validated = settings.validate(params)
    for cell in ("rnn", "gru", "lstm"):
        (project / outputs.LM_SHAPES).mkdir(parents=True, exist_ok=True)
        (project / outputs.LM_SHAPES / f"{cell}.json").write_text(json.dumps(outputs.lm_shape(validated, cell)))


def test_lm_shape_holds_the_shape_keys_only():
    params = settings.validate({"train": {"hidden_size": 8, "overrides": {"lstm": {"num_layers": 2, "lr": 0.1}}}})
    assert outputs.lm_shape(params, "lstm") == {"embed_dim": 100, "hidden_size": 8, "num_layers": 2,
                                                "bidirectional": False, "reset_after": False, "forget_bias": 1.0}
    # A train-only setting, shared or a cell's own, leaves every shape (pretrain's dependency) alone.
    for train in ({"lr": 0.5, "dropout": 0.2}, {"overrides": {"lstm": {"lr": 0.001, "dropout": 0.1}}}):
        changed = settings.validate({"train": train})
        assert all(outputs.lm_shape(changed, c) == outputs.lm_shape(settings.validate({}), c) for c in settings.CELLS)
    shaped = settings.validate({"train": {"overrides": {"gru": {"reset_after": True}}}})
    assert outputs.lm_shape(shaped, "gru")["reset_after"] and not outputs.lm_shape(shaped, "rnn")["reset_after"]


def test_pretrain_then_train_from_the_language_model(project, monkeypatch):
    from stages import pretrain

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["init"] = "lm"
    params["train"]["pretrained_lr_scale"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _write_lm_shapes(project, params)
    _main(pretrain, "gru", monkeypatch=monkeypatch)
    metrics = json.loads((project / "metrics/gru/pretrain.json").read_text())
    assert metrics["reviews"] == 64 + 40 and metrics["val_perplexity"] > 1 and metrics["resumed"] is False
    assert metrics["peak_rss_mb"] > 0
    lm = np.load(project / "models/lm/gru/weights.npz")
    assert json.loads((project / "models/lm/gru/config.json").read_text())["model"]["task"] == "language_model"
    assert not any((project / "checkpoints").rglob("*.*")), "a finished pretraining leaves its checkpoint"
    # The shape in data/lm/ must be the one params.yaml gives (the check stage writes it).
    (project / "params.yaml").write_text(yaml.safe_dump({**params, "train": {**params["train"], "hidden_size": 7}}))
    with pytest.raises(InputError, match=r"data/lm/gru.json does not hold gru's settings in params.yaml; run `dvc repro`"):
        _main(pretrain, "gru", monkeypatch=monkeypatch)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _main(train, "gru", "0", monkeypatch=monkeypatch)
    assert json.loads((project / "models/gru/seed0/config.json").read_text())["metadata"]["train"]["init"] == "lm"
    # The encoder moved on from the language model's weights, the classifier's head is its own.
    trained = np.load(project / "models/gru/seed0/weights.npz")
    assert trained["rnn.l0.W_h"].shape == lm["rnn.l0.W_h"].shape
    assert not np.array_equal(trained["rnn.l0.W_h"], lm["rnn.l0.W_h"]) and "lm.W" not in trained


def test_a_bidirectional_classifier_starts_from_a_forward_and_a_backward_language_model(project, monkeypatch):
    from stages import pretrain

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(init="lm", bidirectional=True, epochs=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _write_lm_shapes(project, params)
    _main(pretrain, "lstm", monkeypatch=monkeypatch)
    metrics = json.loads((project / "metrics/lstm/pretrain.json").read_text())
    assert metrics["val_perplexity"] > 1 and metrics["backward"]["val_perplexity"] > 1
    assert metrics["backward"]["val_perplexity"] != metrics["val_perplexity"]
    history = list(csv.DictReader(io.StringIO((project / "plots/lstm/pretrain.csv").read_text())))
    assert [r["direction"] for r in history] == ["forward", "backward"]
    forward, backward = (np.load(project / f"models/lm/lstm/{d}weights.npz") for d in ("", "backward/"))
    assert json.loads((project / "models/lm/lstm/backward/config.json").read_text())["metadata"]["direction"] == "backward"
    assert not np.array_equal(forward["rnn.l0.W_h"], backward["rnn.l0.W_h"])
    assert np.array_equal(forward["embedding.weight"], backward["embedding.weight"])   # read frozen
    params["train"]["lr"] = 1e-9                  # (almost) no step: the encoder is still the language models'
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _write_lm_shapes(project, params)
    _main(train, "lstm", "0", monkeypatch=monkeypatch)
    trained = np.load(project / "models/lstm/seed0/weights.npz")
    np.testing.assert_allclose(trained["rnn.l0_reverse.W_h"], backward["rnn.l0.W_h"], atol=1e-6)
    np.testing.assert_allclose(trained["rnn.l0.W_h"], forward["rnn.l0.W_h"], atol=1e-6)
    params["train"]["num_layers"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="train.bidirectional = true with num_layers 2"):
        settings.load(project / "params.yaml")


# ------------------------------------------------- evaluate: labels it must get right (issue 17)
def _token_two_detector(vocab_size: int) -> "SentimentModel":
    """An RNN that answers "positive" exactly when token 2 occurs (the label of `_split`'s reviews):
    embedding 5 for token 2 and 0 otherwise, a = tanh(x), max pooling, logit 10 * max_t a_t - 5."""
    from rnn import ModelConfig, SentimentModel
    config = ModelConfig(vocab_size=vocab_size, cell="rnn", embed_dim=1, hidden_size=1, pooling="max")
    params = {"embedding.weight": np.zeros((vocab_size, 1), np.float32), "rnn.l0.W_x": np.ones((1, 1), np.float32),
              "rnn.l0.W_h": np.zeros((1, 1), np.float32), "rnn.l0.b": np.zeros(1, np.float32),
              "fc.W": np.full((1, 1), 10, np.float32), "fc.b": np.full(1, -5, np.float32)}
    params["embedding.weight"][2] = 5
    return SentimentModel(config, params)


def test_evaluate_scores_a_model_that_is_always_right_as_always_right(project, monkeypatch):
    from rnn.io import save_model
    vocab = outputs.load_vocab(project / "data/prepared/vocab.json")
    save_model(project / "models/rnn/seed0", _token_two_detector(V), encoder=vocab)
    _main(evaluate, "rnn", "0", monkeypatch=monkeypatch)
    labels = np.load(project / "data/prepared/test.npz")["labels"]
    ev = json.loads((project / "metrics/rnn/seed0/eval.json").read_text())
    assert ev["accuracy"] == 1.0 and ev["roc_auc"] == 1.0 and ev["f1"] == 1.0 and ev["peak_rss_mb"] > 0
    assert ev["confusion"] == {"tn": int((labels == 0).sum()), "fp": 0, "fn": 0, "tp": int(labels.sum())}
    rows = list(csv.DictReader(open(project / "plots/rnn/seed0/confusion.csv")))
    assert [int(r["actual"]) for r in rows] == labels.tolist() == [int(r["predicted"]) for r in rows]
    roc = list(csv.DictReader(open(project / "plots/rnn/seed0/roc.csv")))
    assert any(float(r["fpr"]) == 0 and float(r["tpr"]) == 1 for r in roc)   # the perfect corner


@pytest.mark.parametrize("vocabulary", ["smaller", "same size, other words", "other max_len"])
def test_evaluate_refuses_a_model_trained_on_another_vocabulary(project, monkeypatch, vocabulary):
    """Issue 17 item 2: after prepare.vocab_size changes, `dvc repro -s evaluate@<cell>` scored token
    ids from another vocabulary (or crashed with an IndexError)."""
    from rnn.errors import InputError
    from rnn.io import save_model
    vocab = outputs.load_vocab(project / "data/prepared/vocab.json")
    tokens = vocab["tokens"]
    other = {"smaller": {**vocab, "tokens": tokens[:-5]},
             "same size, other words": {**vocab, "tokens": tokens[:2] + tokens[:1:-1]},
             "other max_len": {**vocab, "max_len": vocab["max_len"] + 1}}[vocabulary]
    save_model(project / "models/rnn/seed0", _token_two_detector(len(other["tokens"])), encoder=other)
    with pytest.raises(InputError) as info:
        _main(evaluate, "rnn", "0", monkeypatch=monkeypatch)
    message = str(info.value)
    assert "models/rnn/seed0/encoder.json and " in message and "data/prepared/vocab.json differ" in message
    assert "retrain" in message and not (project / "metrics/rnn/seed0/eval.json").exists()
