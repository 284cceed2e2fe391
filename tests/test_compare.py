"""The compare stage over replicates: intervals over seeds, paired differences, the baseline row, and
wording that states a ranking only where the interval excludes zero."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import yaml

from stages import compare, outputs

N = 2000          # test reviews


def _write_replicate(root, cell, seed, labels, right, rng, history=(0.80, 0.85)):
    """A replicate whose predictions are right exactly on the reviews where `right` is true."""
    probs = np.where(right == (labels == 1), 0.9, 0.1).astype(np.float32)
    name = f"{cell}/seed{seed}"
    (root / "data/predictions" / cell).mkdir(parents=True, exist_ok=True)
    np.savez(root / "data/predictions" / f"{name}.npz", labels=labels.astype(np.int8), probabilities=probs)
    (root / "metrics" / name).mkdir(parents=True, exist_ok=True)
    (root / "plots" / name).mkdir(parents=True, exist_ok=True)
    accuracy = float(right.mean())
    (root / "metrics" / name / "eval.json").write_text(json.dumps({"accuracy": accuracy, "f1": accuracy, "roc_auc": 0.9}))
    (root / "metrics" / name / "train.json").write_text(json.dumps(
        {"best_val_accuracy": history[-1], "epochs_run": len(history), "train_seconds": 10.0, "num_parameters": 99}))
    (root / "plots" / name / "history.csv").write_text(outputs.csv_text(
        ["epoch", "val_accuracy"], [(e, a + 0.001 * seed) for e, a in enumerate(history, 1)]))
    norms = 10.0 ** -np.arange(5) * (1 + seed)
    (root / "plots" / name / "grad_trace.csv").write_text(outputs.trace_csv(outputs.trace_rows([{"a": list(norms)}])))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """rnn right on ~80% of the reviews, gru and lstm on ~90% (lstm and gru alike), the baseline on ~85%."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, N)
    for cell, p in (("rnn", 0.80), ("gru", 0.90), ("lstm", 0.90)):
        for seed in (0, 1, 2):
            _write_replicate(tmp_path, cell, seed, labels, rng.random(N) < p, rng)
    base = rng.random(N) < 0.85
    (tmp_path / "metrics/baseline").mkdir(parents=True)
    (tmp_path / "metrics/baseline/eval.json").write_text(json.dumps(
        {"accuracy": float(base.mean()), "f1": 0.85, "roc_auc": 0.9, "train_seconds": 5.0}))
    np.savez(tmp_path / "data/predictions/baseline.npz", labels=labels.astype(np.int8),
             probabilities=np.where(base == (labels == 1), 0.8, 0.2).astype(np.float32))
    params = {"train": {"cells": ["rnn", "gru", "lstm"], "seeds": [0, 1, 2]}, "compare": {"resamples": 500},
              "mlflow": {"enabled": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["compare"])
    return tmp_path


def test_summary_json_holds_intervals_pairs_and_the_baseline(project):
    compare.main()
    summary = json.loads((project / "reports/summary.json").read_text())
    for cell in ("rnn", "gru", "lstm"):
        acc = summary["cells"][cell]["test_accuracy"]
        assert set(acc) == {"mean", "sd", "ci95", "seeds"} and acc["seeds"] == [0, 1, 2]
        low, high = acc["ci95"]
        assert low < acc["mean"] < high and acc["sd"] > 0
        assert 0 < summary["cells"][cell]["ensemble_accuracy"] <= 1
    base = summary["baseline"]["test_accuracy"]
    assert base["ci95"][0] < base["mean"] < base["ci95"][1] and base["sd"] == 0.0
    pairs = summary["pairs"]
    assert set(pairs) == {"gru-rnn", "lstm-rnn", "lstm-gru", "rnn-baseline", "gru-baseline", "lstm-baseline"}
    assert pairs["gru-rnn"]["ci95"][0] > 0 and pairs["gru-rnn"]["shown"] == "GRU better"
    assert pairs["rnn-baseline"]["ci95"][1] < 0 and pairs["rnn-baseline"]["shown"] == "NBSVM better"
    lstm_gru = pairs["lstm-gru"]
    assert lstm_gru["ci95"][0] < 0 < lstm_gru["ci95"][1] and lstm_gru["shown"] == "no difference shown"
    d = summary["cells"]["lstm"]["test_accuracy"]["mean"] - summary["cells"]["gru"]["test_accuracy"]["mean"]
    assert lstm_gru["difference"] == pytest.approx(d)


def test_markdown_states_rankings_only_where_shown_and_csv_has_every_model(project):
    compare.main()
    md = (project / "reports/summary.md").read_text()
    assert "| LSTM − GRU |" in md and "no difference shown" in md and "| GRU − RNN |" in md
    assert "| NBSVM | 1 |" in md and "Wang & Manning" in md
    rows = list(csv.DictReader(open(project / "reports/summary.csv")))
    assert [r["model"] for r in rows] == ["rnn", "gru", "lstm", "baseline"]
    assert (project / "reports/val_accuracy.png").stat().st_size > 0 and (project / "reports/grad_trace.png").is_file()


def test_the_same_inputs_give_the_same_summary(project):
    compare.main()
    first = json.loads((project / "reports/summary.json").read_text())
    compare.main()
    again = json.loads((project / "reports/summary.json").read_text())
    assert first.pop("peak_rss_mb") > 0 and again.pop("peak_rss_mb") > 0      # memory may differ, nothing else
    assert again == first


def test_a_missing_replicate_is_named(project):
    (project / "metrics/gru/seed2/eval.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"metrics/gru/seed2/eval.json: not found \(run the evaluate@gru-2 stage"):
        compare.main()
    assert not (project / "reports/summary.json").exists()


def test_predictions_of_another_test_split_are_refused(project):
    path = project / "data/predictions/lstm/seed1.npz"
    arrays = dict(np.load(path))
    arrays["labels"] = 1 - arrays["labels"]
    np.savez(path, **arrays)
    with pytest.raises(Exception, match="lstm's test labels differ"):
        compare.main()


def test_a_replicate_that_calls_every_review_one_class_is_averaged_not_dropped(project):
    """F1 of 0.0 (a model that never says positive, possible on tiny data) is a number to average,
    and one replicate without an AUC (one class in its test labels) makes the cell's AUC null."""
    path = project / "metrics/rnn/seed1/eval.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "f1": 0.0, "roc_auc": None}))
    compare.main()
    rnn = json.loads((project / "reports/summary.json").read_text())["cells"]["rnn"]
    f1 = [json.loads((project / f"metrics/rnn/seed{s}/eval.json").read_text())["f1"] for s in (0, 1, 2)]
    assert rnn["test_f1"] == pytest.approx(np.mean(f1)) and rnn["test_auc"] is None
