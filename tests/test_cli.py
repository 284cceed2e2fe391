"""The `rnn` command: predict, evaluate, explain, runs, and errors; called in-process via main(argv)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnn.cli import main
from rnn.metrics import binary_metrics
from rnn.predict import load_model
from test_predict import toy_sentences, train_toy_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(train_toy_model(tmp_path_factory.mktemp("model") / "lstm"))


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------------------------ predict
def test_predict_texts_as_arguments(capsys, model):
    status, out, _ = run(capsys, "predict", "--model", model, "the movie was great", "an awful plot")
    assert status == 0
    header, first, second = out.splitlines()
    assert header.split() == ["label", "prob", "text"]
    assert first.startswith("positive") and first.endswith("the movie was great")
    assert second.startswith("negative") and float(second.split()[1]) > 0.5


def test_predict_json_lines(capsys, model):
    status, out, _ = run(capsys, "predict", "--model", model, "--json", "wonderful film", "")
    rows = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [r["text"] for r in rows] == ["wonderful film", ""]
    assert rows[0]["label"] == "positive" and rows[0]["probability"] == rows[0]["p_positive"] > 0.5
    assert rows[1]["probability"] == pytest.approx(max(rows[1]["p_positive"], 1 - rows[1]["p_positive"]))


def test_predict_from_text_file_csv_and_stdin(capsys, model, tmp_path, monkeypatch):
    txt = tmp_path / "reviews.txt"
    txt.write_text("a great story\n\nboring actor\n", encoding="utf-8")      # blank lines skipped
    csv = tmp_path / "reviews.csv"
    csv.write_text('id,text\n1,"a great story"\n2,"boring, boring actor"\n', encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a great story\nboring actor\n"))
    results = []
    for extra in (["--file", txt], ["--file", csv], []):
        status, out, _ = run(capsys, "predict", "--model", model, "--json", *extra)
        assert status == 0
        results.append([json.loads(line)["label"] for line in out.splitlines()])
    assert results == [["positive", "negative"]] * 3


# ----------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path, list[str], np.ndarray]:
    """The same 40 toy reviews as a pos/neg folder and as a CSV."""
    root = tmp_path_factory.mktemp("labelled")
    texts, labels = toy_sentences(np.random.default_rng(7), 40)
    for i, (text, y) in enumerate(zip(texts, labels)):
        folder = root / "corpus" / ("pos" if y else "neg")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}_{9 if y else 2}.txt").write_text(text, encoding="utf-8")
    (root / "corpus" / "README").write_text("not a review")
    names = {1: "positive", 0: "neg"}
    csv = root / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{names[y] if i % 2 else y}\n"
                                            for i, (t, y) in enumerate(zip(texts, labels))))
    return root / "corpus", csv, texts, labels


def test_evaluate_folder_and_csv_match_the_predictor(capsys, model, labelled):
    corpus, csv, texts, labels = labelled
    for source in (["--dir", corpus], ["--csv", csv]):
        expected = binary_metrics(labels, load_model(model).predict_proba(texts))
        assert expected["accuracy"] >= 0.9
        status, out, _ = run(capsys, "evaluate", "--model", model, "--json", *source)
        assert status == 0
        report = json.loads(out)
        assert report["data"] == str(source[1])
        assert report["confusion"] == expected.pop("confusion")
        assert {k: report[k] for k in expected} == pytest.approx(expected)


def test_evaluate_prints_a_readable_report(capsys, model, labelled):
    corpus, _, texts, labels = labelled
    m = binary_metrics(labels, load_model(model).predict_proba(texts))
    status, out, _ = run(capsys, "evaluate", "--model", model, "--dir", corpus)
    assert status == 0
    lines = out.splitlines()
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    assert lines[1] == f"data       {corpus}: 40 reviews ({n_pos} positive, {n_neg} negative)"
    assert f"accuracy   {m['accuracy']:.4f}" in lines and f"roc_auc    {m['roc_auc']:.4f}" in lines
    (tn, fp), (fn, tp) = m["confusion"]
    assert [line.split() for line in lines[-4:]] == [
        ["confusion", "predicted"], ["actual", "negative", "positive"],
        ["negative", str(tn), str(fp)], ["positive", str(fn), str(tp)]]


def test_evaluate_on_two_workers_matches_one(capsys, model, tmp_path):
    """600 reviews are three batches of 256: --workers 2 scores them on two processes."""
    texts, labels = toy_sentences(np.random.default_rng(8), 600)
    csv = tmp_path / "many.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    reports = []
    for workers in ("1", "2", "auto"):
        status, out, _ = run(capsys, "evaluate", "--model", model, "--json", "--csv", csv, "--workers", workers)
        assert status == 0
        reports.append(json.loads(out))
    assert reports[0]["confusion"] == reports[1]["confusion"] == reports[2]["confusion"]
    for key in ("accuracy", "roc_auc", "log_loss"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=1e-6), key


# ------------------------------------------------------------------------------------ explain
def test_explain_colours_and_ranks_the_deciding_word(capsys, model):
    status, out, _ = run(capsys, "explain", "--model", model, *"the plot was awful and a film".split())
    lines = out.splitlines()
    assert status == 0 and lines[0].startswith("negative")
    assert "\x1b[1;38;2;230;40;40mawful\x1b[0m" in lines[1]          # strongest word: bold full red
    top = lines[lines.index("strongest words (change in logit when left out):") + 1]
    assert "awful" in top and float(top.split()[0]) < 0


def test_explain_plain_text_and_html(capsys, model, tmp_path):
    page = tmp_path / "out" / "explain.html"
    status, out, _ = run(capsys, "explain", "--model", model, "--no-color", "--html", page,
                         "A <b>wonderful</b> film & story")
    assert status == 0 and "\x1b[" not in out
    words = out.splitlines()[1].split()
    assert [w.split("(")[0] for w in words] == ["a", "wonderful", "film", "story"]
    assert float(words[1].split("(")[1].rstrip(")")) > 0
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and "<h1>positive" in text
    assert 'style="background:rgba(0,170,0,0.80)">wonderful</span>' in text
    assert [p.name for p in page.parent.iterdir()] == ["explain.html"]       # no temporary left


def test_explain_notes_truncation(capsys, model):
    status, out, _ = run(capsys, "explain", "--model", model, "--no-color", " ".join(["film"] * 20))
    assert status == 0 and "(the model reads 12 of the 20 words: truncate=head)" in out.splitlines()


def test_explain_empty_text(capsys, model, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    status, out, _ = run(capsys, "explain", "--model", model)
    assert status == 0 and out.splitlines()[1] == "no words to explain"


# --------------------------------------------------------------------------------------- runs
def test_runs_lists_the_experiment(capsys, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    (tmp_path / "params.yaml").write_text("mlflow:\n  experiment: toy-exp\n")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("toy-exp")
    # As stages/tracking.py logs them: tag "cell", the train section with the cell's overrides
    # merged (lstm overrides lr) plus those overrides as one JSON param, stage metrics.
    for start, cell, acc, lr, over in ((1_700_000_000_000, "gru", 0.81, 0.002, "{}"),
                                       (1_700_000_060_000, "lstm", 0.875, 0.001, '{"lr": 0.001}')):
        r = client.create_run(exp, start_time=start, run_name=cell, tags={"cell": cell})
        for key, value in {"train.lr": lr, "train.hidden_size": 128, "train.overrides": over,
                           "train.clip.mode": "norm"}.items():
            client.log_param(r.info.run_id, key, value)
        client.log_metric(r.info.run_id, "accuracy/test", acc)
        client.log_metric(r.info.run_id, "train/epochs_run", 6)
        client.set_terminated(r.info.run_id)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    status, out, _ = run(capsys, "runs")
    assert status == 0
    title, header, *rows = out.splitlines()
    assert "'toy-exp'" in title and "2 runs" in title
    assert header.split() == ["run", "cell", "status", "started", "lr", "hidden_size", "test_acc", "epochs"]
    assert rows[0].split()[:3] == ["lstm", "lstm", "FINISHED"]      # newest first
    assert rows[0].split()[-4:] == ["0.001", "128", "0.875", "6"]  # lstm's lr override wins
    assert rows[1].split()[:3] == ["gru", "gru", "FINISHED"]
    assert rows[1].split()[-4:] == ["0.002", "128", "0.81", "6"]


def test_runs_without_a_store_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    status, out, err = run(capsys, "runs")
    assert status == 2 and out == ""
    store = tmp_path.resolve() / "mlflow.db"
    assert err == f"rnn runs: error: no MLflow store at {store}: nothing tracked yet\n"
    assert not (tmp_path / "mlflow.db").exists()


# ----------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def language_model(tmp_path_factory, model) -> str:
    """An (untrained) language model folder with the toy classifier's vocabulary."""
    from rnn.io import read_model, save_model
    from rnn.lm import LanguageModel
    from rnn.model import ModelConfig

    _, encoder, _ = read_model(model)
    config = ModelConfig(vocab_size=len(encoder["tokens"]), cell="gru", embed_dim=8, hidden_size=8,
                         task="language_model")
    folder = tmp_path_factory.mktemp("lm") / "gru"
    save_model(folder, LanguageModel.create(config, np.random.default_rng(0)), encoder=encoder)
    return str(folder)


