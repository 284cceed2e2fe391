"""rnn/imdb.py: the reviews kept from an archive (its safety checks: test_reliability.py, test_stages_data.py)."""

from __future__ import annotations

from rnn.imdb import LABELS, read_archive, reviews


def test_reviews_keep_the_lowest_ids_half_positive_and_count_bad_utf8():
    found = {(s, c): {} for s, c in [("train", "pos"), ("train", "neg"), ("train", "unsup"), ("test", "pos"),
                                     ("test", "neg")]}
    for (split, cls), bucket in found.items():
        for rid in (7, 3, 5, 1):
            bucket[rid] = (0 if cls == "unsup" else 8, f"{split} {cls} {rid}".encode())
    found[("test", "neg")][1] = (2, b"caf\xe9")
    rows, errors = reviews(found, 3)
    assert [r[0] for r in rows["train"]] == [1, 1, 3] and [r[2] for r in rows["train"]] == [1, 0, 0]
    assert [r[0] for r in rows["unsup"]] == [1, 3, 5] and {r[2] for r in rows["unsup"]} == {LABELS["unsup"]}
    assert rows["test"][1] == (1, "caf\ufffd", 0, 2) and errors == 1
    everything, _ = reviews(found, None)
    assert {k: len(v) for k, v in everything.items()} == {"train": 8, "test": 8, "unsup": 4}


def test_read_archive_keeps_text_only_when_asked(make_imdb_archive):
    path = make_imdb_archive()
    full, bare = read_archive(path), read_archive(path, keep=False)
    assert full.keys() == bare.keys() and all(full[k].keys() == bare[k].keys() for k in full)
    assert all(text for bucket in full.values() for _, text in bucket.values())
    assert not any(text for bucket in bare.values() for _, text in bucket.values())
