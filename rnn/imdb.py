"""The IMDB review archive (aclImdb layout, .tar.gz; Maas et al., 2011), read safely.

The archive is streamed, never extracted, so a hostile member name or link can't write outside the
project, and its size is bounded: a review may hold at most MAX_REVIEW_BYTES (the real data's
largest is 14 KB), the whole archive may unpack to at most MAX_UNPACKED_BYTES (the real one:
139 MB), so a small archive that unpacks to gigabytes is refused instead of filling the memory, and
it may hold at most MAX_MEMBERS files and folders (tarfile keeps a record of each one it has read).
"""

from __future__ import annotations

import gzip
import posixpath
import re
import tarfile
import zlib
from pathlib import Path

from rnn.config import MAX_REVIEW_BYTES
from rnn.errors import InputError

# (split, class dir) pairs that must exist and be non-empty; label per class.
SPLITS = {"train": ("pos", "neg", "unsup"), "test": ("pos", "neg")}
LABELS = {"pos": 1, "neg": 0, "unsup": -1}
MAX_UNPACKED_BYTES = 1 << 30
MAX_MEMBERS = 150_000                 # the real archive has 100,016 (300,000 empty ones: 222 MB, 11 s)
MAX_RATING = 10                       # IMDB's scale; unlabelled reviews have 0
MAX_ID = 2**63 - 1                    # ids are stored as int64
GZIP_MAGIC = b"\x1f\x8b"
_MEMBER = re.compile(r"^aclImdb/(train|test)/(pos|neg|unsup)/([^/]+)$")
_REVIEW = re.compile(r"^(\d+)_(\d+)\.txt$")

Reviews = dict[tuple[str, str], dict[int, tuple[int, bytes]]]


def check_gzip_file(path: Path, what: str) -> None:
    """A one-line error unless `path` is a regular file that starts like a gzip stream.
    what: how the user named it (e.g. "IMDB_ARCHIVE=/x.tar.gz")."""
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such file")
    if not path.is_file():
        raise InputError(f"{what}: not a regular file")
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            raise InputError(f"{what}: not a gzip file (a .tar.gz archive in the aclImdb layout is expected)")


class _Capped:
    """A read-only stream that refuses to yield more than `limit` bytes in total."""

    def __init__(self, stream, limit: int, archive: Path):
        self.stream, self.limit, self.archive, self.count = stream, limit, archive, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise InputError(f"{self.archive}: unpacks to more than {self.limit >> 20} MiB "
                             f"(the IMDB archive unpacks to 139 MB); refusing it")
        return data


def _safe_name(archive: Path, member: tarfile.TarInfo) -> str:
    """Normalized member path; reject anything that could escape or isn't a plain file/dir."""
    name = member.name
    norm = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith("/") or norm == ".." or norm.startswith("../") or re.match(r"^[A-Za-z]:", name):
        raise InputError(f"{archive}: unsafe member path {name!r}")
    if not (member.isreg() or member.isdir()):
        kind = "link" if (member.issym() or member.islnk()) else "special file"
        raise InputError(f"{archive}: refusing {kind} member {name!r}")
    return norm


def read_archive(archive: Path, keep: bool = True) -> Reviews:
    """Stream the archive; return {(split, class): {id: (rating, raw bytes)}} after checks.

    keep=False checks everything the same way but keeps no text (the bytes are b""): what the check
    stage uses to refuse a bad archive before the download stage's outputs are removed.
    """
    found: Reviews = {(s, c): {} for s, classes in SPLITS.items() for c in classes}
    try:
        # gzip.GzipFile rather than tarfile's "r|gz": tarfile treats a cut-off gzip
        # stream as a normal end of archive, GzipFile raises EOFError instead.
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz:
            stream = _Capped(gz, MAX_UNPACKED_BYTES, archive)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for count, member in enumerate(tar, start=1):
                    if count > MAX_MEMBERS:
                        raise InputError(f"{archive}: more than {MAX_MEMBERS:,} members (the IMDB archive has "
                                         "100,016); refusing it")
                    _read_member(archive, tar, member, found, keep)
            while stream.read(1 << 20):  # reach the gzip trailer so truncation and CRC errors surface
                pass
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise InputError(f"{archive}: corrupt or truncated archive ({exc})") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or not archive.is_file():
            raise FileNotFoundError(f"{archive}: archive not found") from None
        raise InputError(f"{archive}: corrupt or truncated archive ({exc})") from None
    for (split, cls), bucket in found.items():
        if not bucket:
            raise InputError(f"{archive}: missing or empty split aclImdb/{split}/{cls}")
    return found


def _read_member(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, found: Reviews,
                 keep: bool) -> None:
    name = _safe_name(archive, member)
    m = _MEMBER.match(name)
    if not m or not member.isreg() or (m[1], m[2]) not in found:
        return  # README, vocab, bag-of-words features, url lists ...
    r = _REVIEW.match(m[3])
    if not r:
        if m[3].endswith(".txt"):
            raise InputError(f"{archive}: review file name not <id>_<rating>.txt: {name!r}")
        return
    rid, rating = int(r[1]), int(r[2])
    if rid > MAX_ID:
        raise InputError(f"{archive}: review id {rid} too large (at most {MAX_ID}): {name!r}")
    if rating > MAX_RATING:
        raise InputError(f"{archive}: rating {rating} out of range 0-{MAX_RATING}: {name!r}")
    if member.size > MAX_REVIEW_BYTES:
        raise InputError(f"{archive}: review {name!r} has {member.size:,} bytes, more than the "
                         f"{MAX_REVIEW_BYTES >> 20} MiB a review may have (the largest IMDB review: 14 KB)")
    bucket = found[(m[1], m[2])]
    if rid in bucket:
        raise InputError(f"{archive}: duplicate review id {rid} in {m[1]}/{m[2]}")
    text = b""
    if keep:
        f = tar.extractfile(member)
        assert f is not None  # regular file
        text = f.read()
    bucket[rid] = (rating, text)


def reviews(found: Reviews, limit: int | None) -> tuple[dict[str, list[tuple[int, str, int, int]]], int]:
    """The reviews of `read_archive`'s result as rows (id, text, label, rating) per output split
    (train, test, unsup), and the count of texts that were not valid UTF-8 (decoded with U+FFFD).

    limit: reviews kept per split, the lowest ids first, half positive (rounded down) and half
    negative in train and test; None keeps all.
    """
    half = {"pos": None if limit is None else limit // 2, "neg": None if limit is None else limit - limit // 2}
    wanted = {("train", "pos"): half["pos"], ("train", "neg"): half["neg"], ("test", "pos"): half["pos"],
              ("test", "neg"): half["neg"], ("train", "unsup"): limit}
    rows: dict[str, list[tuple[int, str, int, int]]] = {"train": [], "test": [], "unsup": []}
    decode_errors = 0
    for (split, cls), n in wanted.items():
        bucket = found[(split, cls)]
        for rid in sorted(bucket)[:n]:
            rating, raw = bucket[rid]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                decode_errors += 1
            rows["unsup" if cls == "unsup" else split].append((rid, text, LABELS[cls], 0 if cls == "unsup" else rating))
    return rows, decode_errors
