"""The memory probe: the synthetic task's guarantees, and the stage end to end on tiny settings."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import write_params
from rnn.errors import InputError
from rnn.model import ModelConfig
from rnn.probe import A, B, FIRST_FILLER, NEG, POS, ProbeConfig, grad_ratio, make_probe_data, train_probe
from rnn.train import TrainingDiverged
from stages import settings as pipeline_settings
from stages.probe import main, probe_distance, run
from stages.probe_report import report
from stages.settings import ParamsError

ROOT = Path(__file__).resolve().parents[1]
SENTIMENT = (POS, NEG, A, B)


def last_marked(ids: np.ndarray) -> np.ndarray:
    """Position of the last POS/NEG/A/B token in each row (N,)."""
    marked = np.isin(ids, SENTIMENT)
    return ids.shape[1] - 1 - np.argmax(marked[:, ::-1], axis=1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), T=st.integers(2, 60), data=st.data(), vocab=st.integers(7, 30),
       seed=st.integers(0, 2**32 - 1))
def test_signal_is_exactly_d_from_the_end_and_decides(n, T, data, vocab, seed):
    k = data.draw(st.integers(0, T - 1), label="distractors")
    d = data.draw(st.integers(0, T - 1 - k), label="distance")
    ds = make_probe_data(n, T, d, "signal", vocab, np.random.default_rng(seed), distractors=k)
    assert ds.ids.shape == (n, T) and ds.ids.dtype == np.int32
    assert np.all(ds.lengths == T)
    assert ds.labels.sum() == n // 2                      # exactly balanced (extra row negative)
    decisive = ds.ids[:, T - 1 - d]
    assert np.array_equal(decisive, np.where(ds.labels == 1, POS, NEG))
    assert np.all(last_marked(ds.ids) == T - 1 - d)
    # Distractors: exactly k, all earlier, all of the opposite polarity; the rest is filler.
    opposite = np.where(ds.labels == 1, NEG, POS)[:, None]
    before = ds.ids[:, :T - 1 - d]
    assert np.all((before == opposite).sum(1) == k)
    assert np.all((before == opposite) | (before >= FIRST_FILLER))
    assert np.all(ds.ids[:, T - d:] >= FIRST_FILLER) and ds.ids.max(initial=0) < vocab


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), T=st.integers(2, 60), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_order_variant_a_before_b_is_positive(n, T, data, seed):
    d = data.draw(st.integers(0, T - 2), label="distance")
    ds = make_probe_data(n, T, d, "order", 12, np.random.default_rng(seed))
    assert np.all((ds.ids == A).sum(1) == 1) and np.all((ds.ids == B).sum(1) == 1)
    assert not np.isin(ds.ids, (POS, NEG)).any()
    pos_a, pos_b = np.argmax(ds.ids == A, 1), np.argmax(ds.ids == B, 1)
    assert np.array_equal(ds.labels, (pos_a < pos_b).astype(np.int8))
    assert np.all(np.maximum(pos_a, pos_b) == T - 1 - d)


def test_per_row_distances_and_reproducibility():
    dist = np.array([0, 3, 7, 1, 5, 2])
    one = make_probe_data(6, 10, dist, "signal", 9, np.random.default_rng(4), distractors=2)
    two = make_probe_data(6, 10, dist, "signal", 9, np.random.default_rng(4), distractors=2)
    other = make_probe_data(6, 10, dist, "signal", 9, np.random.default_rng(5), distractors=2)
    assert np.array_equal(last_marked(one.ids), 9 - dist)
    assert all(np.array_equal(x, y) for x, y in zip(one, two))
    assert not np.array_equal(one.ids, other.ids)


@pytest.mark.parametrize("kwargs, message", [
    (dict(distance=10), "distance must lie in"),
    (dict(distance=8, distractors=2), "distance must lie in"),
    (dict(distance=-1), "distance must lie in"),
    (dict(variant="negation"), "unknown probe variant"),
    (dict(vocab_size=6), "vocab_size must be > 6"),
    (dict(distractors=-1), "distractors must be >= 0"),
])
def test_generator_rejects_impossible_requests(kwargs, message):
    args = dict(n=4, T=10, distance=2, variant="signal", vocab_size=9, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=message):
        make_probe_data(**{**args, **kwargs})


TINY = {"distances": [1, 4], "lead": 2, "vocab_size": 8, "embed_dim": 4, "hidden_size": 5,
        "batch_size": 8, "steps": 6, "trace_steps": 2, "test_size": 16, "cells": ["rnn", "lstm"]}


def tiny_cfg(**overrides) -> dict:
    return pipeline_settings.validate({"probe": {**TINY, **overrides}})["probe"]


def test_config_validation():
    assert tiny_cfg(distances=[4, 1])["distances"] == [1, 4]
    for bad, message in [({"distances": [1, 1]}, "distinct integers"),
                         ({"distances": []}, "distinct integers"),
                         ({"distances": [2, True]}, "distinct integers"),
                         ({"cells": ["rnn", "transformer"]}, "probe.cells"),
                         ({"distractors": 3}, "probe.lead = 2: must be >= 3"),
                         ({"trace_steps": 7}, "probe.trace_steps"),
                         ({"clip_mode": "sometimes"}, "probe.clip_mode")]:
        with pytest.raises(ParamsError, match=message):
            tiny_cfg(**bad)
    assert set(pipeline_settings.Probe.model_fields) >= set(TINY)


class RecordingTracker:
    def __init__(self):
        self.metrics, self.artifacts, self.series = [], [], {}

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_series(self, key, values):
        self.series[key] = list(values)

    def log_artifact(self, path):
        self.artifacts.append(Path(path).name)


def test_tiny_probe_writes_metrics_plots_and_report(tmp_path):
    cfg = tiny_cfg()
    tracker = RecordingTracker()
    for cell in cfg["cells"]:
        metrics = run(cell, cfg, tmp_path, tracker if cell == "rnn" else None)
        assert set(metrics["accuracy"]) == {"1", "4"}
        assert all(0 <= a <= 1 for a in metrics["accuracy"].values())
    assert [step for step, _ in tracker.metrics] == [1, 4]       # MLflow's step axis is the distance
    assert set(tracker.metrics[0][1]) >= {"probe/accuracy", "probe/grad_ratio_last"}
    # The gradient trace at the largest distance, step = steps from the end (T = 4 + 1 + lead).
    assert sorted(tracker.series) == ["probe/log10_dL_da_first_steps", "probe/log10_dL_da_last_steps"]
    assert len(tracker.series["probe/log10_dL_da_last_steps"]) == 4 + 1 + cfg["lead"]
    assert tracker.artifacts == ["rnn.json", "rnn.csv", "rnn_trace.csv"]
    saved = json.loads((tmp_path / "probe/lstm.json").read_text())
    assert saved["settings"]["steps"] == 6 and saved["accuracy"] == metrics["accuracy"]
    with open(tmp_path / "probe/rnn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["distance"]) for r in rows] == [1, 4] and "grad_ratio_last" in rows[0]
    # The trace covers every step of the longest run (T = 4 + 1 + lead); only the LSTM has c.
    for cell, header in [("rnn", ["steps_from_end", "a_first", "a_last"]),
                         ("lstm", ["steps_from_end", "a_first", "c_first", "a_last", "c_last"])]:
        with open(tmp_path / f"probe/{cell}_trace.csv", newline="") as f:
            table = list(csv.reader(f))
        assert table[0] == header and len(table) == 1 + 4 + 1 + 2
    report(cfg["cells"], tmp_path)
    for name in ("probe_accuracy.png", "probe_gradients.png"):
        assert (tmp_path / "reports" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clipping_setting_is_applied():
    loose = probe_distance("rnn", 2, tiny_cfg(clip_threshold=1e6))
    tight = probe_distance("rnn", 2, tiny_cfg(clip_threshold=1e-6))
    assert loose["clipped_fraction"] == 0 and tight["clipped_fraction"] == 1


def test_grad_ratio_uses_the_memory_state():
    a, c = np.array([2.0, 1.0, 0.5]), np.array([0.0, 1.5, 1.0])
    assert grad_ratio({"a": a}, 2) == 0.25
    assert grad_ratio({"a": a, "c": c}, 2) == 0.5


def _probe(**overrides) -> ProbeConfig:
    return ProbeConfig(**{**dict(lead=2, train_distance="upto", variant="signal", distractors=0, batch_size=8,
                                 steps=6, test_size=16, optimizer="adam", lr=0.01, clip_mode="norm",
                                 clip_threshold=1.0, trace_steps=2, seed=0), **overrides})


def test_train_probe_is_seeded_and_traces_every_step_back():
    config = ModelConfig(vocab_size=8, cell="lstm", embed_dim=4, hidden_size=5)
    one, two = train_probe(config, 3, _probe()), train_probe(config, 3, _probe())
    other = train_probe(config, 3, _probe(seed=1))
    assert one["final_loss"] == two["final_loss"] and one["final_loss"] != other["final_loss"]
    for window in ("first", "last"):
        assert set(one["traces"][window]) == {"a", "c"}
        assert all(v.shape == (3 + 1 + 2,) for v in one["traces"][window].values())
    assert one["grad_ratio_last"] == grad_ratio(one["traces"]["last"], 3)


def test_train_probe_stops_on_a_non_finite_loss():
    config = ModelConfig(vocab_size=8, cell="rnn", embed_dim=4, hidden_size=5)
    with pytest.raises(TrainingDiverged, match=r"^rnn, distance 1, step 2: loss nan"), np.errstate(all="ignore"):
        train_probe(config, 1, _probe(optimizer="sgd", lr=float("inf"), clip_mode="none"))
    with pytest.raises(InputError, match=r"^probe rnn, distance 1, step 2: .*; lower probe.lr or set probe.clip_mode$"), \
            np.errstate(all="ignore"):
        probe_distance("rnn", 1, tiny_cfg(optimizer="sgd", lr=1e300, clip_mode="none"))


def test_short_distance_is_learned():
    # The probe must be able to tell memory from none: at distance 2 a GRU learns the task.
    r = probe_distance("gru", 2, tiny_cfg(steps=60, batch_size=32, hidden_size=8, lr=0.03,
                                          test_size=200))
    assert r["accuracy"] > 0.9


def test_stage_command_line(tmp_path):
    params = {**TINY, "cells": ["lstm"]}
    write_params(tmp_path, "mlflow:\n  enabled: false\nprobe:\n"
                 + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in params.items()))
    env = {**os.environ, "DVC_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for command in (["stages.probe", "lstm"], ["stages.probe_report"]):
        done = subprocess.run([sys.executable, "-m", *command], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "probe/lstm.json").read_text())["settings"]["lead"] == 2
    assert (tmp_path / "reports/probe_gradients.png").is_file()


def test_unknown_cell_argument(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["probe.py", "transformer"])
    with pytest.raises(ParamsError, match="unknown cell 'transformer'"):
        main()