def test_generate_is_reproducible_for_a_seed(capsys, language_model):
    argv = ["generate", "--model", language_model, "A great", "film", "--tokens", "12", "--seed", "3"]
    status, first, err = run(capsys, *argv)
    assert status == 0 and err == ""
    words = first.split()
    assert words[:3] == ["a", "great", "film"] and len(words) == 3 + 12
    assert run(capsys, *argv)[1] == first
    assert run(capsys, *argv[:-1], "4")[1] != first
    status, out, _ = run(capsys, *argv, "--json", "--temperature", "0")
    record = json.loads(out)
    assert record["text"].split()[:3] == ["a", "great", "film"] and record["temperature"] == 0.0
    assert run(capsys, *argv, "--json", "--temperature", "0")[1] == out          # greedy: no randomness


def test_models_of_the_other_kind_are_refused_in_one_line(capsys, model, language_model):
    status, out, err = run(capsys, "generate", "--model", model, "great")
    assert status == 2 and "a sentiment classifier, not a language model" in err and err.count("\n") == 1
    status, out, err = run(capsys, "predict", "--model", language_model, "great")
    assert status == 2 and "a language model, not a sentiment classifier" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["predict", "--model", "{tmp}/nope", "x"], "no such model folder"),
    (["predict", "--model", "{model}", "--file", "{tmp}/missing.txt"], "missing.txt"),
    (["predict", "--model", "{model}", "--file", "{tmp}/bad.csv"], "no column 'text'"),
    (["predict", "--model", "{model}", "--file", "{tmp}/empty.txt"], "no reviews in"),
    (["predict", "--model", "{model}", "--file", "{tmp}/empty.txt", "x"], "not both"),
    (["evaluate", "--model", "{model}", "--dir", "{tmp}"], "no reviews in pos/*.txt or neg/*.txt"),
    (["evaluate", "--model", "{model}", "--csv", "{tmp}/bad.csv"], "no column 'text', 'label'"),
    (["evaluate", "--model", "{model}", "--csv", "{tmp}/badlabel.csv"], "line 3: label 'maybe'"),
    (["evaluate", "--model", "{model}", "--dir", "{tmp}", "--workers", "0"],
     "--workers must be a positive integer or 'auto', got '0'"),
    (["predict", "--model", "{model}", "--file", "{tmp}/ragged.csv"], "ragged.csv: not a readable CSV"),
    (["explain", "--model", "{tmp}", "great"], "no weights.npz"),
    (["explain", "--model", "{model}", "--top", "0", "great"], "--top must be >= 1"),
    (["runs", "--tracking-uri", "sqlite:///{tmp}/none.db"], "no MLflow store"),
    (["generate", "--model", "{model}", "--tokens", "0", "x"], "--tokens must lie in [1, 10000]"),
    (["generate", "--model", "{model}", "--temperature", "-1", "x"], "--temperature must be >= 0"),
])
def test_errors_are_one_line_with_status_2(capsys, model, tmp_path, argv, message):
    (tmp_path / "bad.csv").write_text("review,stars\ngood,5\n")
    (tmp_path / "badlabel.csv").write_text("text,label\ngreat,pos\nawful,maybe\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "ragged.csv").write_text("text\ngood\nbad,film,x\n")
    status, out, err = run(capsys, *(a.format(tmp=tmp_path, model=model) for a in argv))
    assert status == 2 and out == ""
    assert err.startswith(f"rnn {argv[0]}: error: ") and message in err and err.count("\n") == 1


def test_python_dash_m_rnn_help():
    result = subprocess.run([sys.executable, "-m", "rnn", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert all(cmd in result.stdout for cmd in ("predict", "evaluate", "explain", "generate", "runs"))
