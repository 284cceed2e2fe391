"""benchmarks/speed.py runs end to end on a tiny shape and reports every field (no timing checks)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
HAS_TORCH = importlib.util.find_spec("torch") is not None
KEYS = {"cell", "batch", "steps", "embed", "hidden", "threads", "numpy_train_step_s",
        "numpy_tokens_per_s", "numpy_infer_tokens_per_s", "torch_train_step_s",
        "torch_infer_tokens_per_s", "train_ratio", "infer_ratio", "peak_rss_mb", "flush",
        "train_gflop", "gemm_floor_train_s", "gemm_gflops", "numpy_train_vs_floor", "torch_train_vs_floor",
        "workers_peak_rss_mb", "cpu_vector_flags", "blas", "openblas_env", "load_average"}
TORCH_KEYS = {"torch_train_step_s", "torch_infer_tokens_per_s", "train_ratio", "infer_ratio"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--shape", "4x5x8x8", "--repeats", "1",
                           "--threads", "1", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("vs_torch", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed"))])
def test_json_lines_have_every_key(vs_torch):
    proc = run("--json", *(["--vs-torch"] if vs_torch else []))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["cell"] for r in rows] == ["rnn", "gru", "lstm"]
    for r in rows:
        assert KEYS <= set(r)
        assert (r["batch"], r["steps"], r["embed"], r["hidden"], r["threads"]) == (4, 5, 8, 8, 1)
        assert r["flush"] is True and r["numpy_train_step_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["numpy_tokens_per_s"] == pytest.approx(20 / r["numpy_train_step_s"])
        G = {"rnn": 1, "gru": 3, "lstm": 4}[r["cell"]]
        assert r["train_gflop"] == pytest.approx(6 * 5 * 4 * G * 8 * (8 + 8) / 1e9)  # 6 T B G H (E + H)
        assert r["gemm_floor_train_s"] > 0
        assert r["numpy_train_vs_floor"] == pytest.approx(r["numpy_train_step_s"] / r["gemm_floor_train_s"])
        for key in TORCH_KEYS:
            assert (r[key] is not None) == vs_torch, key


def test_table_with_random_lengths_and_no_flush():
    proc = run("--cells", "lstm", "--lengths", "random", "--no-flush",
               *(["--vs-torch"] if HAS_TORCH else []))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cpu: ") and lines[1].startswith("numpy BLAS: ")
    assert "flush=False" in lines[2] and lines[3].split()[0] == "cell"
    assert lines[4].split()[:2] == ["lstm", "4x5x8x8"] and lines[5].startswith("peak RSS: ")


WORKER_KEYS = {"workers", "numpy_workers_train_step_s", "numpy_workers_infer_tokens_per_s",
               "workers_train_speedup", "workers_infer_speedup"}


def test_quick_with_two_workers():
    """--quick --workers 2: NumPy in this process and on two worker processes (and torch, if any);
    JSON lines carry both sides and the speed-up, the table has one row per cell."""
    torch = ["--vs-torch"] if HAS_TORCH else []
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workers", "2", "--json", *torch],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["cell"] for r in rows] == ["rnn", "gru", "lstm"]
    for r in rows:
        assert KEYS | WORKER_KEYS <= set(r) and r["workers"] == 2 and r["batch"] == 4
        assert r["workers_train_speedup"] == pytest.approx(r["numpy_train_step_s"] / r["numpy_workers_train_step_s"])
        assert (r["train_ratio"] is not None) == HAS_TORCH
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workers", "2", "--cells", "lstm", *torch],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[2].startswith("workers=2") and lines[4].split()[:2] == ["cell", "BxTxExH"]
    assert lines[5].split()[:2] == ["lstm", "4x5x8x8"] and len(lines) == 7
    process_mb, worker_mb = (float(w) for w in lines[6].split() if w.isdigit())    # the peak RSS line
    assert lines[6].startswith("peak RSS: ") and process_mb > 0 and worker_mb > 0


def test_bad_shape_is_a_usage_error():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "4x5"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "BxTxExH" in proc.stderr


def test_profile_reports_every_part():
    """benchmarks/step_profile.py on a tiny shape: one line per part, the floor ratios last."""
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "step_profile.py"), "--shape", "4x5x8x8",
                           "--repeats", "1", "--cells", "lstm,gru"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.count("share of 2 rows on one core (2 workers)") == 2
    for part in ("worker: share_loss", "step calls (forward)", "step calls (backward)", "embedding gradient",
                 "worker: inference of the share", "main: add the shares", "main: Adam step",
                 "share_loss / floor", "inference / floor"):
        assert text.count(part) == 2, part


def test_lean_lstm_reports_every_part():
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "lean_lstm.py"), "--shape", "4x5x8x8",
                           "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for part in ("whole step", "input projection", "forward loop", "backward loop", "products after the loop",
                 "embedding gradient", "Adam step", "whole step / floor"):
        assert part in proc.stdout, part


def test_cpu_clock_is_for_one_thread_in_one_process():
    proc = run("--json", "--cells", "lstm", "--clock", "cpu")             # run() passes --threads 1
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["clock"] == "cpu" and row["numpy_train_step_s"] > 0
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workers", "2", "--clock", "cpu"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--clock cpu needs --threads 1" in proc.stderr
