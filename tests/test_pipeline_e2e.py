"""The whole DVC pipeline, for real, on a tiny synthetic IMDB archive in a copy of the project.

check -> download -> prepare -> embed -> pretrain@<cell> -> train@<cell> -> evaluate@<cell> ->
compare (and the probe) via `dvc repro`: the models must beat chance clearly, the MLflow store must
hold their runs. Then a second `dvc repro` that must run nothing but the check, edits that make
exactly the right stages stale, mistakes (a typo, a missing archive) that must stop `dvc repro` and
`dvc exp run` before any output is touched, another archive that must rerun the download (the same
one elsewhere must not), and `dvc exp run -S train.lr=...` that `dvc exp show` must list, opening
with the cells' accuracies. MLflow writes to a SQLite store beside the copy, which the test opens.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from helpers import build_imdb_archive, copy_project

REPO = Path(__file__).resolve().parents[1]
COPY = ["rnn", "stages", "sweeps", "params.yaml", "dvc.yaml", ".dvc/config", ".dvcignore", "pyproject.toml",
        ".gitignore"]
# Two cells keep the run short (each stage pays ~3 s of imports) and still cover foreach and the
# LSTM's extra cell-state trace; the unit tests train every cell.
CELLS = ["rnn", "lstm"]
SEEDS = [0, 1]          # two replicates per cell cover the cell x seed stages and the intervals
REPLICATES = [(c, s) for c in CELLS for s in SEEDS]
N_TEST = 800            # reviews per split: enough for the models to learn the synthetic cues


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    copy_project(COPY, REPO, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["limit"] = N_TEST
    params["prepare"].update(max_len=40, vocab_size=300, min_freq=1)
    # Measured: test accuracy 0.95-0.98 for both cells; the plain RNN needs max pooling to carry the
    # cues over 40 tokens (with `last` it stays at chance on so little data).
    params["train"].update(cells=CELLS, seeds=SEEDS, epochs=3, lr=0.01, hidden_size=16, embed_dim=16, batch_size=32, workers=2)
    # the trained cells keep their default overrides (the LSTM's: bidirectional); the GRU's goes with its cell
    params["train"]["overrides"] = {cell: params["train"]["overrides"].get(cell, {}) for cell in CELLS}
    params["train"]["overrides"]["rnn"] = {"pooling": "max"}
    params["pretrain"].update(epochs=1, batch_size=32, num_sampled=64, val_reviews=20)
    params["mlflow"] = {**(params.get("mlflow") or {}), "enabled": True}
    if "probe" in params:  # part of the same `dvc repro`; its defaults take minutes
        params["probe"].update(cells=CELLS, distances=[1, 3], lead=3, steps=4, trace_steps=2,
                               test_size=16, batch_size=8, hidden_size=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(
        # dvc's stage commands call plain `python`: the venv's must come first.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        IMDB_ARCHIVE=str(build_imdb_archive(tmp_path / "imdb.tar.gz", n_per_class=N_TEST // 2, unsup=5)),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
        CI="1",
    )
    return env


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check_outputs(root: Path) -> None:
    for cell, seed in REPLICATES:
        replicate = f"{cell}/seed{seed}"
        model = root / "models" / replicate
        assert sorted(p.name for p in model.iterdir()) == ["config.json", "encoder.json", "weights.npz"]
        train = json.loads((root / "metrics" / replicate / "train.json").read_text())
        assert 1 <= train["epochs_run"] <= 3 and 0 <= train["best_val_accuracy"] <= 1 and train["seed"] == seed
        evaluation = json.loads((root / "metrics" / replicate / "eval.json").read_text())
        # The cues are learnable: a model that does not beat chance clearly (or inverted
        # probabilities somewhere between training and evaluation) fails here.
        assert evaluation["accuracy"] > 0.8 and evaluation["roc_auc"] > 0.9, (cell, evaluation)
        assert evaluation["n"] == N_TEST and sum(evaluation["confusion"].values()) == N_TEST
        predictions = np.load(root / "data/predictions" / f"{replicate}.npz")
        assert ((predictions["probabilities"] >= 0.5) == predictions["labels"]).mean() == evaluation["accuracy"]
        plots = root / "plots" / replicate
        history = _csv(plots / "history.csv")
        assert [int(r["epoch"]) for r in history] == list(range(1, train["epochs_run"] + 1))
        states = {r["state"] for r in _csv(plots / "grad_trace.csv")}
        assert states == ({"a", "c"} if cell == "lstm" else {"a"})
        roc = _csv(plots / "roc.csv")
        assert (float(roc[0]["fpr"]), float(roc[-1]["tpr"])) == (0.0, 1.0)
        assert sum(int(r["count"]) for r in _csv(plots / "length_buckets.csv")) == N_TEST
        assert len(_csv(plots / "confusion.csv")) == N_TEST
        for png in ("grad_trace.png", "roc.png", "confusion.png"):
            assert (plots / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plots / png
    overrides = yaml.safe_load((root / "params.yaml").read_text())["train"]["overrides"]
    for cell in CELLS:
        pretrain = json.loads((root / "metrics" / cell / "pretrain.json").read_text())
        assert pretrain["epochs_run"] == 1 and 1 < pretrain["val_perplexity"] < 300 and pretrain["tokens"] > 0
        assert (root / "models" / "lm" / cell / "weights.npz").is_file()
        directions = ["forward", "backward"] if overrides[cell].get("bidirectional") else ["forward"]
        assert [(r["direction"], int(r["epoch"])) for r in _csv(root / "plots" / cell / "pretrain.csv")] == \
            [(direction, 1) for direction in directions]
    # Seed 0 and seed 1 are different replicates: another initialisation, data order and dropout.
    assert (root / "models/lstm/seed0/weights.npz").read_bytes() != (root / "models/lstm/seed1/weights.npz").read_bytes()
    summary = _csv(root / "reports" / "summary.csv")
    assert [r["model"] for r in summary] == CELLS + ["baseline"]
    headline = json.loads((root / "reports" / "summary.json").read_text())
    assert list(headline["cells"]) == CELLS and set(headline["pairs"]) == {"lstm-rnn", "rnn-baseline", "lstm-baseline"}
    for cell in CELLS:
        accuracy = headline["cells"][cell]["test_accuracy"]
        assert accuracy["seeds"] == SEEDS and accuracy["ci95"][0] <= accuracy["mean"] <= accuracy["ci95"][1]
        assert accuracy["mean"] == np.mean([json.loads((root / "metrics" / cell / f"seed{s}" / "eval.json").read_text())
                                            ["accuracy"] for s in SEEDS])
    assert "| LSTM | 2 |" in (root / "reports" / "summary.md").read_text()
    for png in ("val_accuracy.png", "grad_trace.png", "probe_accuracy.png", "probe_gradients.png"):
        assert (root / "reports" / png).read_bytes()[:4] == b"\x89PNG", png
    for cell in CELLS:
        probe = _csv(root / "probe" / f"{cell}.csv")
        assert [int(r["distance"]) for r in probe] == [1, 3]
        assert all(0 <= float(r["accuracy"]) <= 1 for r in probe)
        assert json.loads((root / "probe" / f"{cell}.json").read_text())
        assert _csv(root / "probe" / f"{cell}_trace.csv")
    assert not any((root / "checkpoints").rglob("checkpoint.npz")), "checkpoints left after success"
    # Every stage's metrics carry its peak memory (train's with its two workers').
    metric_files = [*(root / "metrics").rglob("*.json"), *(root / "probe").glob("*.json"), root / "reports/summary.json"]
    assert len(metric_files) == 1 + 1 + 2 * len(REPLICATES) + 2 * len(CELLS) + 1 + 1, metric_files
    for path in metric_files:
        assert json.loads(path.read_text())["peak_rss_mb"] > 0, path
    nbsvm = json.loads((root / "metrics" / "baseline" / "eval.json").read_text())
    assert nbsvm["accuracy"] > 0.8 and nbsvm["n"] == N_TEST, nbsvm
    assert (root / "data" / "predictions" / "baseline.npz").is_file()


def _outputs_digest(root: Path) -> dict[str, str]:
    """sha256 of every output file of the pipeline (models, data, metrics, plots, reports, probe)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("models", "data", "metrics", "plots", "reports", "probe")
            for p in sorted((root / folder).rglob("*")) if p.is_file() and "download" not in p.parts}


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def test_dvc_pipeline_end_to_end(tmp_path: Path) -> None:
    root, env = _project(tmp_path), _env(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q", "-b", "main"], root, env)
    _run(["git", "add", "."], root, env)
    _run(["git", "commit", "-q", "-m", "project"], root, env)

    stages = _run(dvc + ["stage", "list", "--name-only"], root, env).stdout.split()
    assert ["compare"] + [f"train@{c}-{s}" for c, s in REPLICATES] + [f"evaluate@{c}-{s}" for c, s in REPLICATES] == \
        [s for s in stages if s.startswith(("train@", "evaluate@", "compare"))]

    first = _run(dvc + ["repro"], root, env).stdout
    assert _ran(first)[0] == "check", _ran(first)
    _check_outputs(root)
    _check_mlflow_store(root, env["MLFLOW_TRACKING_URI"])
    _run(["git", "add", "."], root, env)
    _run(["git", "commit", "-q", "-m", "pipeline outputs"], root, env)

    again = _run(dvc + ["repro"], root, env).stdout
    assert _ran(again) == ["check"], again
    _check_what_reruns(root, env)
    _check_mistakes_touch_nothing(root, env)
    _check_the_archive_is_a_dependency(root, env, tmp_path)

    metrics = json.dumps(json.loads(_run(dvc + ["metrics", "show", "--json"], root, env).stdout))
    assert "metrics/lstm/seed1/eval.json" in metrics and "best_val_accuracy" in metrics
    plots = json.loads(_run(dvc + ["plots", "show", "--json"], root, env).stdout)["data"]
    assert {"val_accuracy", "grad_trace"} <= set(plots), sorted(plots)

    _run(dvc + ["exp", "run", "-S", "train.lr=0.005"], root, env)
    shown = json.loads(_run(dvc + ["exp", "show", "--json"], root, env).stdout)
    experiments = [rev for baseline in shown for exp in baseline.get("experiments") or []
                   for rev in exp["revs"]]
    lrs = [rev["data"]["params"]["params.yaml"]["data"]["train"]["lr"] for rev in experiments]
    assert 0.005 in lrs, f"dvc exp show lists no experiment with train.lr=0.005: {lrs}"
    # The metric columns open with the headline; provenance is no metric.
    metric_files = list(shown[0]["data"]["metrics"])
    assert metric_files[0] == "reports/summary.json" and not any("download" in f for f in metric_files)


def _check_mlflow_store(root: Path, uri: str) -> None:
    """The store the stages logged to, through MLflow's API: one run per cell holding training and
    test metrics, datasets with DVC's hashes, a logged model; the probe runs; the experiment kind."""
    from mlflow import MlflowClient

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    dvc_md5 = {o["path"]: o["md5"] for o in lock["prepare"]["outs"]}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("imdb-sentiment")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    # One run per replicate, named <cell>-<seed> and tagged cell (the UI groups by it) and seed;
    # the NBSVM baseline's run beside them.
    assert sorted(runs) == sorted([f"{c}-{s}" for c, s in REPLICATES] + ["baseline"])
    assert runs["baseline"].data.metrics["accuracy/test"] == json.loads(
        (root / "metrics" / "baseline" / "eval.json").read_text())["accuracy"]
    for cell, seed in REPLICATES:
        run, replicate = runs[f"{cell}-{seed}"], f"{cell}/seed{seed}"
        assert run.info.status == "FINISHED" and (run.data.tags["cell"], run.data.tags["seed"]) == (cell, str(seed))
        assert run.data.tags["dvc.stages"] == f"train@{cell}-{seed},evaluate@{cell}-{seed}"
        assert run.data.params["train.seed"] == str(seed)
        meta = json.loads((root / "models" / replicate / "config.json").read_text())["metadata"]
        assert run.data.tags["params_hash"] == meta["params_hash"]
        evaluation = json.loads((root / "metrics" / replicate / "eval.json").read_text())
        assert run.data.metrics["accuracy/test"] == evaluation["accuracy"]
        assert {"accuracy/val", "loss/train", "gradient/log10_dL_da_last_epoch"} <= set(run.data.metrics)
        assert ("gradient/log10_dL_dc_last_epoch" in run.data.metrics) == (cell == "lstm")
        datasets = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert datasets == {f"imdb-{s}": dvc_md5[f"data/prepared/{s}.npz"] for s in ("train", "val", "test")}
        [model] = run.outputs.model_outputs
        assert client.get_logged_model(model.model_id).source_run_id == run.info.run_id
    lms = client.get_experiment_by_name("language-models")
    runs = {r.info.run_name: r for r in client.search_runs([lms.experiment_id])}
    overrides = yaml.safe_load((root / "params.yaml").read_text())["train"]["overrides"]
    assert sorted(runs) == sorted([f"pretrain@{c}" for c in CELLS]      # a bidirectional cell's backward model too
                                  + [f"pretrain@{c}-backward" for c in CELLS if overrides[c].get("bidirectional")])
    for cell in CELLS:
        pretrain = json.loads((root / "metrics" / cell / "pretrain.json").read_text())
        assert runs[f"pretrain@{cell}"].data.metrics["perplexity/val_best"] == pretrain["val_perplexity"]
    probe = client.get_experiment_by_name("memory-probe")
    runs = {r.info.run_name: r for r in client.search_runs([probe.experiment_id])}
    assert sorted(runs) == sorted(f"probe@{c}" for c in CELLS)
    for cell in CELLS:
        history = client.get_metric_history(runs[f"probe@{cell}"].info.run_id, "probe/accuracy")
        assert sorted(m.step for m in history) == [1, 3]          # step = distance


def _check_what_reruns(root: Path, env: dict) -> None:
    """An edit makes exactly the stages that read what changed stale (`dvc status`)."""
    def stale_after(path: str, edit) -> set[str]:
        file = root / path
        original = file.read_text()
        # What the check stage writes from params.yaml (data/lm/<cell>.json) follows an edit when it
        # runs, as it does first in every `dvc repro`.
        check = [sys.executable, "-m", "stages.check"] if path == "params.yaml" else ["true"]
        file.write_text(edit(original))
        try:
            _run(check, root, env)
            out = _run([sys.executable, "-m", "dvc", "status", "--json"], root, env).stdout
            return set(json.loads(out or "{}")) - {"check"}         # always_changed: it runs every time
        finally:
            file.write_text(original)
            _run(check, root, env)

    def set_params(**changes):
        def edit(text: str) -> str:
            params = yaml.safe_load(text)
            for key, value in changes.items():
                *path, last = key.split("__")
                section = params
                for name in path:
                    section = section[name]
                old = section.get(last)     # a mapping is added to (a cell's default override stays)
                section[last] = {**old, **value} if isinstance(value, dict) and isinstance(old, dict) else value
            return yaml.safe_dump(params, sort_keys=False)
        return edit

    def comment(text: str) -> str:
        return text + "\n# an edit\n"

    def each(stage: str, cells: list[str] = CELLS) -> set[str]:
        per_seed = stage in ("train", "evaluate")
        return {f"{stage}@{c}-{s}" if per_seed else f"{stage}@{c}" for c in cells for s in (SEEDS if per_seed else [0])}

    # A train-only setting retrains; only the language model's shape or the pretrain section repretrains.
    assert stale_after("params.yaml", set_params(train__overrides__lstm={"lr": 0.01, "dropout": 0.2})) == \
        each("train", ["lstm"])
    assert stale_after("params.yaml", set_params(train__lr=0.02)) == each("train")
    assert stale_after("params.yaml", set_params(train__overrides__lstm={"hidden_size": 8})) == \
        each("pretrain", ["lstm"]) | each("train", ["lstm"])
    assert stale_after("params.yaml", set_params(train__forget_bias=0.5)) == each("pretrain") | each("train")
    assert stale_after("params.yaml", set_params(pretrain__lr=0.01)) == each("pretrain")
    # Another seed is another replicate: the first seed's stages stay as they are.
    assert stale_after("params.yaml", set_params(train__seeds=[0, 2])) == {f"{s}@{c}-2" for s in ("train", "evaluate")
                                                                         for c in CELLS} | {"compare"}
    assert stale_after("rnn/cli.py", comment) == set()
    assert stale_after("stages/tracking.py", comment) == set()
    assert stale_after("rnn/metrics.py", comment) == each("evaluate") | {"baseline"}
    assert stale_after("rnn/stats.py", comment) == {"compare"}
    assert stale_after("rnn/probe.py", comment) == each("probe")
    assert stale_after("rnn/imdb.py", comment) == {"download"}
    assert stale_after("rnn/text.py", comment) == {"prepare", "embed", "baseline"} | each("pretrain") | each("evaluate")


def _failed(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, f"{' '.join(args)} succeeded:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _check_mistakes_touch_nothing(root: Path, env: dict) -> None:
    """A typo in params.yaml or a missing archive stops `dvc repro` and `dvc exp run` in the check
    stage, before DVC removes any output (issue 17, item 4)."""
    dvc = [sys.executable, "-m", "dvc"]
    before = _outputs_digest(root)
    params = root / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("  lr: 0.01\n", "  lr: fast\n", 1))
    try:
        for command in (["repro"], ["exp", "run"]):
            out = _failed(dvc + command, root, env)
            assert "error: params.yaml: train.lr = 'fast': must be a number" in out, out
            assert _ran(out) == ["check"], out
            assert _outputs_digest(root) == before          # the check's own outputs persist too
    finally:
        params.write_text(original)
    # Any failure of the check stops DVC the same way; test_reliability.py has the other kinds.
    out = _failed(dvc + ["repro"], root, {**env, "IMDB_ARCHIVE": str(root / "no-such.tar.gz")})
    assert _ran(out) == ["check"] and "no-such.tar.gz: no such file" in out, out
    _run(dvc + ["repro"], root, env)                    # the check's own outputs come back
    assert _outputs_digest(root) == before


def _check_the_archive_is_a_dependency(root: Path, env: dict, tmp_path: Path) -> None:
    """The same archive elsewhere reruns nothing; another archive reruns the download (item 1)."""
    dvc = [sys.executable, "-m", "dvc"]
    moved = tmp_path / "elsewhere" / "copy.tar.gz"
    moved.parent.mkdir()
    shutil.copy(env["IMDB_ARCHIVE"], moved)
    out = _run(dvc + ["repro", "download"], root, {**env, "IMDB_ARCHIVE": str(moved)}).stdout
    assert _ran(out) == ["check"], out
    other = build_imdb_archive(tmp_path / "other.tar.gz", n_per_class=N_TEST // 2, unsup=5, seed=1)
    out = _run(dvc + ["repro", "download"], root, {**env, "IMDB_ARCHIVE": str(other)}).stdout
    assert _ran(out) == ["check", "download"], out
    _run(dvc + ["repro", "download"], root, env)        # back to the first archive's data
    assert set(json.loads(_run(dvc + ["status", "--json"], root, env).stdout)) == {"check"}
