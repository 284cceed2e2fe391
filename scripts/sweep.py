"""Queue one machine's share of a parameter sweep: `dvc exp run --queue`, one point at a time.

    python scripts/sweep.py --share 1/2 -S 'train.lr=0.001,0.002' -S 'train.hidden_size=64,128'
    dvc queue start -j 1        # then: dvc exp push origin

`-S` takes what `dvc exp run --queue -S` takes (Hydra's override syntax: `key=a,b,c`,
`key=range(8,64,8)`, `key=choice(a,b)`, a single `key=value` for every point, `file.yaml:key=...`).
The grid is the cross product of the sweeps, put in one canonical order whatever order the
options and values were written in: keys sorted by name, each key's values sorted (numbers by
value). Point k of N (from 1) is queued as experiment `<name>-k`, and share i/n is the points with
k = i, i+n, i+2n, ..., so n machines given the same grid and shares 1/n ... n/n queue every point
exactly once. Every machine prints the grid's fingerprint: equal fingerprints, same grid.

Points whose experiment already exists for the current commit, here or on the git remote
(`--remote`, default origin when there is one), are skipped: rerunning a share after a crash, or
on another machine in place of a lost one, queues only what is missing. Nothing but `dvc` runs
the experiments; this only decides which ones to queue.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass

DVC = [sys.executable, "-m", "dvc"]
PARAMS_FILE = "params.yaml"


class SweepError(ValueError):
    """A grid or share that cannot be queued; the message is one line."""


@dataclass(frozen=True)
class Axis:
    key: str                  # as written before `=`, with any `file:` or `+` prefix
    values: tuple[str, ...]   # override strings, as `-S key=value` takes them


def parse_grid(specs: list[str]) -> tuple[list[Axis], list[str]]:
    """`-S` strings -> (sweep axes in canonical order, fixed overrides for every point)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    axes: list[Axis] = []
    fixed: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        path, override = _split_file(spec)
        try:
            (parsed,) = parser.parse_overrides([override])
        except HydraException as exc:
            raise SweepError(f"-S {spec!r}: {' '.join(str(exc).split())}") from None
        key = f"{path}:{parsed.get_key_element()}" if path else parsed.get_key_element()
        name = f"{path or PARAMS_FILE}:{parsed.key_or_group}"
        if name in seen:
            raise SweepError(f"-S {spec!r}: {parsed.key_or_group} is given twice")
        seen.add(name)
        if not parsed.is_sweep_override():
            fixed.append(spec)
            continue
        if parsed.value_type in (ValueType.GLOB_CHOICE_SWEEP, ValueType.INTERVAL_SWEEP):
            raise SweepError(f"-S {spec!r}: only lists, choice() and range() sweeps have a fixed set of points")
        values = sorted(parsed.sweep_string_iterator(), key=_value_order)
        for a, b in zip(values, values[1:]):
            if _value_order(a) == _value_order(b):
                same = f"the value {a} is given twice" if a == b else f"{a} and {b} are the same value"
                raise SweepError(f"-S {spec!r}: {same}")
        if not values:
            raise SweepError(f"-S {spec!r}: no values")
        axes.append(Axis(key, tuple(values)))
    if not axes:
        raise SweepError("no sweep given: at least one -S key=a,b,... with two or more values")
    axes.sort(key=lambda a: a.key.lstrip("+~"))
    return axes, fixed


def _split_file(spec: str) -> tuple[str | None, str]:
    """`params2.yaml:train.lr=...` -> ("params2.yaml", "train.lr=..."), as `dvc exp run -S` reads it."""
    if ":" in spec.partition("=")[0]:
        path, _, override = spec.partition(":")
        return path, override
    return None, spec


