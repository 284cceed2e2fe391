"""Tests for rnn.embeddings (co-occurrence, PPMI, randomized SVD) and the embed stage's svd method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rnn.embeddings import (SparseMatrix, build_embeddings, cooccurrence, ppmi, randomized_svd, read_vectors,
                            svd_embeddings)
from rnn.errors import InputError
from rnn.io import write_json
from stages import embed, settings
from stages.settings import ParamsError


def save_npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


ROOT = Path(__file__).resolve().parents[1]

# --- cooccurrence --------------------------------------------------------------

# Ids 2..5 are words, 1 is UNK. Pairs within window 2: (2,3)@1, (3,4)@1, (2,4)@2 in the first
# sequence; in the second only (5,3)@2 counts, UNK pairs do not. Without separators 4 and 5
# would be neighbours.
SEQS = [np.array([2, 3, 4]), np.array([5, 1, 3])]
EXPECTED = np.zeros((6, 6))
for _w, _c, _n in [(2, 3, 1.0), (3, 4, 1.0), (2, 4, 0.5), (5, 3, 0.5)]:
    EXPECTED[_w, _c] = EXPECTED[_c, _w] = _n


@pytest.mark.parametrize("chunk, block_size", [(1, 1), (2, 6), (3, 12), (1 << 20, 1 << 22)])
def test_cooccurrence_hand_checked(chunk, block_size):
    # block_size 1 and 6: one row per block; 12: two rows per block, the last block short.
    counts = cooccurrence(SEQS, 6, 100, 2, chunk=chunk, block_size=block_size)  # context_size 100 > V: 6
    assert isinstance(counts, SparseMatrix) and counts.shape == (6, 6) and counts.dtype == np.float32
    assert counts.nnz == (EXPECTED != 0).sum()  # zeros are not stored
    np.testing.assert_array_equal(counts.toarray(), EXPECTED)


def test_cooccurrence_window_context_clip_and_pad():
    np.testing.assert_array_equal(cooccurrence(SEQS, 6, 4, 2).toarray(), EXPECTED[:, :4])  # 4, 5: no contexts
    near = cooccurrence([np.array([2, 3, 0, 4, 5])], 6, 6, 1)  # window 1; a PAD inside is skipped
    expected = np.zeros((6, 6))
    expected[2, 3] = expected[3, 2] = expected[4, 5] = expected[5, 4] = 1.0
    np.testing.assert_array_equal(near.toarray(), expected)
    empty = cooccurrence([], 6, 6, 3)
    assert empty.nnz == 0 and empty.indptr.tolist() == [0] * 7
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 6\), got 2..6"):
        cooccurrence([np.array([2, 6])], 6, 6, 2)
    with pytest.raises(ValueError, match=r"got -1..3"):
        cooccurrence([np.array([2, 3]), np.array([-1, 3])], 6, 6, 2)


def brute_force_counts(seqs: list[np.ndarray], V: int, C: int, window: int) -> np.ndarray:
    """The definition, pair by pair: the dense reference the sparse counts must equal."""
    counts = np.zeros((V, C))
    for seq in seqs:
        for i, w in enumerate(seq):
            for j in range(max(0, i - window), min(len(seq), i + window + 1)):
                if j != i and w >= 2 and 2 <= seq[j] < C:
                    counts[w, seq[j]] += 1.0 / abs(i - j)
    return counts


@pytest.mark.parametrize("chunk, block_size", [(7, 40), (1 << 20, 1 << 22)])
def test_cooccurrence_equals_the_definition_on_random_text(chunk, block_size):
    rng = np.random.default_rng(3)
    # Zipf-like ids as in a frequency-ordered vocabulary, PAD and UNK among them; some
    # sequences shorter than the window, one empty.
    seqs = [np.minimum(rng.zipf(1.3, size=n), 29) for n in (0, 1, 3, 40, 17, 60)]
    counts = cooccurrence(seqs, 30, 12, 3, chunk=chunk, block_size=block_size)
    expected = brute_force_counts(seqs, 30, 12, 3)
    assert counts.nnz == (expected != 0).sum() > 50
    np.testing.assert_allclose(counts.toarray(), expected, rtol=1e-6)
    assert np.all(np.diff(counts.indices[counts.indptr[5] : counts.indptr[6]]) > 0)  # columns ascending


# --- SparseMatrix ----------------------------------------------------------------


def sparse_example(seed: int = 0) -> np.ndarray:
    """(9, 7) with empty rows (first, inner, last) and an empty column."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((9, 7)) * (rng.random((9, 7)) < 0.4)
    dense[[0, 4, 8]] = 0.0
    dense[:, 2] = 0.0
    dense[1, 3] = 1.5  # at least one value
    return dense


