"""Issue 17: no silently wrong results, no lost work. Each attempt at breaking the project is one row
of a table, one parametrised test per category, so that `pytest -v` shows the count:

    params         params.yaml mistakes the check stage refuses in one line naming key and value
    archives       archives the check stage refuses before DVC touches any output
    model files    model folders and checkpoints refused naming the file and the key or array
    commands       the `rnn` command: one line, no hang, always valid JSON
    stores         MLflow stores the check stage and `rnn runs` refuse within seconds
    outputs        a full disk or a read-only folder: every old output stays whole, the file is named
    kills          a training stage killed mid-epoch resumes to exactly the uninterrupted result

Issue 25 (round 3) added rows to params, archives, model files and commands; its other attempts (a
killed worker inside a stage, a small /dev/shm, a vocabulary of only <unk>, a tokenizer differing
between training and prediction, a server with logins, ...) are in test_reliability_issue25.py.

The DVC-level guarantees (a typo stops `dvc repro` and `dvc exp run` before any output is removed;
the archive is a dependency; the models beat chance; the MLflow store holds the runs) are checked in
test_pipeline_e2e.py; the evaluate stage against labels it must get right in test_stages_model.py.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import build_imdb_archive
from rnn import ModelConfig, SentimentModel, imdb
from rnn.cli import main as rnn_main
from rnn.errors import InputError
from rnn.io import load_arrays, read_model, save_arrays, save_model
from rnn.predict import load_model
from rnn.train import Dataset, TrainConfig, fit
from rnn.optim import make_optimizer
from stages import check, download, prepare, train
from stages.outputs import file_digest
from test_stages_model import _main, project  # noqa: F401  (the fixture: synthetic prepared data)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- params
@pytest.fixture(scope="module")
def good_archive(tmp_path_factory) -> Path:
    return build_imdb_archive(tmp_path_factory.mktemp("archive") / "imdb.tar.gz", n_per_class=4, unsup=2)


@pytest.fixture
def checked_project(tmp_path, monkeypatch, good_archive):
    """Run the check stage in a fresh project: returns run(params: dict, archive) -> None."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")

    def run(params: dict, archive_path: Path | str | None = good_archive) -> None:
        params = {**params, "mlflow": {"enabled": False, **params.get("mlflow", {})}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        monkeypatch.setenv("IMDB_ARCHIVE", str(archive_path or ""))
        try:
            check.main()
        except BaseException:
            assert not (tmp_path / "data/source.json").exists(), "a refused check wrote its outputs"
            raise
    return run


OVERRIDES = {"rnn": {}, "gru": {}, "lstm": {}}
PARAMS = [  # (what, params.yaml, message); every row: issue 17 items 4, 9, 10
    ("lr: fast", {"train": {"lr": "fast"}}, "params.yaml: train.lr = 'fast': must be a number"),
    ("seeds: [-1]", {"train": {"seeds": [-1]}}, "params.yaml: train.seeds = [-1]: must be 1 to 100 distinct integers >= 0"),
    ("cell LSTM", {"train": {"cells": ["LSTM"]}}, "train.cells = ['LSTM']: unknown cell 'LSTM' (did you mean lstm?)"),
    ("unknown key", {"train": {"hidden": 8}}, "unknown key train.hidden (did you mean train.hidden_size?)"),
    ("hidden_size 1e6", {"train": {"hidden_size": 1_000_000}},
     "train (rnn): prepare.vocab_size 20000, embed_dim 100, hidden_size 1000000, num_layers 1: the model would have"),
    ("batch_size 1e7", {"train": {"batch_size": 10_000_000}}, "a training step would cache"),
    ("probe hidden_size 1e6", {"probe": {"hidden_size": 1_000_000}}, "probe (rnn): probe.vocab_size 20"),
    ("max_len 1e12 (int)", {"prepare": {"max_len": 10**12}}, "prepare.max_len = 1000000000000: must be <= 10000"),
    ("max_len 1e12 (float)", {"prepare": {"max_len": 1e12}}, "prepare.max_len = 1000000000000.0: must be an integer"),
    ("embed_dim override", {"train": {"overrides": {**OVERRIDES, "lstm": {"embed_dim": 64}}}},
     "train.overrides.lstm.embed_dim = 64: must equal train.embed_dim = 100"),
    ("no override entry for a cell", {"train": {"overrides": {"rnn": {}}}},
     "train.overrides.gru is missing: dvc.yaml's train@gru reads it"),
    ("url without scheme", {"data": {"url": "aclImdb_v1.tar.gz"}}, "data.url = 'aclImdb_v1.tar.gz': must be an http(s)"),
    ("md5 too short", {"data": {"md5": "7c2ac0"}}, "data.md5 = '7c2ac0': must be 32 hexadecimal digits"),
    ("pretrained, no path", {"embed": {"method": "pretrained"}}, "embed.path = null: required"),
    ("pretrained, missing file", {"embed": {"method": "pretrained", "path": "glove.txt"}},
     "embed.path = 'glove.txt'"),
    # issue 25: what a later stage refuses (after DVC removed its outputs), check refuses first
    ("train.lr .inf", {"train": {"lr": float("inf")}}, "params.yaml: train.lr = inf: Input should be a finite number"),
    ("pretrain.lr .nan", {"pretrain": {"lr": float("nan")}}, "pretrain.lr = nan: Input should be a finite number"),
    ("probe.lr .inf", {"probe": {"lr": float("inf")}}, "probe.lr = inf: Input should be a finite number"),
    ("override lr .inf", {"train": {"overrides": {**OVERRIDES, "gru": {"lr": float("inf")}}}},
     "train.overrides.gru.lr = inf: Input should be a finite number"),
    ("data.limit 1", {"data": {"limit": 1}}, "params.yaml: data.limit = 1: must be >= 4"),
    ("data.limit 3", {"data": {"limit": 3}}, "params.yaml: data.limit = 3: must be >= 4"),
    ("tokens_per_epoch 1", {"pretrain": {"tokens_per_epoch": 1}},
     "params.yaml: pretrain.tokens_per_epoch = 1: must be at least one batch of reviews, pretrain.batch_size 32 x "
     "prepare.max_len 600 = 19200 tokens"),
    ("workers 1000", {"train": {"workers": 1000}}, "params.yaml: train.workers = 1000: more than 4 x the"),
]


@pytest.mark.parametrize("what, params, message", PARAMS, ids=[row[0] for row in PARAMS])
def test_params(checked_project, what, params, message):
    params = {**params, "train": {"overrides": OVERRIDES, **params.get("train", {})}}
    with pytest.raises((InputError, OSError)) as info:
        checked_project(params)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_good_project_passes_the_check_and_its_source_is_the_archive_content(checked_project, good_archive,
                                                                               tmp_path):
    checked_project({"train": {"overrides": OVERRIDES}})
    first = (tmp_path / "data/source.json").read_bytes()
    moved = tmp_path / "elsewhere.tar.gz"
    shutil.copy(good_archive, moved)
    checked_project({"train": {"overrides": OVERRIDES}}, moved)
    assert (tmp_path / "data/source.json").read_bytes() == first, "the same archive elsewhere changed the source"
    assert json.loads(first)["archive"]["sha256"] == file_digest(good_archive)
    assert json.loads((tmp_path / "data/vectors.json").read_text()) == {"pretrained": None}


def test_a_refused_check_names_the_values_that_differ_from_the_committed_params(checked_project, tmp_path):
    """Issue 25: `dvc exp run -S train.lr=.inf` writes the value into params.yaml before check refuses it,
    and there it stays: the error says so, and how to undo it."""
    checked_project({"train": {"overrides": OVERRIDES, "lr": 0.002}})
    shutil.rmtree(tmp_path / "data")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for command in (["init", "-q"], ["add", "params.yaml"], ["commit", "-qm", "params"]):
        subprocess.run(git + command, cwd=tmp_path, check=True, capture_output=True)
    with pytest.raises(InputError) as info:
        checked_project({"train": {"overrides": OVERRIDES, "lr": float("inf"), "workers": 3}})
    message = str(info.value)
    assert "\n" not in message and message.startswith("params.yaml: train.lr = inf: Input should be a finite number; "
                                                       "params.yaml differs from the committed one in "
                                                       "train.lr (0.002 -> inf), train.workers (absent -> 3)"), message
    assert message.endswith("undo with `git checkout params.yaml`"), message
    subprocess.run(["git", "checkout", "params.yaml"], cwd=tmp_path, check=True, capture_output=True)
    check.main()                                                   # undone: the committed params pass


# --------------------------------------------------------------------------------- archives
def _fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


def _archive(tmp: Path, kind: str) -> Path:
    """A broken archive of one kind (see ARCHIVES)."""
    path = tmp / f"{kind}.tar.gz"
    extra = {
        "oversized review": [("aclImdb/train/unsup/77_0.txt", bytes(2 << 20))],   # 2 MiB of zeros: 2 KB packed
        "huge review id": [("aclImdb/train/pos/99999999999999999999_9.txt", b"fine film")],
        "rating 300": [("aclImdb/train/pos/77_300.txt", b"fine film")],
        "duplicate id": [("aclImdb/train/pos/0_9.txt", b"again")],
        "escaping path": [("aclImdb/../../evil.txt", b"x")],
        "FIFO member": [_fifo("aclImdb/train/pos/fifo")],
        "unpacks too far": [("aclImdb/imdb.vocab", bytes(3 << 20))],
        "300 empty members": [(f"aclImdb/empty/{i}", b"") for i in range(300)],
    }.get(kind)
    if kind == "missing":
        return path
    if kind == "a folder":
        path.mkdir()
        return path
    if kind == "not gzip":
        path.write_bytes(os.urandom(3000))
        return path
    build_imdb_archive(path, n_per_class=4, unsup=2, extra_members=extra,
                       drop_split="test/neg" if kind == "missing split" else None)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    return path


ARCHIVES = [  # (kind, message): issue 17 items 1, 4, 7, 9
    ("missing", "no such file"),
    ("a folder", "not a regular file"),
    ("not gzip", "not a gzip file"),
    ("truncated", "corrupt or truncated archive"),
    ("missing split", "missing or empty split aclImdb/test/neg"),
    ("oversized review", "review 'aclImdb/train/unsup/77_0.txt' has 2,097,152 bytes, more than the 1 MiB"),
    ("unpacks too far", "unpacks to more than 2 MiB"),
    ("huge review id", "review id 99999999999999999999 too large"),
    ("rating 300", "rating 300 out of range 0-10: 'aclImdb/train/pos/77_300.txt'"),
    ("duplicate id", "duplicate review id 0 in train/pos"),
    ("escaping path", "unsafe member path 'aclImdb/../../evil.txt'"),
    ("FIFO member", "refusing special file member 'aclImdb/train/pos/fifo'"),
    ("300 empty members", "more than 200 members (the IMDB archive has 100,016); refusing it"),   # issue 25
]


@pytest.mark.parametrize("kind, message", ARCHIVES, ids=[row[0] for row in ARCHIVES])
def test_archives(checked_project, tmp_path, monkeypatch, kind, message):
    monkeypatch.setattr(imdb, "MAX_UNPACKED_BYTES", 2 << 20)
    monkeypatch.setattr(imdb, "MAX_MEMBERS", 200)             # the good archive has 32
    (tmp_path / "archives").mkdir()
    bad = _archive(tmp_path / "archives", kind)
    with pytest.raises((InputError, OSError)) as info:
        checked_project({"train": {"overrides": OVERRIDES}}, bad)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    if kind not in ("missing", "a folder", "not gzip"):       # download refuses it the same way
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            download.run({"limit": None}, tmp_path / "out", str(bad))
        assert not (tmp_path / "out").exists()


def test_the_full_archive_check_runs_once_per_content(checked_project, good_archive, monkeypatch):
    calls = []
    monkeypatch.setattr(imdb, "read_archive", lambda path, keep=True: calls.append(path))
    for _ in range(3):
        checked_project({"train": {"overrides": OVERRIDES}})
    assert calls == [good_archive]


def test_awkward_reviews_travel_from_archive_to_scores(tmp_path, make_imdb_archive):
    """Empty, whitespace-only, unknown-word, non-UTF-8, long (980 KB) and non-Latin reviews are kept,
    encoded and scored, not crashed on."""
    awkward = [
        ("aclImdb/test/pos/900_9.txt", b""),
        ("aclImdb/test/pos/901_8.txt", b"   \n\t  <br /><br />  "),
        ("aclImdb/test/neg/902_1.txt", b"zqxv wvkj xxyyzz qqq"),
        ("aclImdb/test/neg/903_2.txt", b"\xff\xfe broken \xc3 bytes awful"),
        ("aclImdb/test/neg/904_3.txt", b"boring " * 140_000),
        ("aclImdb/test/pos/905_10.txt", "\u00e9t\u00e9 \U0001f600 \u201cgreat\u201d".encode()),
    ]
    archive_path = make_imdb_archive(n_per_class=10, extra_members=awkward)
    metrics = download.run({"limit": None}, tmp_path, str(archive_path))
    assert metrics["decode_errors"] == 1
    prepare.run({"max_len": 30, "truncate": "both", "vocab_size": 1000, "min_freq": 1, "val_fraction": 0.25,
                 "seed": 0}, tmp_path)
    test = np.load(tmp_path / "data/prepared/test.npz")
    rows = {rid: i for i, rid in enumerate(test["review_ids"])}
    lengths = test["lengths"][[rows[r] for r in range(900, 906)]]
    assert lengths.tolist()[:3] == [1, 1, 4] and lengths[4] == 30       # [UNK], [UNK], 4 x UNK, truncated
    assert (test["ids"][rows[902], :4] == 1).all()
    model = SentimentModel.create(ModelConfig(vocab_size=int(test["ids"].max()) + 1, embed_dim=4, hidden_size=4),
                                  np.random.default_rng(0))
    assert np.isfinite(model.predict_proba(test["ids"], test["lengths"])).all()


# ------------------------------------------------------------------------------ model files
ENCODER = {"tokens": ["<pad>", "<unk>", "good", "bad"], "max_len": 5, "truncate": "head"}


def _edit_weights(name, value):
    def edit(folder: Path):
        arrays = load_arrays(folder / "weights.npz")
        arrays[name].reshape(-1)[0] = value
        save_arrays(folder / "weights.npz", arrays)
    return edit


def _edit_json(file, key, value):
    def edit(folder: Path):
        meta = json.loads((folder / file).read_text())
        (meta["model"] if file == "config.json" else meta)[key] = value
        (folder / file).write_text(json.dumps(meta))
    return edit


def _write(file, data: bytes):
    return lambda folder: (folder / file).write_bytes(data)


def _bomb(folder: Path):
    arrays = load_arrays(folder / "weights.npz")
    np.savez_compressed(folder / "weights.npz", **arrays, junk=np.zeros(5_000_000))   # 40 MB in ~40 KB


MODEL_FILES = [  # (what, edit of a saved model folder, message): issue 17 items 3, 9, 10
    ("NaN weight", _edit_weights("fc.W", np.nan), "weights.npz: fc.W holds 1 NaN or infinite values"),
    ("inf weight", _edit_weights("embedding.weight", np.inf), "weights.npz: embedding.weight holds 1 NaN"),
    ("random bytes as weights", _write("weights.npz", os.urandom(4000)),
     "weights.npz: not a readable .npz file (not a zip archive)"),
    ("npz bomb", _bomb, "weights.npz: not a readable .npz file (its arrays unpack to"),
    ("hidden_size a string", _edit_json("config.json", "hidden_size", "big"),
     'config.json: bad model config: hidden_size = "big": must be an integer'),
    ("dropout a string", _edit_json("config.json", "dropout", "0.1"), 'dropout = "0.1": must be a number'),
    ("bidirectional a string", _edit_json("config.json", "bidirectional", "yes"),
     'bidirectional = "yes": must be true or false'),
    ("vocab_size a bool", _edit_json("config.json", "vocab_size", True), "vocab_size = true: must be an integer"),
    ("vocab_size 1e12", _edit_json("config.json", "vocab_size", 10**12), "config.json: the config describes 4e+12"),
    ("encoder max_len 1e12", _edit_json("encoder.json", "max_len", 10**12),
     "encoder.json: bad text encoder: max_len must lie in [1, 10000], got 1000000000000"),
    ("encoder max_len a float", _edit_json("encoder.json", "max_len", 1e12), "max_len must be an integer, got 1000000000000.0"),
    ("encoder without tokens", _edit_json("encoder.json", "tokens", "good bad"), "expected a mapping with a list"),
    # issue 25: 3,000,000 missing arrays made a 48 MB error line
    ("num_layers 1e6", _edit_json("config.json", "num_layers", 1_000_000),
     "weights.npz: missing arrays rnn.l1.W_h, rnn.l1.W_x, rnn.l1.b, rnn.l10.W_h, rnn.l10.W_x and 2,999,992 more"),
]


@pytest.mark.parametrize("what, edit, message", MODEL_FILES, ids=[row[0] for row in MODEL_FILES])
def test_model_files(tmp_path, what, edit, message):
    folder = tmp_path / "model"
    model = SentimentModel.create(ModelConfig(vocab_size=4, embed_dim=4, hidden_size=3), np.random.default_rng(0))
    save_model(folder, model, ENCODER)
    edit(folder)
    with pytest.raises(InputError) as info:
        load_model(folder)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert "allow_pickle" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_checkpoint_says_to_delete_it(tmp_path, damage):
    rng = np.random.default_rng(0)
    data = Dataset(rng.integers(1, 6, (8, 4)), np.full(8, 4), rng.integers(0, 2, 8))
    model = SentimentModel.create(ModelConfig(vocab_size=6, embed_dim=2, hidden_size=2), rng)
    fit(model, make_optimizer("adam", 0.01), data, data, TrainConfig(epochs=1, batch_size=4), rng, tmp_path)
    ckpt = tmp_path / "checkpoint.npz"
    ckpt.write_bytes(ckpt.read_bytes()[:300] if damage == "truncated" else os.urandom(300))
    with pytest.raises(InputError, match=r"checkpoint.npz: not a readable .npz file .*; delete it to restart$"):
        fit(model, make_optimizer("adam", 0.01), data, data, TrainConfig(epochs=2, batch_size=4), rng, tmp_path)


# --------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    from test_predict import train_toy_model
    return train_toy_model(tmp_path_factory.mktemp("model") / "lstm")


def _binary_file(tmp: Path, monkeypatch) -> list:
    (tmp / "b.bin").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    return ["predict", "--file", tmp / "b.bin"]


def _nul_bytes(tmp: Path, monkeypatch) -> list:
    (tmp / "z.txt").write_bytes(b"good\0film")
    return ["predict", "--file", tmp / "z.txt"]


def _not_finite(monkeypatch) -> None:
    """A model whose arithmetic overflows (weights that load, since they are finite)."""
    from rnn.model import SentimentModel
    monkeypatch.setattr(SentimentModel, "predict_logits",
                        lambda self, ids, lengths, batch_size=256, workers=1: np.full(len(lengths), np.nan))


def _predict_json_not_finite(tmp: Path, monkeypatch) -> list:
    _not_finite(monkeypatch)
    return ["predict", "--json", "a film"]


def _evaluate_json_not_finite(tmp: Path, monkeypatch) -> list:
    _not_finite(monkeypatch)
    (tmp / "r.csv").write_text("text,label\ngood,1\n")
    return ["evaluate", "--json", "--csv", tmp / "r.csv"]


def _huge_review(tmp: Path, monkeypatch) -> list:
    for label in ("pos", "neg"):
        (tmp / label).mkdir()
        (tmp / label / "1_9.txt").write_text("a fine film")
    with open(tmp / "pos" / "2_9.txt", "wb") as f:          # sparse: 3 MiB that take no room
        f.truncate(3 << 20)
    return ["evaluate", "--workers", "1", "--dir", tmp]


COMMANDS = [  # (what, setup(tmp, monkeypatch) -> argv without --model, message): issue 17 items 3, 10
    ("binary --file", _binary_file, "b.bin: not UTF-8 text (byte 0x89 at offset 0)"),
    ("--file with NUL bytes", _nul_bytes, "z.txt: not a text file (it holds NUL bytes)"),
    ("predict --json, overflow", _predict_json_not_finite, "the model gives no finite probability for 1 of 1"),
    ("evaluate --json, overflow", _evaluate_json_not_finite, "the model gives no finite probability for 1 of 1"),
    ("evaluate --dir, a 3 MiB review", _huge_review, "pos/2_9.txt: more than the 1 MiB a review may have"),  # issue 25
]


@pytest.mark.parametrize("what, setup, message", COMMANDS, ids=[row[0] for row in COMMANDS])
def test_commands(capsys, monkeypatch, tmp_path, toy_model, what, setup, message):
    argv = setup(tmp_path, monkeypatch)
    status = rnn_main([str(a) for a in (argv[0], "--model", toy_model, *argv[1:])])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_a_fifo_among_the_reviews_is_skipped_not_read(tmp_path, toy_model):
    for label, text in (("pos", "a great story"), ("neg", "boring actor")):
        (tmp_path / label).mkdir()
        (tmp_path / label / "1_9.txt").write_text(text)
    os.mkfifo(tmp_path / "pos" / "2_9.txt")            # reading it would block forever
    proc = subprocess.run([sys.executable, "-m", "rnn", "evaluate", "--model", str(toy_model), "--dir",
                           str(tmp_path), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 2
    assert "skipped 1 .txt entry that is not a regular file" in proc.stderr


def test_json_output_is_json_for_every_review(capsys, toy_model):
    texts = ["", "great", "\u00e9t\u00e9 \U0001f600", "a \"quoted\"\nline", "x" * 5000]
    status = rnn_main(["predict", "--model", str(toy_model), "--json", *texts])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 0 and [r["text"] for r in rows] == texts


# ----------------------------------------------------------------------------------- stores
@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def _store(kind: str, tmp: Path, port: int) -> str:
    if kind == "dead server":
        return "http://127.0.0.1:9"
    if kind == "silent server":
        return f"http://127.0.0.1:{port}"
    db = tmp / "mlflow.db"
    if kind == "random bytes as mlflow.db":
        db.write_bytes(os.urandom(5000))
    elif kind == "truncated SQLite header":
        db.write_bytes(b"SQLite format 3\0" + bytes(50))
    elif kind == "folder under a file":
        (tmp / "afile").write_text("x")
        db = tmp / "afile" / "sub" / "mlflow.db"
    return f"sqlite:///{db}"


STORES = [  # (kind, consumer, message): issue 17 items 4, 6, 10
    ("dead server", "check", "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    ("dead server", "runs", "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    ("silent server", "check", "is unreachable (timed out)"),
    ("silent server", "runs", "is unreachable (timed out)"),
    ("random bytes as mlflow.db", "check", "is not a usable SQLite database (file is not a database)"),
    ("random bytes as mlflow.db", "runs", "is not a usable SQLite database (file is not a database)"),
    ("truncated SQLite header", "check", "is not a usable SQLite database"),
    ("truncated SQLite header", "runs", "is not a usable SQLite database"),
    ("folder under a file", "check", "afile is not a folder"),
    ("folder under a file", "connect", "afile is not a folder"),
    ("folder under a file", "runs", "no MLflow store at"),
]


@pytest.mark.parametrize("kind, consumer, message", STORES, ids=[f"{k} ({c})" for k, c, _ in STORES])
def test_stores(tmp_path, monkeypatch, capsys, silent_port, kind, consumer, message):
    from rnn import cli
    from stages import mlstore
    monkeypatch.setattr(cli, "STORE_TIMEOUT_S", 1.0)          # the one store check, for stages and `rnn runs`
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _store(kind, tmp_path, silent_port))
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    t0 = time.monotonic()
    if consumer == "runs":
        assert rnn_main(["runs"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("rnn runs: error: ") and error.count("\n") == 1
    else:
        with pytest.raises(mlstore.TrackingUnavailable) as info:
            mlstore.check_store() if consumer == "check" else mlstore.connect("exp")
        error = str(info.value)
        assert "MLFLOW_TRACKING_URI" in error and "\n" not in error
    assert message in error, error
    assert time.monotonic() - t0 < 30                  # bounded: no retry loop (MLflow's took 248 s)


# ---------------------------------------------------------------------------------- outputs
def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for folder in ("models", "metrics", "plots")
            for p in sorted((root / folder).rglob("*")) if p.is_file() and not p.name.startswith(".fill")}


@contextlib.contextmanager
def _broken(kind: str, folder: Path, scratch: Path, monkeypatch):
    """`folder` on a full disk (a tiny tmpfs holding its files and no free byte) or read-only (a
    read-only bind mount). Where mounting is not allowed, writes under it fail the same way."""
    code = errno.ENOSPC if kind == "full disk" else errno.EROFS
    saved = scratch / "saved"
    shutil.copytree(folder, saved)
    if kind == "full disk":
        mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]
    else:
        mount = ["mount", "--bind", "-o", "ro", str(folder), str(folder)]
    try:
        mounted = subprocess.run(mount, capture_output=True).returncode == 0     # root, a permissive sandbox
    except FileNotFoundError:
        mounted = False
    try:
        if mounted and kind == "full disk":
            shutil.copytree(saved, folder, dirs_exist_ok=True)
            with open(folder / ".fill", "wb", buffering=0) as f:         # leave no free byte
                with contextlib.suppress(OSError):
                    while True:
                        f.write(bytes(4096))
        elif mounted and os.access(folder, os.W_OK) and _writable(folder):
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        with monkeypatch.context() as patch:
            if not mounted:
                real_open = builtins.open

                def failing_open(file, mode="r", *args, **kwargs):
                    if any(c in mode for c in "wax") and Path(file).resolve().is_relative_to(folder.resolve()):
                        raise OSError(code, os.strerror(code), str(file))
                    return real_open(file, mode, *args, **kwargs)
                patch.setattr(builtins, "open", failing_open)
            yield
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        shutil.rmtree(saved)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


OUTPUTS = [  # (what, folder, stage, message): issue 17 item 5
    ("full disk", "models", "train", "[Errno 28] No space left on device: 'models/lstm/seed0/weights.npz'"),
    ("read-only", "metrics/lstm/seed0", "train", "[Errno 30] Read-only file system: 'metrics/lstm/seed0/train.json'"),
    ("read-only", "plots/lstm/seed0", "evaluate", "[Errno 30] Read-only file system: 'plots/lstm/seed0/roc.csv'"),
    ("full disk", "plots/lstm/seed0", "train", "[Errno 28] No space left on device: 'plots/lstm/seed0/history.csv'"),
]


@pytest.mark.parametrize("kind, folder, stage, message", OUTPUTS, ids=[f"{k} {f} ({s})" for k, f, s, _ in OUTPUTS])
def test_outputs(project, tmp_path_factory, monkeypatch, kind, folder, stage, message):  # noqa: F811
    from stages import evaluate
    module = {"train": train, "evaluate": evaluate}[stage]
    _main(train, "lstm", "0", monkeypatch=monkeypatch)
    _main(evaluate, "lstm", "0", monkeypatch=monkeypatch)
    before = _snapshot(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = 0.02                       # new weights, new plots: everything differs
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with _broken(kind, project / folder, tmp_path_factory.mktemp("scratch"), monkeypatch):
        with pytest.raises(OSError) as info:
            _main(module, "lstm", "0", monkeypatch=monkeypatch)
        assert str(info.value) == message
        assert _snapshot(project) == before, "an old output changed or vanished"
        leftovers = [p for p in project.rglob("*tmp-*")]
        assert not leftovers, leftovers


# ------------------------------------------------------------------------------------ kills
def _stage_project(root: Path, seed: int = 0) -> Path:
    """Prepared data big enough for a few seconds of training: 3 epochs of 150 steps each."""
    rng = np.random.default_rng(seed)
    V, T = 40, 16
    prepared = root / "data/prepared"
    prepared.mkdir(parents=True)
    for name, n in (("train", 1200), ("val", 100)):
        lengths = rng.integers(3, T + 1, n).astype(np.int32)
        ids = np.where(np.arange(T) < lengths[:, None], rng.integers(3, V, (n, T)), 0).astype(np.int32)
        labels = rng.integers(0, 2, n).astype(np.int8)
        ids[labels == 1, 0] = 2
        np.savez(prepared / f"{name}.npz", ids=ids, lengths=lengths, labels=labels)
    tokens = ["<pad>", "<unk>"] + [f"w{i}" for i in range(2, V)]
    (prepared / "vocab.json").write_text(json.dumps({"tokens": tokens, "max_len": T, "truncate": "head"}))
    np.save(root / "data/embeddings.npy", rng.normal(0, 0.3, (V, 8)).astype(np.float32))
    (root / "params.yaml").write_text(yaml.safe_dump({
        "train": {"cells": ["lstm"], "epochs": 3, "batch_size": 8, "hidden_size": 24, "embed_dim": 8,
                  "lr": 0.01, "patience": 0, "workers": 1, "init": "embeddings", "overrides": {"lstm": {}}},
        "mlflow": {"enabled": False}}))
    return root


def _start(root: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))} | {
        "PYTHONPATH": str(REPO), "CI": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "stages.train", "lstm", "0"], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_line(proc: subprocess.Popen, text: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"the stage ended before printing {text!r}: {''.join(lines)}{proc.stderr.read()}")


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_kills(tmp_path):
    """Issue 17 item 12: `python -m stages.train` stopped mid-epoch (SIGTERM: checkpoint at once) and
    killed (SIGKILL: the last epoch's checkpoint) resumes each time and ends with exactly the weights,
    metrics and history of an uninterrupted stage run."""
    whole, broken = _stage_project(tmp_path / "whole"), _stage_project(tmp_path / "broken")
    reference = _start(whole)                           # runs beside the interrupted one

    proc = _start(broken)
    _wait_for_line(proc, "lstm epoch 1/3")
    proc.send_signal(signal.SIGTERM)                    # in epoch 2: stops after the current step
    code, out, err = _finish(proc)
    assert code == 130 and "interrupted in epoch 2 after batch" in err and "checkpoint saved" in err, err
    assert not (broken / "models/lstm/seed0").exists()

    proc = _start(broken)
    lines = _wait_for_line(proc, "lstm epoch 2/3")
    proc.kill()                                         # no handler runs: epoch 2's checkpoint stays
    proc.communicate(timeout=60)
    assert any("resuming from checkpoints/lstm/" in line for line in lines), lines

    code, out, err = _finish(_start(broken))
    assert code == 0 and "resuming from checkpoints/lstm/" in out and "epoch 3/3" in out, out + err
    assert _finish(reference)[0] == 0

    a, b = load_arrays(whole / "models/lstm/seed0/weights.npz"), load_arrays(broken / "models/lstm/seed0/weights.npz")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    for path in ("plots/lstm/seed0/history.csv", "plots/lstm/seed0/grad_trace.csv"):
        assert _numbers(whole / path) == _numbers(broken / path), path
    done = json.loads((broken / "metrics/lstm/seed0/train.json").read_text())
    assert done["resumed"] is True and done["epochs_run"] == 3
    assert not list((broken / "checkpoints").rglob("*.npz"))


def _numbers(path: Path) -> list[list[str]]:
    """A CSV's rows without the timing columns (seconds, tokens/s)."""
    rows = [line.split(",") for line in path.read_text().splitlines()]
    drop = {i for i, name in enumerate(rows[0]) if name in ("seconds", "tokens_per_s", "val_seconds")}
    return [[v for i, v in enumerate(row) if i not in drop] for row in rows]
