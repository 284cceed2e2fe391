"""Stage `check`: what can go wrong, checked cheaply before DVC touches any output.

    python -m stages.check

DVC removes a stage's outputs just before running it, so a stage that fails on a typo has already
lost its old outputs (a trained model). This stage runs first on every `dvc repro` (always_changed;
every other stage depends on one of its outputs) and stops the run, in one line, on: params.yaml
(settings.load), more train.workers than WORKERS_PER_CORE times the cores; the archive (IMDB_ARCHIVE's
content as the download stage reads it, once per content; else data.url answers); embed.path when
embed.method is pretrained; the MLflow store when mlflow.enabled. The error also names the values in
which params.yaml differs from the committed one (`dvc exp run -S` leaves them there) and how to undo.

Writes what later stages read of the outside world: data/source.json (the archive by content, or the
URL and md5), data/vectors.json (embed.path's file by content), data/lm/<cell>.json (the shape of each
cell's language model) and data/checked (constant: the stages that read no data depend on it).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from rnn import imdb
from rnn.errors import InputError
from stages import runguard, settings
from stages.common import Outputs, project_root, run_stage
from stages.outputs import (DOWNLOADED, LM_SHAPES, SOURCE, VECTORS, describe_vectors, file_digest, lm_shape,
                            pretrained_vectors, read_source)

CHECKED = "data/checked"
PROBE_TIMEOUT_S = 10.0
# Archives (by sha256 and the limits they passed) already read in full: not the stage's output, a cache.
MEMO = "data/download/checked_archives.json"
# More worker processes than cores only slow training down (each runs its share of every batch on one
# core); a few times the cores still allows for a machine whose core count is misreported.
WORKERS_PER_CORE = 4


def main() -> None:
    root = project_root()
    runguard.claim(root)
    try:
        check(root)
    except InputError as exc:
        changed = settings.uncommitted_changes(root)
        if changed:
            raise InputError(f"{' '.join(str(exc).split())}; {changed}") from None
        raise


def check(root: Path) -> None:
    params = settings.load(root / "params.yaml")
    check_workers(params)
    if (root / "dvc.yaml").is_file():
        check_dvc_params(settings.read_yaml(root / "params.yaml"), params["train"]["cells"])
    data = params["data"]
    local = os.environ.get("IMDB_ARCHIVE") or None
    source = {"url": data["url"], "md5": data["md5"]}
    if local:
        source = describe_archive(root, local)
    elif not (root / DOWNLOADED).is_file():
        try:
            check_reachable(data["url"], min(data["timeout"], PROBE_TIMEOUT_S))
        except InputError as unreachable:
            try:
                source = read_source(root)      # committed: the data comes from the DVC remote
            except (OSError, InputError):
                raise unreachable from None
            # A clone of a team's project (README, "Working as a team"): the download stage reruns only
            # if something it reads changed, and then fails on the missing archive.
            print(f"check: no archive here and data.url unreachable; keeping {SOURCE} (the data "
                  "comes from the DVC remote: dvc pull)")
    vectors = describe_vectors(pretrained_vectors(root, params["embed"]))
    if params["mlflow"]["enabled"]:
        from stages.mlstore import check_store     # not a dependency: see dvc.yaml

        check_store()
    with Outputs(root) as out:
        out.write_json(SOURCE, source)
        out.write_json(VECTORS, vectors)
        folder = out.path(LM_SHAPES, folder=True)
        for cell in params["train"]["cells"]:
            (folder / f"{cell}.json").write_text(json.dumps(lm_shape(params, cell), indent=2) + "\n", encoding="utf-8")
        out.write_text(CHECKED, "params.yaml and the environment passed stages/check.py\n")
    print(f"check: params.yaml valid; source {json.dumps(source)}")


def check_workers(params: dict) -> None:
    """More train.workers than the machine can use: each worker is a process that computes on one core."""
    workers, cores = params["train"]["workers"], os.cpu_count() or 1
    if workers != "auto" and workers > WORKERS_PER_CORE * cores:
        raise InputError(f"params.yaml: train.workers = {workers}: more than {WORKERS_PER_CORE} x the {cores} "
                         "cores of this machine (each worker is a process that computes on one core: more "
                         "than the cores only slows training down); use auto")


def check_dvc_params(raw: dict, cells: list[str]) -> None:
    """dvc.yaml's train@<cell> reads the key train.overrides.<cell>: DVC refuses to run it when the key
    is missing (the schema's default does not count), but only once the stages before it have run."""
    overrides = (raw.get("train") or {}).get("overrides") or {}
    for cell in cells:
        if cell not in overrides:
            raise InputError(f"params.yaml: train.overrides.{cell} is missing: dvc.yaml's train@{cell} "
                             f"reads it (write `{cell}: {{}}` under train.overrides)")


def check_reachable(url: str, timeout: float) -> None:
    """Something answers at `url` (a HEAD request): the download stage is going to need it."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise InputError(f"params.yaml: data.url = {url!r}: HTTP {exc.code} {exc.reason}") from None
    except OSError as exc:                       # URLError, refused, timed out
        raise InputError(f"params.yaml: data.url = {url!r} is unreachable ({getattr(exc, 'reason', exc)}) and "
                         f"{DOWNLOADED} does not exist: go online, or name a local copy of the "
                         "archive with IMDB_ARCHIVE (make pipeline does when ../shared/data has one)") from None


def describe_archive(root: Path, local: str) -> dict:
    """{"archive": {sha256, size}} of the gzip file IMDB_ARCHIVE names, once read as the download stage
    will (no text kept) unless this content already passed: the same archive anywhere, the same source."""
    path = Path(local)
    imdb.check_gzip_file(path, f"IMDB_ARCHIVE={local}")
    source = {"archive": {"sha256": (sha256 := file_digest(path)), "size": path.stat().st_size}}
    key = f"{sha256}:{imdb.MAX_REVIEW_BYTES}:{imdb.MAX_UNPACKED_BYTES}"
    memo = root / MEMO
    try:
        seen = json.loads(memo.read_text(encoding="utf-8")) if memo.is_file() else []
    except ValueError:
        seen = []                          # a damaged cache is only a cache
    if key not in seen:
        imdb.read_archive(path, keep=False)
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps([*seen, key][-20:]), encoding="utf-8")
    return source


if __name__ == "__main__":
    run_stage(main)