@pytest.mark.parametrize("chunk", [1, 3, 8, 1 << 20])
def test_sparse_matrix_products_equal_dense(chunk):
    dense = sparse_example()
    M = SparseMatrix.from_dense(dense)
    assert M.nnz == (dense != 0).sum() and M.indptr[0] == 0 and M.indptr[-1] == M.nnz
    np.testing.assert_array_equal(M.toarray(), dense)
    np.testing.assert_array_equal(M.T.toarray(), dense.T)
    for band_values in (1, 4, 10):  # one column per band, a few, one band
        MT = M.transpose(band_values)
        np.testing.assert_array_equal(MT.toarray(), dense.T)
        assert all(np.all(np.diff(MT.indices[a:b]) > 0) for a, b in zip(MT.indptr[:-1], MT.indptr[1:]))
    rng = np.random.default_rng(1)
    X, Y = rng.standard_normal((7, 3)), rng.standard_normal((9, 2))
    np.testing.assert_allclose(M.matmul(X, chunk=chunk), dense @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M.T.matmul(Y, chunk=chunk), dense.T @ Y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M @ X, dense @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M.sums(axis=0), dense.sum(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M.sums(axis=1), dense.sum(axis=1), rtol=1e-12, atol=1e-12)
    assert (M.matmul(X, chunk=chunk)[[0, 4, 8]] == 0).all()
    with pytest.raises(ValueError, match=r"cannot multiply \(9, 7\) by \(9, 2\)"):
        M @ Y


def test_sparse_matrix_row_chunks_cover_rows_within_budget():
    M = SparseMatrix.from_dense(sparse_example())
    sizes = np.diff(M.indptr)
    for budget in (1, 2, 5, 100):
        chunks = list(M.row_chunks(budget))
        assert [c[0] for c in chunks[1:]] == [c[1] for c in chunks[:-1]] and chunks[0][0] == 0 and chunks[-1][1] == 9
        for start, stop in chunks:
            assert sizes[start:stop].sum() <= budget or stop - start == 1


# --- ppmi -----------------------------------------------------------------------


def test_ppmi_matches_direct_formula():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(7, 5)).astype(np.float64) * rng.random((7, 5))
    counts[3] = 0.0  # an unseen word and an unused context must give zeros, not NaN
    counts[:, 4] = 0.0
    alpha = 0.75
    total, ctx = counts.sum(), counts.sum(axis=0) ** alpha
    expected = np.zeros_like(counts)
    for w in range(7):
        for c in range(5):
            if counts[w, c] > 0:
                p_wc, p_w, p_c = counts[w, c] / total, counts[w].sum() / total, ctx[c] / ctx.sum()
                expected[w, c] = max(0.0, np.log(p_wc / (p_w * p_c)))
    assert 0 < (expected > 0).sum() < (counts > 0).sum()  # some PMI is negative and gets clipped
    sparse = SparseMatrix.from_dense(counts)
    out64 = ppmi(sparse, alpha, dtype=np.float64)
    assert out64.nnz == (expected > 0).sum()  # clipped values are not stored
    np.testing.assert_allclose(out64.toarray(), expected, rtol=1e-12, atol=1e-12)
    out32 = ppmi(sparse, alpha)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32.toarray(), expected, rtol=1e-5, atol=1e-6)


# --- randomized_svd ---------------------------------------------------------------


def test_randomized_svd_recovers_top_singular_values_and_is_seeded():
    rng = np.random.default_rng(1)
    low_rank = rng.standard_normal((120, 6)) @ rng.standard_normal((6, 80))
    U_true, S_true, _ = np.linalg.svd(low_rank)
    U, S = randomized_svd(low_rank, 4, np.random.default_rng(0))
    assert U.shape == (120, 4) and S.shape == (4,)
    np.testing.assert_allclose(S, S_true[:4], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(U * U_true[:, :4], axis=0)), 1.0, rtol=1e-8)  # same up to sign

    # Full rank, slowly decaying spectrum: the power iterations still pin down the top values.
    Q1, _ = np.linalg.qr(rng.standard_normal((200, 100)))
    Q2, _ = np.linalg.qr(rng.standard_normal((100, 100)))
    decaying = (Q1 * 0.9 ** np.arange(100)) @ Q2.T
    _, S = randomized_svd(decaying, 5, np.random.default_rng(0))
    np.testing.assert_allclose(S, 0.9 ** np.arange(5), rtol=1e-3)

    again = randomized_svd(decaying, 5, np.random.default_rng(0))
    other = randomized_svd(decaying, 5, np.random.default_rng(1))
    assert np.array_equal(again[1], S) and not np.array_equal(other[1], S)


