"""Two DVC runs at once in one folder (issue 25): the second is refused at its check stage with the
first's params.yaml put back, and a stage whose params.yaml changed under its run stops without
publishing anything. Real `dvc exp run` processes on a three-stage project built from the project's
own run_stage, Outputs and runguard (the real pipeline is too slow to hold open)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc (Linux)")
DVC = [sys.executable, "-m", "dvc"]
# DVC starts the stages' `python` from PATH: this interpreter's must come first (make test does not activate it)
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("DVC_")},
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

PRELUDE = f"import sys, time\nfrom pathlib import Path\nsys.path.insert(0, {str(REPO)!r})\n" \
          "import yaml\nfrom stages import runguard\nfrom stages.common import Outputs, run_stage\n"
SCRIPTS = {
    "check.py": "run_stage(lambda: (runguard.claim(Path.cwd()), Path('checked').write_text('ok')))\n",
    "middle.py": "run_stage(lambda: Path('middle.txt').write_text('ok'))\n",
    # reads x, says it started, waits for `go`, then publishes what it read
    "slow.py": """
def main():
    x = yaml.safe_load(open('params.yaml'))['x']
    Path('started').write_text('1')
    while not Path('go').exists():
        time.sleep(0.05)
    with Outputs(Path.cwd()) as out:
        out.write_text('out.txt', f'{x}\\n')
run_stage(main)
""",
}
DVC_YAML = {"stages": {
    "check": {"cmd": "python check.py", "always_changed": True,
              "outs": [{"checked": {"cache": False, "persist": True}}]},
    "middle": {"cmd": "python middle.py", "deps": ["checked"], "outs": ["middle.txt"]},
    "slow": {"cmd": "python slow.py", "deps": ["middle.txt", "slow.py"], "params": ["x"], "outs": ["out.txt"]},
}}


def run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    args = DVC + args[1:] if args[0] == "dvc" else args
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, env=env or ENV)


# DVC runs a stage as `$SHELL -c <cmd>`: bash execs the command, dash stays between DVC and the stage
SHELLS = [shell for shell in ("/bin/sh", "/bin/bash") if Path(shell).exists()]


@pytest.fixture(params=SHELLS)
def project(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setitem(ENV, "SHELL", request.param)
    root = tmp_path / "p"
    root.mkdir()
    for name, body in SCRIPTS.items():
        (root / name).write_text(PRELUDE + body)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (root / "params.yaml").write_text("x: 1\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        assert run(cmd, root).returncode == 0
    return root


@pytest.fixture
def started(project: Path):
    """A `dvc exp run -S x=2` whose slow stage has read x and waits for the file `go`."""
    first = subprocess.Popen([*DVC, "exp", "run", "-S", "x=2"], cwd=project, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True, env=ENV)
    try:
        yield wait_started(first, project)
    finally:
        (project / "go").write_text("1")              # a failed assertion must not leave it waiting
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(first.pid, 9)


def wait_started(first: subprocess.Popen, root: Path) -> subprocess.Popen:
    deadline = time.monotonic() + 90
    while not (root / "started").exists():
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the first run's slow stage did not start"
        time.sleep(0.1)
    return first


def finish(first: subprocess.Popen, root: Path) -> tuple[int, str]:
    (root / "go").write_text("1")
    out, _ = first.communicate(timeout=120)
    return first.returncode, out


def test_a_second_exp_run_is_refused_and_the_first_keeps_its_settings(project, started):
    first = started
    second = run(["dvc", "exp", "run", "-S", "x=3"], project)
    assert second.returncode != 0
    assert "another DVC run uses this folder" in second.stdout + second.stderr
    assert "dvc exp run --queue" in second.stdout + second.stderr
    assert yaml.safe_load((project / "params.yaml").read_text()) == {"x": 2}
    code, out = finish(first, project)
    # The first run's stages finish on its own settings; DVC's one workspace slot for experiments was
    # taken over by the second `dvc exp run` (before any stage of it ran), so DVC no longer records the
    # first as an experiment on its own: `dvc exp save` does, from the workspace it left complete.
    assert (project / "out.txt").read_text() == "2\n", out
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["slow"]["params"]["params.yaml"]["x"] == 2
    status = run(["dvc", "status", "slow"], project)
    assert "changed" not in status.stdout, status.stdout
    if code != 0:
        saved = run(["dvc", "exp", "save", "-n", "first"], project)
        assert saved.returncode == 0, saved.stdout + saved.stderr
    shown = run(["dvc", "exp", "show", "--csv"], project).stdout.splitlines()
    rows = [dict(zip(shown[0].split(","), line.split(","))) for line in shown[1:]]
    assert [row["x"] for row in rows if row["typ"] != "baseline"] == ["2"], shown


def test_a_stage_whose_params_changed_under_its_run_publishes_nothing(project, started):
    first = started
    (project / "params.yaml").write_text("x: 5\n")         # an edit by hand while the run trains
    code, out = finish(first, project)
    assert code != 0
    assert "params.yaml changed while this DVC run was running" in out
    assert not (project / "out.txt").exists()
    assert not list(project.glob(".out.txt.tmp-*"))


def test_outside_dvc_the_guard_does_nothing(project):
    (project / "go").write_text("1")
    done = run([sys.executable, "slow.py"], project)
    assert done.returncode == 0, done.stderr
    assert (project / "out.txt").read_text() == "1\n"


def test_a_dead_run_record_does_not_block_the_next_run(project):
    runs = project / ".dvc/tmp/runs"
    runs.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (runs / f"{dead.pid}.yaml").write_text("x: 9\n")
    (project / "go").write_text("1")
    done = run(["dvc", "exp", "run", "-S", "x=4"], project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (project / "out.txt").read_text() == "4\n"
    assert not (runs / f"{dead.pid}.yaml").exists()
