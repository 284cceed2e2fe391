"""Issue 25: crashes without a message. Each test fails on the code before the fix: a worker killed
inside a real stage, a pool's shared memory that does not fit /dev/shm, a shared-memory view that
outlives its pool (the "Exception ignored ... BufferError" at exit)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rnn import ModelConfig, SentimentModel, parallel
from rnn.errors import InputError
from test_reliability import REPO, _stage_project, _start, _wait_for_line


def _workers_of(pid: int) -> list[int]:
    """The pool's worker processes among the children of `pid` (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_worker_killed_inside_the_train_stage_ends_it_with_one_line(tmp_path):
    root = _stage_project(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(workers=2, epochs=200)            # minutes of training unless stopped
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    proc = _start(root)
    _wait_for_line(proc, "lstm epoch 1/200")
    workers = _workers_of(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: worker 1 (pid {workers[1]}) died from signal SIGKILL"), err


def test_a_pool_that_would_not_fit_in_dev_shm_is_refused_in_one_line(monkeypatch):
    model = SentimentModel.create(ModelConfig(vocab_size=50, embed_dim=4, hidden_size=4), np.random.default_rng(0))
    data = {"ids": np.ones((1000, 20), np.int32), "lengths": np.full(1000, 20), "labels": np.zeros(1000, np.int8)}
    monkeypatch.setattr(parallel, "shm_free_bytes", lambda: 64 << 10)        # 64 KiB free
    own = dict(model.params)
    with pytest.raises(InputError) as info:
        parallel.make_runner(model, data, 2)
    message = str(info.value)
    assert "\n" not in message and message.startswith("/dev/shm has 0.1 MiB free, 2 worker processes need 0.")
    assert "train.workers: 1" in message
    assert all(model.params[k] is v for k, v in own.items()), "the model lost its own arrays"
    monkeypatch.setattr(parallel, "shm_free_bytes", lambda: 1 << 30)
    with parallel.make_runner(model, data, 2) as runner:                     # room enough: it runs
        loss, _, _ = runner.gradients(np.arange(8), 0)
    assert np.isfinite(loss)


def test_the_free_space_of_dev_shm_is_read_from_the_file_system():
    free = parallel.shm_free_bytes()
    if Path("/dev/shm").is_dir():
        st = os.statvfs("/dev/shm")
        assert free == st.f_bavail * st.f_frsize
    else:
        assert free is None


KEPT_VIEW = """
import numpy as np
import pandas as pd
from rnn import ModelConfig, SentimentModel
from rnn.parallel import WorkerPool
if __name__ == "__main__":
    model = SentimentModel.create(ModelConfig(vocab_size=6, embed_dim=2, hidden_size=2), np.random.default_rng(0))
    with WorkerPool(model, 2) as pool:
        kept = model.params["fc.b"]          # a view into the shared block that outlives the pool
    print("closed")
"""


def test_a_view_that_outlives_its_pool_prints_nothing_at_exit(tmp_path):
    """Issue 25: `Exception ignored ... BufferError: cannot close exported pointers exist` at the end
    of every fresh pretrain: SharedMemory.__del__ retried the close that had failed on a live view."""
    (tmp_path / "kept.py").write_text(KEPT_VIEW)
    proc = subprocess.run([sys.executable, str(tmp_path / "kept.py")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout == "closed\n", proc.stderr
    assert "Exception ignored" not in proc.stderr and proc.stderr == "", proc.stderr


# ------------------------------------------------------------------ issue 25: silently wrong
def test_a_vocabulary_that_leaves_most_of_the_text_unk_is_refused(tmp_path, make_imdb_archive):
    from stages import download, prepare
    download.run({"limit": None}, tmp_path, str(make_imdb_archive(n_per_class=10)))
    cfg = {"max_len": 30, "truncate": "both", "vocab_size": 1000, "min_freq": 1_000_000, "val_fraction": 0.25, "seed": 0}
    with pytest.raises(InputError) as info:
        prepare.run(cfg, tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        "params.yaml: the vocabulary (2 words with prepare.min_freq 1000000, prepare.vocab_size 1000) covers 0.0% "
        "of the training text's tokens, less than 50%"), message
    assert not (tmp_path / "data/prepared").exists()
    metrics = prepare.run({**cfg, "min_freq": 1}, tmp_path)                 # a real vocabulary passes
    assert metrics["oov_rate"]["train"] < 0.5


def test_no_perplexity_over_targets_that_are_all_one_word():
    from rnn.lm import LanguageModel
    config = ModelConfig(vocab_size=6, embed_dim=3, hidden_size=4, task="language_model", num_sampled=3)
    model = LanguageModel.create(config, np.random.default_rng(0))
    lengths = np.array([5, 3, 4])
    unk = np.where(np.arange(5) < lengths[:, None], 1, 0)                   # every word <unk>
    with pytest.raises(InputError, match=r"^every one of the 9 next-token targets is the word <unk>: a perplexity"):
        model.perplexity(unk, lengths)
    varied = unk.copy()
    varied[0, 2] = 4
    assert 1 < model.perplexity(varied, lengths) < 100


def test_the_text_a_model_trained_on_reads_back_through_rnn_predict_as_the_prepared_ids(tmp_path, make_imdb_archive,
                                                                                        monkeypatch, capsys):
    """Issue 25: a tokenizer that differs between training and prediction (lowercasing removed on the
    prediction path alone) passed every test. The training reviews, given to `rnn predict` as text,
    must reach the model as exactly the ids the prepare stage wrote."""
    from rnn.cli import main as rnn_main
    from rnn.io import save_model
    from stages import download, prepare
    shouting = [("aclImdb/train/pos/900_10.txt", b"Great. Wonderful, EXCELLENT film!<br />The ACTING?"),
                ("aclImdb/train/neg/901_1.txt", "Caf\u00e9 SCENES: dull, Dull, DULL... Not \"good\"".encode())]
    download.run({"limit": None}, tmp_path, str(make_imdb_archive(n_per_class=8, extra_members=shouting)))
    prepare.run({"max_len": 12, "truncate": "both", "vocab_size": 1000, "min_freq": 1, "val_fraction": 0.25,
                 "seed": 0}, tmp_path)
    prepared = np.load(tmp_path / "data/prepared/train.npz")
    encoder = json.loads((tmp_path / "data/prepared/vocab.json").read_text())
    model = SentimentModel.create(ModelConfig(vocab_size=len(encoder["tokens"]), embed_dim=3, hidden_size=3),
                                  np.random.default_rng(0))
    save_model(tmp_path / "model", model, encoder)
    raw = pd.read_parquet(tmp_path / "data/raw/train.parquet").set_index(["id", "label"])["text"]
    texts = [raw[(i, y)] for i, y in zip(prepared["review_ids"], prepared["labels"])]
    assert {900, 901} & set(prepared["review_ids"].tolist()) and any(t != t.lower() for t in texts)

    capsys.readouterr()
    seen = []
    real = SentimentModel.predict_logits
    monkeypatch.setattr(SentimentModel, "predict_logits",
                        lambda self, ids, lengths, *a, **k: seen.append((ids, lengths)) or real(self, ids, lengths, *a, **k))
    assert rnn_main(["predict", "--model", str(tmp_path / "model"), "--json", *texts]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(texts)
    ids, lengths = seen[0]
    assert lengths.tolist() == prepared["lengths"].tolist()
    for row, n in enumerate(lengths):
        assert ids[row, :n].tolist() == prepared["ids"][row, :n].tolist(), texts[row]


# ------------------------------------------------------------------------- issue 25: bounds
@pytest.fixture
def language_model(tmp_path) -> Path:
    from rnn.io import save_model
    from rnn.lm import LanguageModel
    tokens = ["<pad>", "<unk>", "good", "bad", "film"]
    config = ModelConfig(vocab_size=len(tokens), embed_dim=3, hidden_size=4, task="language_model", num_sampled=3)
    save_model(tmp_path / "lm", LanguageModel.create(config, np.random.default_rng(0)),
               {"tokens": tokens, "max_len": 10, "truncate": "head"})
    return tmp_path / "lm"


def _rnn(capsys, *argv) -> tuple[int, str, str]:
    from rnn.cli import main as rnn_main
    status = rnn_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("temperature", ["inf", "nan", "-1"])
def test_generate_refuses_a_temperature_that_is_not_a_finite_number_from_0(capsys, language_model, temperature):
    status, out, err = _rnn(capsys, "generate", "--model", language_model, "--temperature", temperature, "good")
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert f"--temperature must be >= 0 and finite, got {float(temperature)}" in err
    status, out, _ = _rnn(capsys, "generate", "--model", language_model, "--temperature", "0", "--tokens", "3", "good")
    assert status == 0 and "<pad>" not in out and len(out.split()) == 4


def test_generate_refuses_weights_that_overflow_as_predict_does(capsys, language_model, tmp_path):
    """Weights of 3e38 are finite, so they load; `predict` refused what they compute, `generate` wrote."""
    from rnn.io import load_arrays, save_arrays
    arrays = load_arrays(language_model / "weights.npz")
    save_arrays(language_model / "weights.npz", {k: np.full_like(v, 3e38) for k, v in arrays.items()})
    status, out, err = _rnn(capsys, "generate", "--model", language_model, "good film")
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert "the model gives no finite next-word scores (its weights overflow float arithmetic)" in err


def test_predict_an_empty_review_says_it_is_read_as_one_unknown_word(capsys, tmp_path):
    from test_predict import train_toy_model
    model = train_toy_model(tmp_path / "lstm")
    status, out, err = _rnn(capsys, "predict", "--model", model, "--json", "", "great film")
    assert status == 0 and len(out.splitlines()) == 2
    assert err == "rnn predict: note: 1 of the 2 reviews hold no word; such a review is read as one unknown word (<unk>)\n"
    assert json.loads(out.splitlines()[0])["text"] == ""
    status, out, err = _rnn(capsys, "predict", "--model", model, "great film")
    assert status == 0 and err == ""


def test_an_error_line_quotes_at_most_a_few_hundred_characters(capsys):
    from stages.common import one_line
    from rnn.errors import shorten
    assert shorten("x" * 1000) == "x" * 300 + "... (700 more characters)"
    assert shorten("a\n b") == "a b"
    assert one_line(InputError("y" * 10**6)).endswith("... (999,700 more characters)")


# ---------------------------------------------------------------- issue 25: a server with logins
@pytest.fixture
def server_with_logins():
    """An HTTP server on loopback that answers 401 without alice's login, 403 to bob, 404 to alice
    (no experiment 'probe': an answer) as `mlflow server --app-name basic-auth` would."""
    import base64
    import http.server
    import threading
    alice = "Basic " + base64.b64encode(b"alice:secret").decode()
    bob = "Basic " + base64.b64encode(b"bob:pw").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            auth = self.headers.get("Authorization")
            self.send_response(404 if auth == alice else 403 if auth == bob else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("login, message", [
    ({}, "refuses a client without a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "wrong"}, "refuses the account 'alice' (HTTP 401)"),
    ({"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "pw"}, "refuses the account 'bob' (HTTP 403)"),
    ({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "secret"}, None),
    ({"HOME": "alice's"}, None),                      # ~/.mlflow/credentials, MLflow's other way
], ids=["no login", "wrong password", "no permission", "alice", "credentials file"])
def test_the_check_stage_says_a_server_needs_a_login(server_with_logins, monkeypatch, tmp_path, login, message):
    from stages import mlstore
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    if login.get("HOME"):
        (tmp_path / ".mlflow").mkdir()
        (tmp_path / ".mlflow/credentials").write_text("[mlflow]\nmlflow_tracking_username = alice\n"
                                                      "mlflow_tracking_password = secret\n")
    else:
        for name, value in login.items():
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_with_logins)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    if message is None:
        mlstore.check_store()
        return
    with pytest.raises(mlstore.TrackingUnavailable) as info:
        mlstore.check_store()
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert "secret" not in str(info.value) and "wrong" not in str(info.value)


def test_a_run_is_tagged_with_the_account_that_logged_it(tmp_path, monkeypatch):
    import mlflow
    from stages.mlstore import new_run
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run = new_run(client, experiment, "lstm", "train@lstm", "abc", seed=0)
    assert client.get_run(run.info.run_id).data.tags["mlflow.user"] == "alice"


def test_a_grid_of_ten_million_points_is_refused_before_it_is_expanded(monkeypatch):
    from sweeps import spec
    monkeypatch.setattr(spec, "grid_points", lambda *a: pytest.fail("the grid was expanded"))
    study = {"name": "g", "objective": {"metrics": "metrics.json", "key": "cells.lstm.val_accuracy.mean"},
             "sampler": "grid", "pruner": {"type": "none"},
             "params": {f"train.{k}": {"choices": list(range(1, 6))} for k in (
                 "hidden_size", "embed_dim", "epochs", "batch_size", "num_layers", "patience", "trace_every")}
             | {"train.lr": {"choices": [0.1, 0.01, 0.001, 0.002, 0.003]},
                "train.dropout": {"choices": [0.0, 0.1, 0.2, 0.3, 0.4]},
                "train.momentum": {"choices": [0.0, 0.5, 0.8, 0.9, 0.95]}}}
    with pytest.raises(spec.SpecError) as info:
        spec.parse_spec(study)
    assert str(info.value) == "study: params: the grid has 9,765,625 points, more than 10,000 runs"
