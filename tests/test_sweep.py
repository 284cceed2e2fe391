"""scripts/sweep.py: one canonical grid whatever the spelling, shares that cover it exactly once,
and the points already done or queued left alone (dvc itself is faked here; tests/test_team.py
runs it for real)."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scripts import sweep

GRID = ["train.lr=0.001,0.002", "train.hidden_size=64,128,256"]


def test_the_grid_is_the_cross_product_in_one_order_whatever_the_spelling():
    axes, fixed = sweep.parse_grid(GRID + ["train.epochs=3"])
    shuffled, fixed2 = sweep.parse_grid(["train.epochs=3", "train.hidden_size=256,64,128", "train.lr=0.002,0.001"])
    assert axes == shuffled and fixed == fixed2 == ["train.epochs=3"]
    assert sweep.fingerprint(axes, fixed) == sweep.fingerprint(shuffled, fixed2)
    assert sweep.points(axes) == [
        [f"train.hidden_size={h}", f"train.lr={lr}"] for h in (64, 128, 256) for lr in ("0.001", "0.002")]
    other, _ = sweep.parse_grid(["train.lr=0.001,0.003", GRID[1]])
    assert sweep.fingerprint(other, []) != sweep.fingerprint(axes, [])


def test_hydra_sweep_forms_and_files_are_read_as_dvc_reads_them():
    axes, fixed = sweep.parse_grid(["train.hidden_size=range(8,32,8)", "other.yaml:x=choice(b,a)",
                                    "train.cells=[rnn,lstm]"])
    assert [(a.key, a.values) for a in axes] == [("other.yaml:x", ("a", "b")),
                                                 ("train.hidden_size", ("8", "16", "24"))]
    assert fixed == ["train.cells=[rnn,lstm]"]


@pytest.mark.parametrize("specs, message", [
    (["train.lr=0.001"], "no sweep given"),
    (["train.lr=0.001,0.002", "train.lr=0.003,0.004"], "given twice"),
    (["train.lr=0.001,1e-3"], "the value 0.001 is given twice"),
    (["train.lr=0.1,0.2,0.1"], "the value 0.1 is given twice"),
    (["train.lr=glob(*)"], "fixed set of points"),
    (["train.lr=[0.1"], "-S 'train.lr=[0.1'"),
])
def test_bad_grids_are_one_line_errors(specs, message):
    with pytest.raises(sweep.SweepError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        sweep.parse_grid(specs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2", ""])
def test_bad_shares_are_refused(text):
    with pytest.raises(sweep.SweepError, match="--share"):
        sweep.parse_share(text)


@given(count=st.integers(0, 40), n=st.integers(1, 8))
def test_shares_cover_every_point_exactly_once(count, n):
    taken = [k for i in range(1, n + 1) for k in sweep.share_of(count, i, n)]
    assert sorted(taken) == list(range(1, count + 1))
    sizes = [len(sweep.share_of(count, i, n)) for i in range(1, n + 1)]
    assert max(sizes) - min(sizes) <= 1


def _fake_dvc(monkeypatch, done=(), remote_done=(), queue_lines=(), busy=False):
    """Replace dvc with canned answers; returns the list of `dvc exp run` argument lists."""
    calls = []

    def fake(args):
        if args[:2] == ["exp", "list"]:
            names = remote_done if len(args) == 4 else done
            return subprocess.CompletedProcess(args, 0, "\n".join(names) + "\n", "")
        if args[:2] == ["queue", "status"]:
            table = "Task     Name            Created    Status\n" + "\n".join(queue_lines)
            workers = f"Worker status: {1 if busy else 0} active, 0 idle"
            return subprocess.CompletedProcess(args, 0, f"{table}\n\n{workers}\n", "")
        if args[:3] == ["exp", "run", "--queue"]:
            calls.append(args)
            return subprocess.CompletedProcess(args, 0, "Queued\n", "")
        raise AssertionError(args)

    monkeypatch.setattr(sweep, "_dvc", fake)
    monkeypatch.setattr(sweep, "default_remote", lambda: "origin")
    return calls


def test_a_share_queues_its_points_by_name(monkeypatch, capsys):
    calls = _fake_dvc(monkeypatch)
    assert sweep.main(["--share", "2/4", "-S", GRID[0], "-S", GRID[1], "-S", "train.epochs=1", "-n", "lr"]) == 0
    # Points 2 and 6 of 6: (64, 0.002) and (256, 0.002).
    assert calls == [
        ["exp", "run", "--queue", "--name", "lr-2", "-S", "train.hidden_size=64", "-S", "train.lr=0.002",
         "-S", "train.epochs=1"],
        ["exp", "run", "--queue", "--name", "lr-6", "-S", "train.hidden_size=256", "-S", "train.lr=0.002",
         "-S", "train.epochs=1"],
    ]
    assert "share 2/4: points 2, 6 of 6" in capsys.readouterr().out


def test_points_done_here_or_on_the_remote_or_waiting_here_are_skipped(monkeypatch, capsys):
    fp = sweep.fingerprint(*sweep.parse_grid(GRID))
    queue = [f"abc1234  sweep-{fp}-5  02:00 PM   Queued", f"abc1235  sweep-{fp}-6  02:00 PM   Failed"]
    calls = _fake_dvc(monkeypatch, done=[f"sweep-{fp}-1"], remote_done=[f"sweep-{fp}-2"], queue_lines=queue)
    assert sweep.main(["-S", GRID[0], "-S", GRID[1]]) == 0
    assert [c[4] for c in calls] == [f"sweep-{fp}-{k}" for k in (3, 4, 6)]    # a failed point runs again
    out = capsys.readouterr().out
    assert out.count("(done, skipped)") == 2 and out.count("queued or running here, skipped") == 1


def test_a_point_running_when_the_machine_stopped_is_queued_again(monkeypatch, capsys):
    fp = sweep.fingerprint(*sweep.parse_grid(GRID))
    running = [f"abc1234  sweep-{fp}-1  02:00 PM   Running"]
    calls = _fake_dvc(monkeypatch, queue_lines=running, busy=False)
    assert sweep.main(["--share", "1/6", "-S", GRID[0], "-S", GRID[1]]) == 0
    assert [c[4] for c in calls] == [f"sweep-{fp}-1"]
    assert "stopped with the machine: queued again" in capsys.readouterr().out
    calls = _fake_dvc(monkeypatch, queue_lines=running, busy=True)    # really running: left alone
    assert sweep.main(["--share", "1/6", "-S", GRID[0], "-S", GRID[1]]) == 0
    assert calls == []


def test_dry_run_queues_nothing_and_errors_exit_2(monkeypatch, capsys):
    calls = _fake_dvc(monkeypatch)
    assert sweep.main(["--dry-run", "-S", GRID[0]]) == 0 and calls == []
    assert sweep.main(["--share", "3/2", "-S", GRID[0]]) == 2
    assert capsys.readouterr().err.startswith("error: --share '3/2'")
