"""Stage `download`: fetch (or take a local copy of) the IMDB archive and turn it into parquet.

    python -m stages.download

Reads the archive data/source.json names (the check stage writes it): the
local copy named by env var IMDB_ARCHIVE, which must be the one the check stage hashed, or else the
official download (md5-checked). The archive is streamed, never extracted (rnn/imdb.py), and nothing
is written until every split has been read and checked.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from rnn.errors import InputError
from rnn.imdb import read_archive, reviews
from stages import settings
from stages.common import Outputs, project_root, run_stage
from stages.outputs import DOWNLOADED, SOURCE, file_digest, read_source


def fetch(url: str, dest: Path, md5: str, retries: int, timeout: float) -> Path:
    """Download `url` to `dest` (via `dest.part`) unless a copy with the right md5 is cached."""
    if dest.is_file() and file_digest(dest, "md5") == md5:
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


def build_frames(found: dict, limit: int | None) -> tuple[dict[str, pd.DataFrame], int]:
    """One DataFrame per output split (rnn.imdb.reviews), positives first, then by id; and the count
    of lossy decodes."""
    rows, decode_errors = reviews(found, limit)
    frames = {}
    for out, r in rows.items():
        df = pd.DataFrame(r, columns=["id", "text", "label", "rating"])
        df = df.astype({"id": np.int64, "label": np.int8, "rating": np.int8})
        frames[out] = df.sort_values(["label", "id"], ascending=[False, True], ignore_index=True)
    return frames, decode_errors


def run(cfg: dict, root: Path, local_archive: str | None = None, source: dict | None = None) -> dict:
    """Produce data/raw/*.parquet and data/raw/source.json (where the data came from: the archive,
    its hashes, the counts) under `root`; return what source.json holds.

    source: data/source.json's content (the check stage's); when given, the archive must be the one
    it names."""
    if local_archive:
        archive = Path(local_archive)
        if not archive.is_file():
            raise FileNotFoundError(f"IMDB_ARCHIVE={local_archive}: no such file")
        origin = str(archive)
    else:
        archive = fetch(cfg["url"], root / DOWNLOADED, cfg["md5"], cfg["retries"], cfg["timeout"])
        origin = cfg["url"]
    t0 = time.perf_counter()
    md5, sha256 = file_digest(archive, "md5"), file_digest(archive)
    if source is not None and (why := source_mismatch(source, local_archive, sha256)):
        raise InputError(f"{why}: the archive changed after the check stage ran; run `dvc repro` again")
    found = read_archive(archive)
    frames, decode_errors = build_frames(found, cfg["limit"])
    print(f"read {archive} in {time.perf_counter() - t0:.1f}s")

    counts = {}
    for name, df in frames.items():
        by_label = df["label"].value_counts()
        keys = {1: "pos", 0: "neg", -1: "unsup"}
        counts[name] = {"total": len(df), **{keys[k]: int(v) for k, v in sorted(by_label.items())}}
    metrics = {"source": origin, "md5": md5, "sha256": sha256, "limit": cfg["limit"], "counts": counts,
               "decode_errors": decode_errors}
    with Outputs(root) as out:
        for name, df in frames.items():
            out.write(f"data/raw/{name}.parquet", lambda f: df.to_parquet(f, index=False))
        # Provenance, not a metric: kept out of `dvc exp show`'s columns, versioned with the data.
        out.write_json("data/raw/source.json", metrics)
    return metrics


def main() -> None:
    root = project_root()
    cfg = settings.load(root / "params.yaml")["data"]
    source = read_source(root)
    local = os.environ.get("IMDB_ARCHIVE") or None
    if why := source_mismatch(source, local):
        raise InputError(f"{why}; run `dvc repro` (or python -m stages.check) again")
    if "url" in source:                  # the download the check stage validated
        cfg = {**cfg, "url": source["url"], "md5": source["md5"]}
    metrics = run(cfg, root, local, source)
    print(f"counts: {metrics['counts']}, decode_errors: {metrics['decode_errors']}")


if __name__ == "__main__":
    run_stage(main)
