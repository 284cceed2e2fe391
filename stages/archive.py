"""data/source.json: the IMDB archive by content, written by the check stage on every `dvc repro` and
a dependency of the download stage: a different archive reruns the pipeline, the same one wherever
it lies reruns nothing."""

from __future__ import annotations

from pathlib import Path

from rnn.errors import InputError
from rnn.imdb import check_gzip_file
from stages.outputs import file_digest, read_json

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