def test_randomized_svd_of_sparse_matrix_equals_dense_path():
    """The sparse products give the dense path's factors: the same draws, float32 rounding apart."""
    counts = cooccurrence(toy_corpus(60) + [np.array([2, 16, 3, 5, 6])], len(WORDS), 100, 3)
    M = ppmi(counts)
    dense = M.toarray()
    assert 0 < M.nnz < dense.size / 2
    U, S = randomized_svd(M, 6, np.random.default_rng(0))
    U_dense, S_dense = randomized_svd(dense, 6, np.random.default_rng(0))
    assert U.dtype == np.float32 and U.shape == (len(WORDS), 6)
    np.testing.assert_allclose(S, S_dense, rtol=1e-5)
    signs = np.sign(np.sum(U * U_dense, axis=0))
    np.testing.assert_allclose(np.abs(np.sum(U * U_dense, axis=0)), 1.0, atol=1e-4)  # same up to sign
    np.testing.assert_allclose(U * signs * S, U_dense * S_dense, atol=1e-4 * S[0])  # row by row


# --- svd_embeddings ---------------------------------------------------------------

WORDS = ["<pad>", "<unk>", "the", "movie", "was", "and", "good", "great", "bad", "awful",
         "fun", "enjoyable", "loved", "dull", "tedious", "hated", "never_seen"]
ID = {w: i for i, w in enumerate(WORDS)}


