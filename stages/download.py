"""Stage `download`: fetch (or take a local copy of) the IMDB archive and turn it into parquet.

The archive is read by streaming its members, never extracted, so a hostile
member name or link can't write outside the project. Nothing is written until
every split has been read and checked.

Env var IMDB_ARCHIVE names a local archive to use instead of downloading; it is
verified by structure (layout and file names), not by checksum, since offline
copies may be repacked.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import re
import sys
import tarfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from rnn.errors import InputError
from stages import settings
from stages.common import Outputs, project_root, run_stage

# (split, class dir) pairs that must exist and be non-empty; label per class.
SPLITS = {"train": ("pos", "neg", "unsup"), "test": ("pos", "neg")}
LABELS = {"pos": 1, "neg": 0, "unsup": -1}
_MEMBER = re.compile(r"^aclImdb/(train|test)/(pos|neg|unsup)/([^/]+)$")
_REVIEW = re.compile(r"^(\d+)_(\d+)\.txt$")


def file_hashes(path: Path) -> tuple[str, str]:
    """(md5, sha256) hex digests of a file."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def fetch(url: str, dest: Path, md5: str, retries: int, timeout: float) -> Path:
    """Download `url` to `dest` (via `dest.part`) unless a copy with the right md5 is cached."""
    if dest.is_file() and file_hashes(dest)[0] == md5:
        print(f"using cached {dest}")
        return dest
    from tqdm import tqdm  # only needed when actually downloading

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2**attempt, 30))  # back off: transient server/network trouble
            print(f"retry {attempt}/{retries} after: {last_error}", file=sys.stderr)
        try:
            digest = hashlib.md5()
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc="download") as bar:
                    while chunk := resp.read(1 << 16):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except OSError as exc:  # URLError, timeouts and connection resets are OSErrors
            last_error = exc
            continue
        if digest.hexdigest() != md5:
            part.unlink(missing_ok=True)
            raise InputError(f"{url}: md5 mismatch: got {digest.hexdigest()}, expected {md5}")
        os.replace(part, dest)
        return dest
    part.unlink(missing_ok=True)
    raise OSError(f"{url}: download failed after {retries + 1} attempts: {last_error}")


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


def read_archive(archive: Path) -> dict[tuple[str, str], dict[int, tuple[int, bytes]]]:
    """Stream the archive; return {(split, class): {id: (rating, raw bytes)}} after checks."""
    found: dict[tuple[str, str], dict[int, tuple[int, bytes]]] = {
        (s, c): {} for s, classes in SPLITS.items() for c in classes
    }
    try:
        # gzip.GzipFile rather than tarfile's "r|gz": tarfile treats a cut-off gzip
        # stream as a normal end of archive, GzipFile raises EOFError instead.
        with open(archive, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            for member in tar:
                name = _safe_name(archive, member)
                m = _MEMBER.match(name)
                if not m or not member.isreg() or (m[1], m[2]) not in found:
                    continue  # README, vocab, bag-of-words features, url lists ...
                r = _REVIEW.match(m[3])
                if not r:
                    if m[3].endswith(".txt"):
                        raise InputError(f"{archive}: review file name not <id>_<rating>.txt: {name!r}")
                    continue
                rid, rating = int(r[1]), int(r[2])
                bucket = found[(m[1], m[2])]
                if rid in bucket:
                    raise InputError(f"{archive}: duplicate review id {rid} in {m[1]}/{m[2]}")
                f = tar.extractfile(member)
                assert f is not None  # regular file
                bucket[rid] = (rating, f.read())
            while gz.read(1 << 20):  # reach the gzip trailer so truncation and CRC errors surface
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


def _subset(ids: list[int], n: int | None) -> list[int]:
    ids = sorted(ids)
    return ids if n is None else ids[:n]


def build_frames(
    found: dict[tuple[str, str], dict[int, tuple[int, bytes]]], limit: int | None
) -> tuple[dict[str, pd.DataFrame], int]:
    """Decode texts into one DataFrame per output split; also count lossy decodes."""
    wanted = {
        ("train", "pos"): None if limit is None else limit // 2,
        ("train", "neg"): None if limit is None else limit - limit // 2,
        ("test", "pos"): None if limit is None else limit // 2,
        ("test", "neg"): None if limit is None else limit - limit // 2,
        ("train", "unsup"): limit,
    }
    rows: dict[str, list[tuple[int, str, int, int]]] = {"train": [], "test": [], "unsup": []}
    decode_errors = 0
    for (split, cls), n in wanted.items():
        out = "unsup" if cls == "unsup" else split
        bucket = found[(split, cls)]
        for rid in _subset(list(bucket), n):
            rating, raw = bucket[rid]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                decode_errors += 1
            rows[out].append((rid, text, LABELS[cls], 0 if cls == "unsup" else rating))
    frames = {}
    for out, r in rows.items():
        df = pd.DataFrame(r, columns=["id", "text", "label", "rating"])
        df = df.astype({"id": np.int64, "label": np.int8, "rating": np.int8})
        frames[out] = df.sort_values(["label", "id"], ascending=[False, True], ignore_index=True)
    return frames, decode_errors


def run(cfg: dict, root: Path, local_archive: str | None = None) -> dict:
    """Produce data/raw/*.parquet and data/raw/source.json (where the data came from: the archive,
    its hashes, the counts) under `root`; return what source.json holds."""
    if local_archive:
        archive = Path(local_archive)
        if not archive.is_file():
            raise FileNotFoundError(f"IMDB_ARCHIVE={local_archive}: no such file")
        source = str(archive)
    else:
        archive = fetch(
            cfg["url"], root / "data/download/aclImdb_v1.tar.gz", cfg["md5"], cfg["retries"], cfg["timeout"]
        )
        source = cfg["url"]
    t0 = time.perf_counter()
    found = read_archive(archive)
    frames, decode_errors = build_frames(found, cfg["limit"])
    md5, sha256 = file_hashes(archive)
    print(f"read {archive} in {time.perf_counter() - t0:.1f}s")

    counts = {}
    for name, df in frames.items():
        by_label = df["label"].value_counts()
        keys = {1: "pos", 0: "neg", -1: "unsup"}
        counts[name] = {"total": len(df), **{keys[k]: int(v) for k, v in sorted(by_label.items())}}
    metrics = {
        "source": source,
        "md5": md5,
        "sha256": sha256,
        "limit": cfg["limit"],
        "counts": counts,
        "decode_errors": decode_errors,
    }
    with Outputs(root) as out:
        for name, df in frames.items():
            out.write_parquet(f"data/raw/{name}.parquet", df)
        # Provenance, not a metric: kept out of `dvc exp show`'s columns, versioned with the data.
        out.write_json("data/raw/source.json", metrics)
    return metrics


def main() -> None:
    root = project_root()
    cfg = settings.load(root / "params.yaml")["data"]
    metrics = run(cfg, root, os.environ.get("IMDB_ARCHIVE") or None)
    print(f"counts: {metrics['counts']}, decode_errors: {metrics['decode_errors']}")


if __name__ == "__main__":
    run_stage(main)
