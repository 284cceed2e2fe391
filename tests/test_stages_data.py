"""The data stages: download, prepare, embed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rnn.embeddings import build_embeddings
from rnn.errors import InputError
from rnn.io import write_json
from stages import download, embed, prepare
from stages.outputs import file_digest

ROOT = Path(__file__).resolve().parents[1]


# --- download ----------------------------------------------------------------

DATA_CFG = {"url": "unused", "md5": "unused", "limit": None, "retries": 0, "timeout": 1.0}


def raw_outputs(root: Path) -> list[Path]:
    return [p for p in (root / "data/raw/train.parquet", root / "data/raw/test.parquet",
                        root / "data/raw/unsup.parquet", root / "data/raw/source.json") if p.exists()]


def test_download_reads_archive(tmp_path, make_imdb_archive):
    archive = make_imdb_archive(n_per_class=12, unsup=7)
    metrics = download.run(DATA_CFG, tmp_path, str(archive))
    train = pd.read_parquet(tmp_path / "data/raw/train.parquet")
    test = pd.read_parquet(tmp_path / "data/raw/test.parquet")
    unsup = pd.read_parquet(tmp_path / "data/raw/unsup.parquet")
    assert list(train.columns) == ["id", "text", "label", "rating"]
    assert train["label"].dtype == np.int8 and train["rating"].dtype == np.int8
    assert train["label"].tolist() == [1] * 12 + [0] * 12
    assert train["id"].tolist() == list(range(12)) * 2  # sorted by (label desc, id)
    assert train.loc[train.label == 1, "rating"].between(7, 10).all()
    assert train.loc[train.label == 0, "rating"].between(1, 4).all()
    assert len(test) == 24 and len(unsup) == 7
    assert (unsup["label"] == -1).all() and (unsup["rating"] == 0).all()
    pos_text = " ".join(train.loc[train.label == 1, "text"])
    assert "<br /><br />" in pos_text and "great" in pos_text or "loved" in pos_text
    saved = json.loads((tmp_path / "data/raw/source.json").read_text())
    assert saved == metrics
    assert saved["counts"]["train"] == {"total": 24, "pos": 12, "neg": 12}
    assert saved["source"] == str(archive) and len(saved["sha256"]) == 64 and saved["decode_errors"] == 0


def test_download_limit_is_balanced_and_deterministic(tmp_path, make_imdb_archive):
    archive = make_imdb_archive(n_per_class=10, unsup=10)
    download.run({**DATA_CFG, "limit": 5}, tmp_path, str(archive))
    train = pd.read_parquet(tmp_path / "data/raw/train.parquet")
    assert train["label"].tolist() == [1, 1, 0, 0, 0]
    assert train["id"].tolist() == [0, 1, 0, 1, 2]
    assert len(pd.read_parquet(tmp_path / "data/raw/unsup.parquet")) == 5


def test_download_counts_decode_errors(tmp_path, make_imdb_archive):
    archive = make_imdb_archive(n_per_class=3, extra_members=[("aclImdb/train/pos/99_8.txt", b"caf\xe9 great")])
    metrics = download.run(DATA_CFG, tmp_path, str(archive))
    assert metrics["decode_errors"] == 1
    train = pd.read_parquet(tmp_path / "data/raw/train.parquet")
    assert train.loc[train.id == 99, "text"].item() == "caf\ufffd great"


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


@pytest.mark.parametrize(
    "extra, message",
    [
        ([("../evil.txt", b"x")], "unsafe member path '../evil.txt'"),
        ([("aclImdb/../../evil.txt", b"x")], "unsafe member path 'aclImdb/../../evil.txt'"),
        ([("/etc/evil.txt", b"x")], "unsafe member path '/etc/evil.txt'"),
        ([_link("aclImdb/train/pos/50_9.txt", "/etc/passwd", tarfile.SYMTYPE)], "refusing link member"),
        ([_link("aclImdb/x", "aclImdb/README", tarfile.LNKTYPE)], "refusing link member 'aclImdb/x'"),
        ([_fifo("aclImdb/fifo")], "refusing special file member 'aclImdb/fifo'"),
        ([("aclImdb/train/pos/notes.txt", b"x")], "review file name not <id>_<rating>.txt"),
    ],
)
def test_download_rejects_hostile_members(tmp_path, make_imdb_archive, extra, message):
    archive = make_imdb_archive(n_per_class=3, extra_members=extra)
    with pytest.raises(InputError) as exc:
        download.run(DATA_CFG, tmp_path, str(archive))
    assert message in str(exc.value) and str(archive) in str(exc.value)
    assert "\n" not in str(exc.value)
    assert raw_outputs(tmp_path) == []
    assert not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_download_rejects_truncated_archive(tmp_path, make_imdb_archive, keep):
    archive = make_imdb_archive(n_per_class=20)
    data = archive.read_bytes()
    # At 0.999 every review is present; only the gzip trailer is cut.
    archive.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="corrupt or truncated archive"):
        download.run(DATA_CFG, tmp_path, str(archive))
    archive.write_bytes(b"not a gzip file at all")
    with pytest.raises(InputError, match="corrupt or truncated archive"):
        download.run(DATA_CFG, tmp_path, str(archive))
    assert raw_outputs(tmp_path) == []


@pytest.mark.parametrize("split", ["train/unsup", "test/neg"])
def test_download_rejects_missing_split(tmp_path, make_imdb_archive, split):
    archive = make_imdb_archive(n_per_class=3, drop_split=split)
    with pytest.raises(InputError, match=f"missing or empty split aclImdb/{split}$"):
        download.run(DATA_CFG, tmp_path, str(archive))
    assert raw_outputs(tmp_path) == []


def test_download_fetch_uses_cache_and_checks_md5(tmp_path):
    cached = tmp_path / "a.tar.gz"
    cached.write_bytes(b"payload")
    md5 = file_digest(cached, "md5")
    # A correct cached copy means no network access at all (the URL is bogus).
    assert download.fetch("http://invalid.invalid/x", cached, md5, retries=0, timeout=1) == cached
    source = tmp_path / "src.bin"
    source.write_bytes(b"other bytes")
    with pytest.raises(InputError, match="md5 mismatch"):
        download.fetch(source.as_uri(), tmp_path / "b.tar.gz", md5, retries=0, timeout=1)
    assert not (tmp_path / "b.tar.gz").exists() and not (tmp_path / "b.tar.gz.part").exists()


# --- prepare -----------------------------------------------------------------

PREP_CFG = {"max_len": 50, "truncate": "both", "vocab_size": 1000, "min_freq": 1, "val_fraction": 0.25, "seed": 0}


def test_prepare_split_vocab_and_metrics(tmp_path, make_imdb_archive):
    download.run(DATA_CFG, tmp_path, str(make_imdb_archive(n_per_class=20)))
    # Words seen only outside the training part must not enter the vocabulary.
    test = pd.read_parquet(tmp_path / "data/raw/test.parquet")
    test.loc[0, "text"] = "zzonlyintest " * 3
    test.to_parquet(tmp_path / "data/raw/test.parquet", index=False)
    metrics = prepare.run(PREP_CFG, tmp_path)

    vocab = json.loads((tmp_path / "data/prepared/vocab.json").read_text())
    assert vocab["max_len"] == 50 and vocab["truncate"] == "both" and vocab["tokens"][:2] == ["<pad>", "<unk>"]
    assert "zzonlyintest" not in vocab["tokens"] and "great" in vocab["tokens"]
    parts = {n: np.load(tmp_path / f"data/prepared/{n}.npz") for n in ("train", "val", "test")}
    assert {k: len(v["labels"]) for k, v in parts.items()} == {"train": 30, "val": 10, "test": 40}
    assert np.bincount(parts["val"]["labels"]).tolist() == [5, 5]  # stratified
    assert not set(parts["val"]["review_ids"][parts["val"]["labels"] == 1]) & set(
        parts["train"]["review_ids"][parts["train"]["labels"] == 1])
    for arr in parts.values():
        assert arr["ids"].dtype == np.int32 and arr["ids"].shape[1] == 50
        assert arr["lengths"].dtype == np.int32 and arr["labels"].dtype == np.int8
        assert arr["review_ids"].dtype == np.int64
        assert (arr["lengths"] >= 1).all() and (arr["ids"] < len(vocab["tokens"])).all()

    # Val words outside the train part's vocabulary exist, so its OOV rate is positive.
    saved = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert saved.pop("peak_rss_mb") > 0
    assert saved == metrics and saved["splits"] == {"train": 30, "val": 10, "test": 40}
    assert saved["oov_rate"]["train"] == 0.0 and saved["oov_rate"]["test"] > 0
    assert set(saved["length_percentiles"]) == {"p50", "p90", "p95", "p99"}
    assert 0 < saved["truncated_fraction"]["train"] < 1  # reviews are 5..120 words
    assert saved["vocab_size"] == len(vocab["tokens"])


def test_prepare_is_deterministic_and_seeded(tmp_path, make_imdb_archive):
    download.run(DATA_CFG, tmp_path, str(make_imdb_archive(n_per_class=20)))
    prepare.run(PREP_CFG, tmp_path)
    first = np.load(tmp_path / "data/prepared/val.npz")["review_ids"].copy()
    prepare.run(PREP_CFG, tmp_path)
    assert np.load(tmp_path / "data/prepared/val.npz")["review_ids"].tolist() == first.tolist()
    prepare.run({**PREP_CFG, "seed": 1}, tmp_path)
    assert np.load(tmp_path / "data/prepared/val.npz")["review_ids"].tolist() != first.tolist()


def test_prepare_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.parquet: not found"):
        prepare.run(PREP_CFG, tmp_path)


# --- embed -------------------------------------------------------------------

TOKENS = ["<pad>", "<unk>", "great", "awful", "film", "Rare"]


def write_vocab(root: Path) -> None:
    write_json(root / "data/prepared/vocab.json", {"tokens": TOKENS, "max_len": 10, "truncate": "head"})


def test_embed_random(tmp_path):
    write_vocab(tmp_path)
    cfg = {"method": "random", "path": None, "scale": None, "seed": 0}
    metrics = embed.run(cfg, 16, tmp_path)
    emb = np.load(tmp_path / "data/embeddings.npy")
    assert emb.shape == (6, 16) and emb.dtype == np.float32
    assert (emb[0] == 0).all() and (emb[1:] != 0).all()
    assert metrics == {"method": "random", "dim": 16, "vocab_size": 6, "coverage": None}
    big, _ = build_embeddings(["<pad>", "<unk>"] + [f"w{i}" for i in range(4000)], 64, np.random.default_rng(0))
    assert abs(big[1:].std() - 1 / 8) < 0.005  # default scale 1/sqrt(dim)


@pytest.mark.parametrize("header", ["", "3 4\n"])
def test_embed_pretrained_glove_and_word2vec(tmp_path, header):
    write_vocab(tmp_path)
    (tmp_path / "vec.txt").write_text(
        header + "great 1 2 3 4\nmovie 0 0 0 1\nAwful -1 -2 -3 -4\nawful 5 5 5 5\n<pad> 9 9 9 9\n", encoding="utf-8"
    )
    cfg = {"method": "pretrained", "path": "vec.txt", "scale": 0.1, "seed": 0}
    metrics = embed.run(cfg, 4, tmp_path)
    emb = np.load(tmp_path / "data/embeddings.npy")
    assert emb[2].tolist() == [1, 2, 3, 4]
    assert emb[3].tolist() == [5, 5, 5, 5]  # exact match beats the lowercased "Awful"
    assert (emb[0] == 0).all()
    assert metrics["coverage"] == pytest.approx(2 / 4)  # great, awful of great/awful/film/Rare


def test_embed_pretrained_wrong_dimension(tmp_path):
    write_vocab(tmp_path)
    (tmp_path / "vec.txt").write_text("great 1 2 3 4\nfilm 1 2 3\n", encoding="utf-8")
    cfg = {"method": "pretrained", "path": str(tmp_path / "vec.txt"), "scale": None, "seed": 0}
    with pytest.raises(InputError, match=r"vec.txt:2: expected 4 values \(train.embed_dim\), got 3$"):
        embed.run(cfg, 4, tmp_path)
    assert not (tmp_path / "data/embeddings.npy").exists() and not (tmp_path / "metrics").exists()
    with pytest.raises(InputError, match="embed.path = null"):
        embed.run({**cfg, "path": None}, 4, tmp_path)


# --- scripts end to end ------------------------------------------------------

PARAMS = """
data: {limit: 16}
prepare: {max_len: 40, vocab_size: 200, min_freq: 1, val_fraction: 0.25}
embed: {method: random}
train: {embed_dim: 8}
"""


def run_script(name: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "DVC_ROOT"} | {"PYTHONPATH": str(ROOT)} | env
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120,
    )


def test_scripts_run_in_project_dir(tmp_path, make_imdb_archive):
    archive = make_imdb_archive(n_per_class=10)
    (tmp_path / "params.yaml").write_text(PARAMS)
    for name in ("check", "download", "prepare", "embed"):
        proc = run_script(name, tmp_path, IMDB_ARCHIVE=str(archive))
        assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "data/raw/source.json").read_text())["counts"]["train"]["total"] == 16
    assert json.loads((tmp_path / "metrics/prepare.json").read_text())["splits"]["val"] == 4
    assert np.load(tmp_path / "data/embeddings.npy").shape[1] == 8


def test_script_errors_are_one_line_exit_2(tmp_path, make_imdb_archive):
    (tmp_path / "params.yaml").write_text("data: {limitt: 5}\n")
    proc = run_script("download", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "error: params.yaml: unknown key data.limitt (did you mean data.limit?)\n"

    archive = make_imdb_archive(n_per_class=2, extra_members=[("../x.txt", b"x")])
    (tmp_path / "params.yaml").write_text("data: {}\nmlflow: {enabled: false}\n")
    for stage in ("check", "download"):          # the check reads the archive as download would
        proc = run_script(stage, tmp_path, IMDB_ARCHIVE=str(archive))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
        assert proc.stderr.startswith("error: ")
        assert "unsafe member path '../x.txt'" in proc.stderr or "source.json: not found" in proc.stderr
    assert raw_outputs(tmp_path) == [] and not (tmp_path / "data/source.json").exists()


# --- the network path (issue 17 item 13): a file:// URL stands in for the server ----------------

def test_fetch_downloads_through_a_part_file_and_keeps_the_copy(tmp_path, make_imdb_archive):
    source = make_imdb_archive(n_per_class=3)
    md5 = file_digest(source, "md5")
    dest = tmp_path / "data/download/aclImdb_v1.tar.gz"
    assert download.fetch(source.as_uri(), dest, md5, retries=0, timeout=5) == dest
    assert dest.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name], "the .part file was left behind"


def test_fetch_retries_after_network_errors_then_gives_up(tmp_path, make_imdb_archive, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    source = make_imdb_archive(n_per_class=3)
    md5 = file_digest(source, "md5")
    real_urlopen, failures = urllib.request.urlopen, []

    def flaky(url, timeout):
        if len(failures) < 2:
            failures.append(url)
            raise urllib.error.URLError("connection reset by peer")
        return real_urlopen(url, timeout=timeout)

    monkeypatch.setattr(download.urllib.request, "urlopen", flaky)
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    dest = tmp_path / "a.tar.gz"
    assert download.fetch(source.as_uri(), dest, md5, retries=2, timeout=5) == dest
    err = capsys.readouterr().err
    assert "retry 1/2 after: <urlopen error connection reset by peer>" in err and "retry 2/2" in err
    assert dest.read_bytes() == source.read_bytes()

    failures.clear()
    with pytest.raises(OSError, match=r"download failed after 2 attempts: .*connection reset by peer"):
        download.fetch(source.as_uri(), tmp_path / "b.tar.gz", md5, retries=1, timeout=5)
    assert not list(tmp_path.glob("b.tar.gz*"))


def test_check_and_download_stages_fetch_from_the_url(tmp_path, make_imdb_archive):
    source = make_imdb_archive(n_per_class=10)
    md5 = file_digest(source, "md5")
    (tmp_path / "params.yaml").write_text(
        f"data: {{url: '{source.as_uri()}', md5: '{md5}', limit: 16, retries: 0}}\nmlflow: {{enabled: false}}\n")
    for name in ("check", "download"):
        proc = run_script(name, tmp_path, IMDB_ARCHIVE="")
        assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "data/source.json").read_text()) == {"url": source.as_uri(), "md5": md5}
    metrics = json.loads((tmp_path / "data/raw/source.json").read_text())
    assert metrics["source"] == source.as_uri() and metrics["md5"] == md5
    assert (tmp_path / "data/download/aclImdb_v1.tar.gz").read_bytes() == source.read_bytes()
    assert len(pd.read_parquet(tmp_path / "data/raw/train.parquet")) == 16
    # A wrong md5 is refused and nothing is kept: not the .part file, not the outputs.
    (tmp_path / "params.yaml").write_text(
        f"data: {{url: '{source.as_uri()}', md5: '{'0' * 32}', retries: 0}}\nmlflow: {{enabled: false}}\n")
    shutil.rmtree(tmp_path / "data")
    for name in ("check", "download"):
        proc = run_script(name, tmp_path, IMDB_ARCHIVE="")
    assert proc.returncode == 2 and "md5 mismatch" in proc.stderr
    assert not list((tmp_path / "data/download").iterdir()) and not (tmp_path / "data/raw").exists()