def toy_corpus(n: int = 400, seed: int = 0) -> list[np.ndarray]:
    """'good'/'great' share contexts (fun, enjoyable, loved), 'bad'/'awful' share others."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n):
        pos = rng.random() < 0.5
        word = rng.choice(["good", "great"] if pos else ["bad", "awful"])
        cues = rng.choice(["fun", "enjoyable", "loved"] if pos else ["dull", "tedious", "hated"], size=2)
        seqs.append(np.array([ID[w] for w in ["the", "movie", "was", word, "and", *cues, "<unk>"]]))
    return seqs


def cos(E: np.ndarray, a: str, b: str) -> float:
    u, v = E[ID[a]], E[ID[b]]
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


def test_svd_embeddings_group_words_by_context():
    E, seen = svd_embeddings(toy_corpus(), len(WORDS), 8, np.random.default_rng(0), context_size=100, window=3)
    assert E.shape == (len(WORDS), 8) and E.dtype == np.float32
    assert (E[0] == 0).all()
    assert not seen[[ID["<pad>"], ID["<unk>"], ID["never_seen"]]].any() and seen[2:-1].all()
    assert (E[ID["<unk>"]] != 0).all() and (E[ID["never_seen"]] != 0).all()  # random, not zero
    norms = np.linalg.norm(E[seen], axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=1e-5)  # unit rows, then one common factor
    assert E[seen].std() == pytest.approx(1 / np.sqrt(8), rel=1e-4)

    within = min(cos(E, "good", "great"), cos(E, "bad", "awful"))
    across = max(cos(E, a, b) for a in ("good", "great") for b in ("bad", "awful"))
    assert within > across + 0.3, (within, across)

    again, _ = svd_embeddings(toy_corpus(), len(WORDS), 8, np.random.default_rng(0), context_size=100, window=3)
    np.testing.assert_array_equal(again, E)


def test_svd_embeddings_tiny_vocab_and_scale():
    # dim 16 > rank of a 6 x 6 matrix: the extra columns stay zero, nothing fails.
    E, seen = svd_embeddings(SEQS, 6, 16, np.random.default_rng(0), scale=0.5)
    assert E.shape == (6, 16) and seen.tolist() == [False, False, True, True, True, True]
    assert (E[seen][:, 6:] == 0).all() and E[seen].std() == pytest.approx(0.5, rel=1e-5)


# --- pretrained vectors ----------------------------------------------------------


def test_read_vectors_prefers_exact_words_and_skips_the_word2vec_header(tmp_path):
    path = tmp_path / "vec.txt"
    path.write_text("3 2\nGreat 9 9\ngreat 1 2\nFILM 3 4\nfilm 5 6\nmovie 7 8\n\n", encoding="utf-8")
    found = read_vectors(path, {"great": 2, "film": 3, "awful": 4}, 2)
    assert {i: v.tolist() for i, v in found.items()} == {2: [1, 2], 3: [5, 6]}
    assert all(v.dtype == np.float32 for v in found.values())
    path.write_text("great 1 x\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"vec.txt:1: non-numeric vector value$"):
        read_vectors(path, {"great": 2}, 2)
    path.write_bytes(b"great \xff 1\n")
    with pytest.raises(InputError, match=r"vec.txt: not a UTF-8 text embedding file"):
        read_vectors(path, {"great": 2}, 2)


def test_build_embeddings_fills_found_rows_and_zeroes_pad(tmp_path):
    path = tmp_path / "vec.txt"
    path.write_text("great 1 2 3\n<pad> 9 9 9\n", encoding="utf-8")
    tokens = ["<pad>", "<unk>", "great", "dull"]
    emb, coverage = build_embeddings(tokens, 3, np.random.default_rng(0), 0.1, path)
    plain, none = build_embeddings(tokens, 3, np.random.default_rng(0), 0.1)
    assert emb[2].tolist() == [1, 2, 3] and (emb[0] == 0).all() and coverage == 0.5 and none is None
    assert np.array_equal(emb[[1, 3]], plain[[1, 3]]) and emb.dtype == np.float32   # the same draws


# --- embed stage, method svd -------------------------------------------------------

TOKENS = ["<pad>", "<unk>", "great", "awful", "film", "rare", "the", "movie"]
CFG = {"method": "svd", "path": None, "scale": None, "seed": 0, "context_size": 10000, "window": 2}


def write_prepared(root: Path) -> None:
    """Vocabulary with max_len 4; 'film' only in validation/test, 'rare' only far into an unlabelled review."""
    write_json(root / "data/prepared/vocab.json", {"tokens": TOKENS, "max_len": 4, "truncate": "head"})
    ids = np.array([[6, 7, 2, 0], [6, 7, 3, 3]], dtype=np.int32)
    film = np.array([[6, 4, 0, 0]], dtype=np.int32)
    save_npz(root / "data/prepared/train.npz", ids=ids, lengths=np.array([3, 4], dtype=np.int32),
             labels=np.array([1, 0], dtype=np.int8), review_ids=np.array([0, 1]))
    for part in ("val", "test"):
        save_npz(root / f"data/prepared/{part}.npz", ids=film, lengths=np.array([2], dtype=np.int32),
                 labels=np.array([1], dtype=np.int8), review_ids=np.array([2]))
    unsup = pd.DataFrame({"id": [0], "text": ["The movie was great, the MOVIE was great rare!"], "label": [-1],
                          "rating": [0]})
    (root / "data/raw").mkdir(parents=True)
    unsup.to_parquet(root / "data/raw/unsup.parquet", index=False)


def test_embed_stage_svd_uses_train_part_and_whole_unlabelled_reviews(tmp_path):
    write_prepared(tmp_path)
    metrics = embed.run(CFG, 6, tmp_path)
    E = np.load(tmp_path / "data/embeddings.npy")
    assert E.shape == (8, 6) and E.dtype == np.float32 and (E[0] == 0).all()
    # Seen: great, awful, the, movie, and rare (token 10 of the review: no truncation to 4);
    # not film, which only validation and test reviews contain.
    assert metrics["coverage"] == pytest.approx(5 / 6)
    assert metrics["tokens"] == 3 + 4 + 10  # train lengths + the whole unlabelled review
    assert {k: metrics[k] for k in ("method", "dim", "vocab_size")} == {"method": "svd", "dim": 6, "vocab_size": 8}
    assert metrics["seconds"] >= 0
    saved = json.loads((tmp_path / "metrics/embed.json").read_text())
    assert saved.pop("peak_rss_mb") > 0 and saved == metrics      # the file adds the stage's peak memory


def test_embed_stage_svd_missing_input_and_bad_params(tmp_path):
    write_prepared(tmp_path)
    (tmp_path / "data/raw/unsup.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"unsup.parquet: not found \(needed by embed.method svd\)"):
        embed.run(CFG, 6, tmp_path)
    assert not (tmp_path / "data/embeddings.npy").exists()
    with pytest.raises(ParamsError, match=r"^params.yaml: embed.context_size = 1: must be >= 2$"):
        settings.validate({"embed": {"method": "svd", "context_size": 1}})
    with pytest.raises(ParamsError, match=r"^params.yaml: embed.window = 0: must be >= 1$"):
        settings.validate({"embed": {"window": 0}})


def test_embed_script_svd_on_synthetic_archive(tmp_path, make_imdb_archive):
    """download -> prepare -> embed with method svd: a tiny vocabulary, context_size clipped to it."""
    (tmp_path / "params.yaml").write_text(
        "data: {limit: 16}\nprepare: {max_len: 40, vocab_size: 200, min_freq: 1, val_fraction: 0.25}\n"
        "embed: {method: svd}\ntrain: {embed_dim: 8}\n"
    )
    env = ({k: v for k, v in os.environ.items() if k != "DVC_ROOT"}
           | {"IMDB_ARCHIVE": str(make_imdb_archive()), "PYTHONPATH": str(ROOT)})
    for name in ("check", "download", "prepare", "embed"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics/embed.json").read_text())
    vocab_size = len(json.loads((tmp_path / "data/prepared/vocab.json").read_text())["tokens"])
    assert metrics["method"] == "svd" and metrics["vocab_size"] == vocab_size < 10000
    assert metrics["coverage"] == 1.0  # every training word has neighbours
    assert np.load(tmp_path / "data/embeddings.npy").shape == (vocab_size, 8)
