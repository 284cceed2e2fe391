"""The NBSVM baseline stage on a small synthetic archive: outputs, accuracy, order, errors, atomicity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rnn.errors import InputError
from stages import baseline, download, prepare, settings

ROOT = Path(__file__).resolve().parents[1]
DATA_CFG = {"url": "unused", "md5": "unused", "limit": None, "retries": 0, "timeout": 1.0}
PREP_CFG = {"max_len": 30, "truncate": "both", "vocab_size": 50, "min_freq": 1, "val_fraction": 0.2, "seed": 0}
CFG = settings.validate({})["baseline"]          # the defaults of params.yaml


@pytest.fixture
def project(tmp_path, make_imdb_archive) -> Path:
    """A project folder with data/raw and data/prepared from 150 + 150 reviews per split."""
    download.run(DATA_CFG, tmp_path, str(make_imdb_archive(n_per_class=75, unsup=2)))
    prepare.run(PREP_CFG, tmp_path)
    return tmp_path


def test_stage_writes_its_outputs_in_the_test_order_and_beats_chance(project):
    metrics = baseline.run(CFG, project)

    saved = json.loads((project / baseline.METRICS).read_text())
    assert saved.pop("peak_rss_mb") > 0      # the file adds the stage's peak memory to what run() returns
    assert saved == metrics and saved["settings"] == CFG
    assert {"accuracy", "f1", "roc_auc", "train_seconds", "features", "val_accuracy"} <= set(saved)
    # The synthetic reviews carry sentiment words: far from chance (0.5) on test and validation.
    assert saved["accuracy"] > 0.9 and saved["roc_auc"] > 0.95 and saved["val_accuracy"] > 0.8, saved
    assert saved["n"] == 150 and saved["train_reviews"] == len(np.load(project / "data/prepared/train.npz")["labels"])

    with np.load(project / baseline.PREDICTIONS) as npz:
        pred = {k: npz[k] for k in npz.files}
    test = pd.read_parquet(project / "data/raw/test.parquet")
    prepared = np.load(project / "data/prepared/test.npz")
    assert pred["probabilities"].dtype == np.float32 and pred["probabilities"].shape == (150,)
    assert ((pred["probabilities"] >= 0) & (pred["probabilities"] <= 1)).all()
    assert pred["labels"].tolist() == test["label"].tolist() == prepared["labels"].tolist()
    assert pred["review_ids"].tolist() == test["id"].tolist() == prepared["review_ids"].tolist()
    assert ((pred["probabilities"] >= 0.5) == pred["labels"]).mean() == saved["accuracy"]

    again = baseline.run(CFG, project)                 # same settings and seed: same numbers
    assert {k: v for k, v in again.items() if "seconds" not in k} == \
        {k: v for k, v in metrics.items() if "seconds" not in k}


def test_training_reads_the_prepared_train_part_only(project):
    texts, labels, ids = baseline.read_reviews(project / "data/raw/train.parquet", project / "data/prepared/train.npz")
    part = np.load(project / "data/prepared/train.npz")
    assert ids.tolist() == part["review_ids"].tolist() and labels.tolist() == part["labels"].tolist()
    val = np.load(project / "data/prepared/val.npz")
    val_keys = set(zip(val["review_ids"].tolist(), val["labels"].tolist()))
    assert not val_keys & set(zip(ids.tolist(), labels.tolist())) and len(texts) == len(ids) == 120
    raw = pd.read_parquet(project / "data/raw/train.parquet").set_index(["id", "label"])["text"]
    assert texts[5] == raw[(int(ids[5]), int(labels[5]))]      # whole text, not the 30-token cut


def test_prepared_data_of_other_reviews_is_refused_in_one_line(project):
    test = pd.read_parquet(project / "data/raw/test.parquet")
    test.iloc[::-1].to_parquet(project / "data/raw/test.parquet", index=False)
    with pytest.raises(InputError, match=r"test.npz and .*test.parquet list other reviews; rerun the prepare stage$"):
        baseline.run(CFG, project)
    train = pd.read_parquet(project / "data/raw/train.parquet")
    train.iloc[1:].to_parquet(project / "data/raw/train.parquet", index=False)
    with pytest.raises(InputError, match=r"npz: review \d+ \(label \d\) is not in .*train.parquet"):
        baseline.run(CFG, project)
    assert not (project / baseline.METRICS).exists() and not (project / "data/predictions").exists()


def test_outputs_are_atomic(project, monkeypatch):
    baseline.run(CFG, project)
    before = {p: (project / p).read_bytes() for p in (baseline.METRICS, baseline.PREDICTIONS)}

    def full_disk(self, rel, **arrays):
        raise OSError(28, "No space left on device", str(self.path(rel)))

    monkeypatch.setattr(baseline.Outputs, "save_npz", full_disk)
    with pytest.raises(OSError, match="No space left on device: 'data/predictions/baseline.npz'"):
        baseline.run({**CFG, "C": 0.1}, project)
    assert {p: (project / p).read_bytes() for p in before} == before      # the old outputs, both
    assert not [p for p in project.rglob("*.tmp-*")]


@pytest.mark.parametrize("key, value, message", [
    ("C", 0, "params.yaml: baseline.C = 0: must be > 0"),
    ("ngram_max", 4, "params.yaml: baseline.ngram_max = 4: must be <= 3"),
    ("beta", 1.5, "params.yaml: baseline.beta = 1.5: must be <= 1"),
    ("min_df", 0, "params.yaml: baseline.min_df = 0: must be >= 1"),
    ("alpha", "one", "params.yaml: baseline.alpha = 'one': must be a number"),
    ("Cc", 1, "params.yaml: unknown key baseline.Cc (did you mean baseline.C?)"),
])
def test_bad_settings_are_one_line_errors(key, value, message):
    with pytest.raises(settings.ParamsError) as info:
        settings.validate({"baseline": {key: value}})
    assert str(info.value) == message


def run_script(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "stages.baseline"], cwd=cwd, capture_output=True, text=True,
                          env=full_env | {"PYTHONPATH": str(ROOT)} | env, timeout=300)


def test_script_logs_an_mlflow_run_and_reports_bad_input_in_one_line(project, tmp_path):
    (project / "params.yaml").write_text("baseline: {C: 2.0}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_script(project, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stderr
    assert "baseline (NBSVM): test accuracy" in proc.stdout

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("imdb-sentiment")        # the cells' experiment
    [run] = client.search_runs([experiment.experiment_id])
    saved = json.loads((project / baseline.METRICS).read_text())
    assert run.info.status == "FINISHED" and run.data.tags["cell"] == "baseline"
    assert run.data.params["baseline.C"] == "2.0" and run.data.metrics["accuracy/test"] == saved["accuracy"]

    (project / "params.yaml").write_text("baseline: {C: -1}\nmlflow: {enabled: false}\n")
    proc = run_script(project)
    assert proc.returncode == 2 and proc.stderr == "error: params.yaml: baseline.C = -1: must be > 0\n"
    (project / "params.yaml").write_text("mlflow: {enabled: false}\n")
    (project / "data/prepared/val.npz").unlink()
    proc = run_script(project)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and "val.npz: not found (run the prepare stage first)" in proc.stderr
