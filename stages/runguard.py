"""One DVC run at a time in one folder: a second `dvc exp run` or `dvc repro` started while one is
running is refused, and no stage runs on settings its run did not start with.

`dvc exp run -S` writes its values into params.yaml before DVC takes any lock, so a second one,
started while a first is training, would change the settings under the first's later stages (and
DVC would record in dvc.lock values the outputs were not made with). The check stage, which every
run starts with, records params.yaml as its run found it in .dvc/tmp/runs/<pid of the dvc process>;
a second run's check finds the first one alive, puts params.yaml back as the first one read it and
stops in one line. Every later stage, and every commit of a stage's outputs, compares params.yaml
with its own run's record. (DVC has one slot for an experiment in the workspace, which the second
`dvc exp run` takes before any stage runs: the first then finishes its stages on its own settings
but may end with "Failed to reproduce experiment"; `dvc exp save` records it from the workspace.)
Outside DVC (no DVC_STAGE, e.g. `python -m stages.train lstm 0`), and for the liveness test off Linux
(no /proc), there is nothing to compare with: the guard does nothing.
Queued experiments run in their own copies of the project, side by side without conflict.
"""

from __future__ import annotations

import os
from pathlib import Path

from rnn.errors import InputError

RUNS = Path(".dvc/tmp/runs")
QUEUE_HINT = "run several experiments with `dvc exp run --queue -S ...` and then `dvc queue start`"


def dvc_pid() -> int | None:
    """The DVC process running this stage (DVC sets DVC_STAGE), or None outside DVC. DVC starts a
    stage as `$SHELL -c <cmd>`: bash replaces itself with a lone command, dash (Debian's /bin/sh, used
    when SHELL is unset) stays as the stage's parent, so the DVC process may be one level further up."""
    if not os.environ.get("DVC_STAGE"):
        return None
    pid = os.getppid()
    for _ in range(3):
        if _alive(pid):
            return pid
        pid = _parent(pid)
    return os.getppid()        # no /proc (not Linux): the parent, as bash leaves it


def _parent(pid: int) -> int:
    try:        # the field after the parenthesised command name, which may itself hold spaces
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    """A DVC process with this PID is running."""
    try:
        return b"dvc" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def claim(root: Path) -> None:
    """At the check stage: refuse to start while another DVC run uses this folder (put its params.yaml
    back first), else record params.yaml for this run's later stages."""
    pid = dvc_pid()
    if pid is None:
        return
    runs, params = root / RUNS, root / "params.yaml"
    runs.mkdir(parents=True, exist_ok=True)
    for record in sorted(runs.glob("*.yaml")):
        other = int(record.stem) if record.stem.isdigit() else -1
        if other == pid:
            continue
        if not _alive(other):
            record.unlink(missing_ok=True)        # a run that ended (or was killed) before cleaning up
            continue
        theirs = record.read_bytes()        # bytes throughout: verify() compares bytes
        undone = ""
        if params.read_bytes() != theirs:
            params.write_bytes(theirs)
            undone = ": params.yaml is put back as it read it"
        raise InputError(f"params.yaml: another DVC run uses this folder (PID {other}){undone}"
                         f"; {QUEUE_HINT}, or wait (if it then ends 'Failed to reproduce experiment', `dvc exp "
                         "save` keeps its results)")
    tmp = runs / f".{pid}.tmp"
    tmp.write_bytes(params.read_bytes())
    os.replace(tmp, runs / f"{pid}.yaml")


def verify(root: Path | None = None) -> None:
    """Before a stage and before it publishes its outputs: params.yaml in `root` (default: the working
    directory, where DVC runs the stages) is still what this run's check stage read (nothing to
    compare with outside DVC or when check did not run in this run)."""
    pid, root = dvc_pid(), Path.cwd() if root is None else root
    if pid is None or os.environ.get("DVC_STAGE") == "check":
        return
    try:
        started = (root / RUNS / f"{pid}.yaml").read_bytes()
    except OSError:
        return
    if (root / "params.yaml").read_bytes() != started:
        raise InputError(f"params.yaml changed while this DVC run was running (PID {pid}; another `dvc exp "
                         f"run -S` or an edit): stage {os.environ['DVC_STAGE']} stops and writes no "
                         f"output; {QUEUE_HINT}")