def _value_order(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def fingerprint(axes: list[Axis], fixed: list[str]) -> str:
    text = json.dumps([[a.key, list(a.values)] for a in axes] + [sorted(fixed)])
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def points(axes: list[Axis]) -> list[list[str]]:
    """Every point of the grid in canonical order: a list of `key=value` overrides each."""
    return [[f"{a.key}={v}" for a, v in zip(axes, combo)]
            for combo in itertools.product(*(a.values for a in axes))]


def parse_share(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 1 <= i <= n."""
    left, sep, right = text.partition("/")
    try:
        i, n = int(left), int(right)
    except ValueError:
        i = n = 0
    if not sep or not 1 <= i <= n:
        raise SweepError(f"--share {text!r}: expected i/n with 1 <= i <= n, e.g. 1/2")
    return i, n


def share_of(count: int, i: int, n: int) -> list[int]:
    """1-based indices of the points share i/n runs: i, i+n, i+2n, ... (shares differ in size by at
    most one)."""
    return list(range(i, count + 1, n))


def _dvc(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(DVC + args, capture_output=True, text=True)


def existing_experiments(remote: str | None) -> set[str]:
    """Names of the experiments of the current commit, here and on the git remote `remote`."""
    names: set[str] = set()
    for where in [[]] + ([[remote]] if remote else []):
        out = _dvc(["exp", "list", *where, "--name-only"])
        if out.returncode != 0:
            place = f"git remote {remote!r}" if where else "this repository"
            raise SweepError(f"dvc exp list {' '.join(where)}: cannot list the experiments of {place}: "
                             f"{' '.join(out.stderr.split())[-300:]}")
        names.update(line.strip() for line in out.stdout.splitlines() if line.strip())
    return names


def local_queue() -> tuple[dict[str, set[str]], bool]:
    """({experiment name: its entries' states (Queued, Running, Success, Failed)} from `dvc queue
    status`, whether a worker is busy). Running with no busy worker is left over from a crash."""
    out = _dvc(["queue", "status"])
    if out.returncode != 0:
        raise SweepError(f"dvc queue status failed: {' '.join(out.stderr.split())[-300:]}")
    rows, busy = {}, False
    for line in out.stdout.splitlines():
        words = line.split()
        if len(words) >= 3 and words[-1] in ("Queued", "Running", "Success", "Failed"):
            rows.setdefault(words[1], set()).add(words[-1])
        elif line.startswith("Worker status:"):
            busy = not line.startswith("Worker status: 0 active")
    return rows, busy


def default_remote() -> str | None:
    out = subprocess.run(["git", "remote"], capture_output=True, text=True)
    return "origin" if out.returncode == 0 and "origin" in out.stdout.split() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/sweep.py",
        description="Queue this machine's share of a sweep with `dvc exp run --queue`; run it with "
                    "`dvc queue start -j N`.")
    parser.add_argument("-S", "--set-param", dest="specs", action="append", required=True,
                        metavar="[FILE:]KEY=VALUES", help="a sweep (`train.lr=0.001,0.002`) or a fixed value")
    parser.add_argument("--share", default="1/1", help="i/n: queue the i-th of n shares (default 1/1: all)")
    parser.add_argument("-n", "--name", help="experiment names are NAME-k (default sweep-<fingerprint>)")
    parser.add_argument("--remote", help="git remote whose experiments count as done (default origin, if any)")
    parser.add_argument("--no-remote", action="store_true", help="do not look at any git remote")
    parser.add_argument("--dry-run", action="store_true", help="print the share, queue nothing")
    parser.add_argument("extra", nargs="*", metavar="-- DVC_EXP_RUN_ARGS",
                        help="passed on to every `dvc exp run --queue`, after `--`")
    args = parser.parse_args(argv)
    try:
        axes, fixed = parse_grid(args.specs)
        i, n = parse_share(args.share)
        grid = points(axes)
        prefix = args.name or f"sweep-{fingerprint(axes, fixed)}"
        mine = share_of(len(grid), i, n)
        print(f"grid {fingerprint(axes, fixed)}: {len(grid)} points = "
              + " x ".join(f"{a.key} ({len(a.values)})" for a in axes)
              + (f", fixed: {' '.join(fixed)}" if fixed else ""))
        print(f"share {i}/{n}: points {', '.join(map(str, mine)) or 'none'} of {len(grid)}")
        remote = None if args.no_remote else (args.remote or default_remote())
        done = existing_experiments(remote)
        queue, busy = local_queue()
        queued = 0
        for k in mine:
            name = f"{prefix}-{k}"
            overrides = " ".join(grid[k - 1] + fixed)
            states = queue.get(name, set())
            if name in done:
                print(f"  {name}: {overrides}  (done, skipped)")
                continue
            if "Queued" in states or ("Running" in states and busy):
                print(f"  {name}: {overrides}  (queued or running here, skipped)")
                continue
            note = "  (its run here stopped with the machine: queued again)" if "Running" in states else ""
            print(f"  {name}: {overrides}{note}", flush=True)
            if args.dry_run:
                continue
            cmd = ["exp", "run", "--queue", "--name", name]
            for o in grid[k - 1] + fixed:
                cmd += ["-S", o]
            out = _dvc(cmd + args.extra)
            if out.returncode != 0:
                raise SweepError(f"dvc {' '.join(cmd)} failed ({out.returncode}): "
                                 f"{' '.join((out.stderr or out.stdout).split())[-400:]}")
            queued += 1
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run:
        print(f"queued {queued} experiment(s); run them with `dvc queue start -j <jobs>`, "
              f"then `dvc exp push {remote or '<git remote>'}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
