"""Shared glue for the stages: bad input reported in one line (`run_stage(main)`), outputs that appear
whole and together (`with Outputs(root) as out: out.write_json(...)`), the stage's peak memory."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rnn.errors import MAX_MESSAGE_CHARS, InputError, WorkerDied, shorten
from stages import runguard


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(). Bad input (InputError, which ParamsError is, and OSError: a missing file,
    a full disk) exits 2 with one `error:` line, a killed worker process (WorkerDied) 1; anything else
    is a bug and keeps its traceback."""
    try:
        runguard.verify()
        main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (InputError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except WorkerDied as exc:           # SIGKILL is most often the kernel's out-of-memory killer
        print(f"error: {one_line(exc)} (out of memory? see `dmesg`); rerun the stage", file=sys.stderr)
        sys.exit(1)


def one_line(exc: BaseException, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The exception's message on one line, at most `limit` characters (of a quoted bad value too)."""
    return shorten(exc, limit) or type(exc).__name__


def peak_rss_mb() -> float:
    """Peak resident memory so far in MiB: this process's (RUSAGE_SELF) plus that of the largest of its
    ended child processes (RUSAGE_CHILDREN: the training and inference workers, once closed)."""
    kib = sum(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(kib / (1024 if sys.platform != "darwin" else 1024 ** 2), 1)   # Linux: KiB, macOS: bytes


def project_root() -> Path:
    """The nearest directory upward from cwd holding params.yaml: where a stage reads and writes. Not
    `DVC_ROOT`: a queued experiment runs in a copy under .dvc/tmp/exps/ while DVC_ROOT names the
    original; only what must outlive the copy (the MLflow store) belongs there."""
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "params.yaml").is_file():
            return d
    raise FileNotFoundError(f"params.yaml not found in {cwd} or any parent directory")


class Outputs:
    """A stage's outputs, written under temporary names and published together when the block ends
    without an exception; on an exception the temporaries go and the old outputs stay. Each file is
    synced before the renames, so a crash or a full disk never leaves a half-written one. An OSError
    names the output, not the temporary ("No space left on device: 'models/lstm/weights.npz'")."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.pending: list[tuple[Path, Path]] = []      # (temporary, final)

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Publish every output, or on an exception (or a params.yaml changed under this DVC run:
        runguard) remove every temporary."""
        refused = None
        if exc_type is None:
            try:
                runguard.verify(self.root)
            except InputError as changed:
                exc_type = refused = changed
        renamed = self._final_name(exc) if isinstance(exc, OSError) else None
        for tmp, final in self.pending:
            if exc_type is None:
                self._remove(final)
                os.replace(tmp, final)
            else:
                self._remove(tmp)
        self.pending.clear()
        if renamed is not None:
            raise OSError(exc.errno, exc.strerror, renamed) from None
        if refused is not None:
            raise refused

    def _final_name(self, exc: OSError) -> str | None:
        """models/.lstm.tmp-42/weights.npz -> models/lstm/weights.npz"""
        name = str(exc.filename or "")
        for tmp, final in self.pending:
            if name == str(tmp) or name.startswith(f"{tmp}/"):
                return str(final.relative_to(self.root)) + name[len(str(tmp)):]
        return None

    def path(self, rel: str | Path, folder: bool = False) -> Path:
        """A temporary path to write the output `rel` (relative to the root) to; a folder if asked."""
        final = self.root / rel
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            self._remove(tmp)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            if folder:
                tmp.mkdir()
        except OSError as exc:                 # a read-only folder: name the output, not the temporary
            raise OSError(exc.errno, exc.strerror, str(rel)) from None
        self.pending.append((tmp, final))
        return tmp

    def write(self, rel: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
        tmp = self.path(rel)
        try:
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(rel)) from None

    def write_text(self, rel: str | Path, text: str) -> None:
        self.write(rel, lambda f: f.write(text), "w")

    def write_json(self, rel: str | Path, obj: object) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, allow_nan=False) + "\n")

    def write_metrics(self, rel: str | Path, metrics: dict) -> None:
        """A stage's metrics JSON, with the stage's peak memory so far added as `peak_rss_mb`."""
        self.write_json(rel, {**metrics, "peak_rss_mb": peak_rss_mb()})

    def save_npz(self, rel: str | Path, **arrays: np.ndarray) -> None:
        self.write(rel, lambda f: np.savez_compressed(f, **arrays))

    def save_figure(self, rel: str | Path, fig: Any) -> None:
        self.write(rel, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
