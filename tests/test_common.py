"""stages/common.py: outputs published together or not at all, and errors in one line or with
their traceback."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from rnn.errors import InputError
from stages.common import Outputs, run_stage
from stages.settings import ParamsError


def test_outputs_appear_together_when_the_block_succeeds(tmp_path):
    with Outputs(tmp_path) as out:
        out.write_json("metrics/a.json", {"x": 1.5})
        out.write_metrics("metrics/b.json", {"x": 1.5})
        out.save_npz("data/b.npz", ids=np.arange(3))
        folder = out.path("models/lstm", folder=True)
        (folder / "weights.bin").write_bytes(b"w")
        assert not (tmp_path / "metrics/a.json").exists(), "visible before the block ended"
    assert json.loads((tmp_path / "metrics/a.json").read_text()) == {"x": 1.5}
    with_memory = json.loads((tmp_path / "metrics/b.json").read_text())
    assert with_memory.pop("peak_rss_mb") > 0 and with_memory == {"x": 1.5}     # a stage's peak RSS in MiB
    assert np.load(tmp_path / "data/b.npz")["ids"].tolist() == [0, 1, 2]
    assert (tmp_path / "models/lstm/weights.bin").read_bytes() == b"w"
    assert not [p for p in tmp_path.rglob(".*tmp-*")], "temporaries left behind"


def test_a_failure_keeps_every_old_output_and_leaves_no_temporary(tmp_path):
    with Outputs(tmp_path) as out:
        out.write_text("metrics/a.json", "old")
        (out.path("models/lstm", folder=True) / "weights.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with Outputs(tmp_path) as out:
            out.write_text("metrics/a.json", "new")
            (out.path("models/lstm", folder=True) / "weights.bin").write_bytes(b"new")
            raise RuntimeError("the plot could not be drawn")
    assert (tmp_path / "metrics/a.json").read_text() == "old"
    assert (tmp_path / "models/lstm/weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "lstm", "metrics", "models", "weights.bin"]


def test_a_write_error_names_the_output_not_the_temporary(tmp_path):
    def full_disk(f):
        raise OSError(errno.ENOSPC, "No space left on device", f.name)

    with pytest.raises(OSError) as info:
        with Outputs(tmp_path) as out:
            out.write("models/lstm/weights.npz", full_disk)
    assert str(info.value) == "[Errno 28] No space left on device: 'models/lstm/weights.npz'"
    assert not list(tmp_path.rglob("*.npz*"))


def test_non_finite_metrics_are_refused_not_written_as_invalid_json(tmp_path):
    with pytest.raises(ValueError):
        with Outputs(tmp_path) as out:
            out.write_json("metrics/a.json", {"loss": float("nan")})
    assert not (tmp_path / "metrics").exists() or not list((tmp_path / "metrics").iterdir())


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    def bad_params():
        raise ParamsError("params.yaml: train.lr = -1: must be > 0")

    def bad_file():
        raise InputError("models/lstm/weights.npz: not a readable .npz file\n(zip header)")

    def missing():
        raise FileNotFoundError("data/prepared/train.npz: not found (run the prepare stage first)")

    for main, line in ((bad_params, "params.yaml: train.lr = -1: must be > 0"),
                       (bad_file, "models/lstm/weights.npz: not a readable .npz file (zip header)"),
                       (missing, "data/prepared/train.npz: not found (run the prepare stage first)")):
        with pytest.raises(SystemExit) as exc:
            run_stage(main)
        assert exc.value.code == 2
        assert capsys.readouterr().err == f"error: {line}\n"

    def shape_bug():
        np.ones(3) + np.ones(4)

    with pytest.raises(ValueError, match="could not be broadcast"):
        run_stage(shape_bug)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_stage(interrupted)
    assert exc.value.code == 130
