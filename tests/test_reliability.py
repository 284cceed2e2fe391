"""Awkward review texts travel the whole way, archive -> prepare -> model, without a crash."""
from __future__ import annotations

import numpy as np

from rnn import ModelConfig, SentimentModel
from stages import download, prepare

DATA_CFG = {"url": "http://invalid.invalid/x.tar.gz", "md5": "0" * 32, "limit": None, "retries": 0, "timeout": 1}
PREP_CFG = {"max_len": 30, "truncate": "both", "vocab_size": 1000, "min_freq": 1, "val_fraction": 0.25, "seed": 0}
AWKWARD = [
    ("aclImdb/test/pos/900_9.txt", b""),                                     # empty file
    ("aclImdb/test/pos/901_8.txt", b"   \n\t  <br /><br />  "),               # whitespace and tags
    ("aclImdb/test/neg/902_1.txt", b"zqxv wvkj xxyyzz qqq"),                  # no known word
    ("aclImdb/test/neg/903_2.txt", b"\xff\xfe broken \xc3 bytes awful"),      # not UTF-8
    ("aclImdb/test/neg/904_3.txt", b"boring " * 140_000),                     # 980 KB review
    ("aclImdb/test/pos/905_10.txt", "\u00e9t\u00e9 \U0001f600 \u201cgreat\u201d".encode()),
]


def test_awkward_reviews_are_encoded_and_scored(tmp_path, make_imdb_archive):
    archive = make_imdb_archive(n_per_class=10, extra_members=AWKWARD)
    metrics = download.run(DATA_CFG, tmp_path, str(archive))
    assert metrics["decode_errors"] == 1
    prepare.run(PREP_CFG, tmp_path)
    test = np.load(tmp_path / "data/prepared/test.npz")
    rows = {rid: i for i, rid in enumerate(test["review_ids"])}
    assert set(range(900, 906)) <= set(rows)
    lengths = test["lengths"][[rows[r] for r in range(900, 906)]]
    assert lengths.tolist()[:3] == [1, 1, 4] and lengths[4] == 30       # [UNK], [UNK], 4 x UNK, truncated
    assert (test["ids"][rows[902], :4] == 1).all()                      # no known word: all UNK
    vocab_size = int(test["ids"].max()) + 1
    model = SentimentModel.create(ModelConfig(vocab_size=vocab_size, embed_dim=4, hidden_size=4),
                                  np.random.default_rng(0))
    p = model.predict_proba(test["ids"], test["lengths"])
    assert p.shape == test["lengths"].shape and np.isfinite(p).all()
