"""Reading the IMDB archive (aclImdb layout, .tar.gz) safely: shared by the check and download stages.

The archive is streamed, never extracted, so a hostile member name or link can't write outside the
project, and its size is bounded: a review may hold at most MAX_REVIEW_BYTES (the real data's
largest is 14 KB) and the whole archive may unpack to at most MAX_UNPACKED_BYTES (the real one:
139 MB), so a small archive that unpacks to gigabytes is refused instead of filling the memory.
"""

from __future__ import annotations

import gzip
import posixpath
import re
import tarfile
import zlib
from pathlib import Path

from rnn.errors import InputError
from stages.outputs import file_digest, read_json

# (split, class dir) pairs that must exist and be non-empty; label per class.
SPLITS = {"train": ("pos", "neg", "unsup"), "test": ("pos", "neg")}
LABELS = {"pos": 1, "neg": 0, "unsup": -1}
MAX_REVIEW_BYTES = 1 << 20
MAX_UNPACKED_BYTES = 1 << 30
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
                for member in tar:
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


# ---------------------------------------------------------------------------------- the source
# data/source.json names the archive the pipeline reads by content: written by the check stage on
# every `dvc repro`, read by the download stage (its dependency). Its bytes change only when the
# archive does, so DVC reruns the pipeline for a different archive and nothing for the same one,
# wherever it lies.
SOURCE = "data/source.json"
DOWNLOADED = "data/download/aclImdb_v1.tar.gz"   # the download stage's copy, kept once its md5 matched


def read_source(root: Path) -> dict:
    """data/source.json (what the check stage saw): {"archive": {sha256, size}} or {"url", "md5"}."""
    source = read_json(root / SOURCE, "check")
    if not isinstance(source, dict) or not (isinstance(source.get("archive"), dict) or "url" in source):
        raise InputError(f"{root / SOURCE}: names neither an archive nor a url; run the check stage again")
    return source


def describe_source(url: str, md5: str, local_archive: str | None) -> dict:
    """What data/source.json holds: {"archive": {sha256, size}} for the local copy named by
    IMDB_ARCHIVE (checked to be a gzip file), else {"url", "md5"} of the download."""
    if not local_archive:
        return {"url": url, "md5": md5}
    path = Path(local_archive)
    check_gzip_file(path, f"IMDB_ARCHIVE={local_archive}")
    return {"archive": {"sha256": file_digest(path), "size": path.stat().st_size}}


def source_mismatch(source: dict, local_archive: str | None, sha256: str | None = None) -> str | None:
    """Why the archive at hand is not the one `source` (data/source.json) names, or None.
    sha256: the local archive's digest, when known."""
    wanted = source.get("archive")
    if bool(wanted) != bool(local_archive):
        return (f"{SOURCE} names {'a local archive' if wanted else 'a download'} but IMDB_ARCHIVE is "
                f"{'not set' if wanted else 'set'}")
    if wanted and sha256 is not None and sha256 != wanted.get("sha256"):
        return f"IMDB_ARCHIVE={local_archive} has sha256 {sha256[:12]}..., {SOURCE} says {str(wanted.get('sha256'))[:12]}..."
    return None
