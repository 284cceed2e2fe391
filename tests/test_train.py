"""The training loop: learning a toy task, early stopping, divergence, Adam's global step,
reproducibility, and checkpoints that resume to exactly the uninterrupted result, also after the
process was killed (SIGKILL) or stopped (SIGTERM, SIGINT) in the middle of an epoch, with one
process or with two worker processes (which must not outlive it nor leave shared memory behind)."""
from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_no_shared_memory, assert_processes_gone, make_model
from rnn.data import batches
from rnn.io import load_arrays
from rnn.losses import bce_with_logits
from rnn.model import ModelConfig, SentimentModel
from rnn.optim import Adam
from rnn.train import CHECKPOINT, Dataset, EpochSums, TrainConfig, TrainingDiverged, TrainState, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "val_seconds", "tokens_per_s")


def toy_data(n: int, seed: int, T: int = 10, V: int = 16, max_len: int = 8) -> Dataset:
    """Sequences of filler tokens (4..V-1) with one cue, token 2 (label 1) or 3 (label 0), at a
    random real position; padded with 0 to T > max_len, so the longest distances have no data."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, max_len + 1, n)
    labels = rng.integers(0, 2, n)
    ids = rng.integers(4, V, (n, T))
    ids[np.arange(n), rng.integers(0, lengths)] = np.where(labels == 1, 2, 3)
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return Dataset(ids.astype(np.int32), lengths, labels.astype(np.int8))


toy_model = partial(make_model, vocab_size=16, embed_dim=8, hidden_size=8, dtype="float32")


def metrics(result: dict) -> dict:
    """A fit result without its timing fields."""
    return {**result, "history": [{k: v for k, v in h.items() if k not in TIMING}
                                  for h in result["history"]]}


class Recorder:
    """Callback keeping every step's info and a copy of the parameters after every epoch."""

    def __init__(self, model):
        self.model, self.steps, self.epochs, self.params = model, [], [], []

    def on_step(self, info):
        self.steps.append(info)

    def on_epoch(self, info):
        self.epochs.append(info)
        self.params.append({k: v.copy() for k, v in self.model.params.items()})


TRAIN, VAL = toy_data(256, 1), toy_data(128, 2)


@pytest.mark.parametrize("cell,reset_after", [("rnn", False), ("gru", False), ("gru", True),
                                              ("lstm", False)], ids=["rnn", "gru", "gru_after", "lstm"])
def test_fit_learns_a_toy_task(cell, reset_after):
    model = toy_model(cell, reset_after)
    assert evaluate(model, VAL)["accuracy"] < 0.75
    result = fit(model, Adam(0.03), TRAIN, VAL, TrainConfig(epochs=4, batch_size=16, patience=0),
                 np.random.default_rng(0))
    assert result["best_val_accuracy"] >= 0.95
    assert evaluate(model, VAL)["accuracy"] == result["best_val_accuracy"]
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4]
    assert result["steps"] == 4 * 16 and result["history"][-1]["step"] == 64
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]


def test_callbacks_and_trace_record():
    model = toy_model("lstm")
    rec = Recorder(model)
    result = fit(model, Adam(0.01), TRAIN, VAL, TrainConfig(epochs=1, batch_size=32, trace_every=1),
                 np.random.default_rng(0), callbacks=[rec])
    assert [s["step"] for s in rec.steps] == list(range(1, 9))
    assert [s["batch"] for s in rec.steps] == list(range(1, 9)) and rec.steps[0]["batches"] == 8
    assert sum(s["tokens"] for s in rec.steps) == TRAIN.lengths.sum()
    for s in rec.steps:
        assert s["grad_norm"] == pytest.approx(np.sqrt(sum(v * v for v in s["group_norms"].values())))
        assert s["grad_norm_clipped"] == pytest.approx(min(s["grad_norm"], 5.0), rel=1e-6)
    record = rec.epochs[0]
    assert set(record) >= {"epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                           "seconds", "val_seconds", "tokens_per_s", "grad_norm_mean", "grad_norm_max",
                           "clipped_fraction", "trace"}
    assert record["train_loss"] == pytest.approx(np.mean([s["loss"] for s in rec.steps]))
    assert record["val_loss"] == pytest.approx(evaluate(model, VAL)["loss"])
    trace = result["traces"][0]
    assert set(trace) == {"a", "c"} and len(trace["a"]) == TRAIN.ids.shape[1]
    assert all(v is not None and v > 0 for v in trace["a"][:8]) and trace["a"][8:] == [None, None]


def test_evaluate():
    model = toy_model("gru")
    logits = model.forward(VAL.ids, VAL.lengths)[0]
    got = evaluate(model, VAL, batch_size=7)
    assert got["loss"] == pytest.approx(bce_with_logits(logits.astype(np.float64), VAL.labels)[0], rel=1e-6)
    assert got["accuracy"] == np.mean((logits > 0) == (VAL.labels == 1))


@pytest.mark.parametrize("n,batch_size", [(5, 1), (9, 4)])
def test_batches_of_one(n, batch_size):
    data = toy_data(n, 3)
    model = toy_model("gru", reset_after=True, dropout=0.3, bidirectional=True)
    rec = Recorder(model)
    result = fit(model, Adam(0.01), data, data, TrainConfig(epochs=2, batch_size=batch_size),
                 np.random.default_rng(0), callbacks=[rec])
    assert result["steps"] == 2 * -(-n // batch_size)
    assert all(np.isfinite(s["loss"]) for s in rec.steps)


def test_batches_cover_every_example_once():
    lengths = np.random.default_rng(0).integers(1, 50, 103)
    in_order = batches(lengths, 8)
    assert [len(b) for b in in_order] == [8] * 12 + [7]
    np.testing.assert_array_equal(np.concatenate(in_order), np.argsort(-lengths, kind="stable"))
    shuffled = batches(lengths, 8, np.random.default_rng(1), bucket_batches=3)
    np.testing.assert_array_equal(np.sort(np.concatenate(shuffled)), np.arange(103))
    assert max(len(b) for b in shuffled) == 8 and len(shuffled) == 4 * 3 + 1
    for b in shuffled:                                    # sorted by length within each batch
        assert np.all(np.diff(lengths[b]) <= 0)
    again = batches(lengths, 8, np.random.default_rng(1), bucket_batches=3)
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, again))
    with pytest.raises(ValueError, match="batch_size"):
        batches(lengths, 0)


def test_early_stopping_restores_the_best_epoch():
    """Validation labels are the training labels flipped: learning makes validation worse, so
    training stops after `patience` epochs without improvement and the best epoch comes back."""
    flipped = TRAIN._replace(labels=(1 - TRAIN.labels).astype(np.int8))
    model = toy_model("lstm")
    rec = Recorder(model)
    result = fit(model, Adam(0.03), TRAIN, flipped, TrainConfig(epochs=6, batch_size=16, patience=2),
                 np.random.default_rng(0), callbacks=[rec])
    accs = [h["val_accuracy"] for h in result["history"]]
    assert result["stopped_early"] and len(accs) < 6
    assert result["best_epoch"] == int(np.argmax(accs)) + 1 == len(accs) - 2
    assert result["best_val_accuracy"] == max(accs)
    best = rec.params[result["best_epoch"] - 1]
    for name, p in model.params.items():
        np.testing.assert_array_equal(p, best[name], err_msg=name)
    assert not np.array_equal(model.params["fc.W"], rec.params[-1]["fc.W"])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("poisoned,message", [("rnn.l0.W_x", "gradient norm nan"), ("fc.b", "loss nan")])
def test_divergence_names_epoch_and_step(tmp_path, poisoned, message):
    """A parameter set to inf after step 10 (epoch 2, batch 2) makes step 11 non-finite."""
    model = toy_model("rnn")

    class Poison:
        def on_step(self, info):
            if info["epoch"] == 2 and info["batch"] == 2:
                model.params[poisoned].reshape(-1)[0] = np.inf

    with pytest.raises(TrainingDiverged, match=rf"^epoch 2, step 11: .*{message}"):
        fit(model, Adam(0.01), TRAIN, VAL, TrainConfig(epochs=3, batch_size=32), np.random.default_rng(0),
            checkpoint_dir=tmp_path, callbacks=[Poison()])
    meta = json.loads(load_arrays(tmp_path / "checkpoint.npz")["meta_json"].tobytes())
    assert meta["state"]["epoch"] == 1 and meta["optimizer_t"] == 8, "the epoch-1 checkpoint is kept"


class CheckedAdam(Adam):
    """Adam that checks each update against Algorithm 1 with t = the number of steps so far."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.m, self.v, self.worst = 0, {}, {}, 0.0

    def step(self, params, grads):
        before = {k: params[k].copy() for k in grads}
        grads_copy = {k: np.array(g, copy=True) for k, g in grads.items()}
        super().step(params, grads)
        self.calls += 1
        k = self.calls
        for name, g in grads_copy.items():
            m = self.m[name] = self.b1 * self.m.get(name, 0) + (1 - self.b1) * g
            v = self.v[name] = self.b2 * self.v.get(name, 0) + (1 - self.b2) * g * g
            update = self.lr * (m / (1 - self.b1 ** k)) / (np.sqrt(v / (1 - self.b2 ** k)) + self.eps)
            err = np.abs(before[name] - update - params[name]).max() / np.abs(update).max()
            self.worst = max(self.worst, err)


def test_adam_bias_correction_uses_the_global_step_across_epochs():
    model = toy_model("gru", freeze_embedding=True).astype(np.float64)   # dense gradients only
    opt = CheckedAdam(0.01)
    result = fit(model, opt, TRAIN, VAL, TrainConfig(epochs=2, batch_size=64, patience=0),
                 np.random.default_rng(0))
    assert opt.t == opt.calls == result["steps"] == 2 * 4
    assert opt.worst < 1e-9, f"an update deviates from Adam with the global step by {opt.worst:.3g}"


def test_same_seed_same_run_and_different_seed_different_run():
    runs = []
    for seed in (0, 0, 1):
        model = toy_model("lstm", seed=seed, dropout=0.3, num_layers=2)
        rec = Recorder(model)
        fit(model, Adam(0.01), TRAIN, VAL, TrainConfig(epochs=1, batch_size=64),
            np.random.default_rng(seed), callbacks=[rec])
        runs.append(([s["loss"] for s in rec.steps], model.params))
    (loss_a, p_a), (loss_b, p_b), (loss_c, p_c) = runs
    assert loss_a == loss_b
    for name in p_a:
        assert p_a[name].tobytes() == p_b[name].tobytes(), name
    assert loss_a != loss_c and not np.array_equal(p_a["fc.W"], p_c["fc.W"])


# --------------------------------------------------------------------------------- checkpoints
RESUME_CFG = TrainConfig(lr_decay=0.5, epochs=3, batch_size=32, patience=0, trace_every=3, warmup_steps=5,
                         ema_decay=0.8)


def resume_model(seed=0):
    return toy_model("lstm", seed=seed, dropout=0.3, bidirectional=True, num_layers=2)


FLIPPED = VAL._replace(labels=(1 - VAL.labels).astype(np.int8))


@pytest.mark.parametrize("split,val", [(1, VAL), (2, FLIPPED)], ids=["after-epoch-1", "best-before-split"])
def test_resume_equals_uninterrupted_run(tmp_path, split, val):
    """Fit `split` epochs with a checkpoint, then call fit for all 3: the same parameters and
    record as one uninterrupted run. With flipped validation labels the best epoch precedes the
    checkpoint, so the best parameters must come back from it too."""
    reference = resume_model()
    expected = fit(reference, Adam(0.01), TRAIN, val, RESUME_CFG, np.random.default_rng(5))
    first = resume_model()
    fit(first, Adam(0.01), TRAIN, val, TrainConfig(**{**RESUME_CFG.__dict__, "epochs": split}),
        np.random.default_rng(5), checkpoint_dir=tmp_path)
    # a fresh process would start from other weights, optimizer state and rng: all must come back
    resumed = resume_model(seed=99)
    rec = Recorder(resumed)
    got = fit(resumed, Adam(0.01), TRAIN, val, RESUME_CFG, np.random.default_rng(99),
              checkpoint_dir=tmp_path, callbacks=[rec])
    assert rec.steps[0]["epoch"] == split + 1 and rec.steps[0]["step"] == 8 * split + 1, \
        "it must resume, not restart"
    if val is FLIPPED:
        assert expected["best_epoch"] < split
    for name, p in reference.params.items():
        assert np.array_equal(resumed.params[name], p), name
    assert metrics(got) == metrics(expected)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    fit(toy_model("gru"), Adam(0.01), TRAIN, VAL, TrainConfig(epochs=1, batch_size=64),
        np.random.default_rng(0), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="not a usable checkpoint for this model"):
        fit(toy_model("lstm"), Adam(0.01), TRAIN, VAL, TrainConfig(epochs=2, batch_size=64),
            np.random.default_rng(0), checkpoint_dir=tmp_path)


def test_the_checkpoint_is_the_train_state_whole(tmp_path):
    """TrainState.save then TrainState.load gives back every field, the model's parameters, the
    optimizer's state and the rng's state, into another model, optimizer and rng."""
    model, opt, rng = toy_model("lstm"), Adam(0.01), np.random.default_rng(3)
    fit(model, opt, TRAIN, VAL, TrainConfig(epochs=1, batch_size=64, patience=0), rng)   # optimizer state
    sums = EpochSums(loss=1.25, n=3, correct=2, tokens=17, seconds=0.5, steps=2, norm_sum=0.75,
                     norm_max=0.5, clipped=1, trace={"a": [np.array([0.1, 0.2]), np.array([3, 1])]})
    state = TrainState(best_params={k: v * 2 for k, v in model.params.items()},
                       averaged={k: v * 3 for k, v in model.params.items()}, epoch=1,
                       history=[{"epoch": 1, "val_accuracy": 0.5}], traces=[{"a": [0.25, None]}],
                       best_epoch=1, best_score=0.5, position=2, epoch_rng=rng.bit_generator.state, sums=sums)
    state.save(tmp_path / CHECKPOINT, model, opt, rng)
    other, other_opt, other_rng = toy_model("lstm", seed=1), Adam(0.01), np.random.default_rng(9)
    loaded = TrainState.load(tmp_path / CHECKPOINT, other, other_opt, other_rng)
    for f in fields(TrainState):
        if f.name not in ("best_params", "averaged", "sums"):
            assert getattr(loaded, f.name) == getattr(state, f.name), f.name
    assert loaded.best_params.keys() == state.best_params.keys()
    assert all(np.array_equal(loaded.best_params[k], v) for k, v in state.best_params.items())
    assert loaded.averaged.keys() == state.averaged.keys()
    assert all(np.array_equal(loaded.averaged[k], v) for k, v in state.averaged.items())
    assert {f.name: getattr(loaded.sums, f.name) for f in fields(EpochSums) if f.name != "trace"} == \
           {f.name: getattr(sums, f.name) for f in fields(EpochSums) if f.name != "trace"}
    (s, c), = loaded.sums.trace.values()
    assert s.tolist() == [0.1, 0.2] and s.dtype == np.float64 and c.tolist() == [3, 1] and c.dtype == np.int64
    assert all(np.array_equal(other.params[k], v) for k, v in model.params.items())
    assert other_opt.t == opt.t and other_rng.bit_generator.state == rng.bit_generator.state
    a, b = opt.state_dict()["arrays"], other_opt.state_dict()["arrays"]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


SCRIPT = """
import json, multiprocessing, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import numpy as np
from rnn.io import save_arrays
from rnn.model import ModelConfig, SentimentModel
from rnn.optim import Adam
from rnn.parallel import WorkerDied
from rnn.train import Dataset, TrainConfig, TrainingInterrupted, fit

{toy_data}

class Pause:
    steps = 0

    def __init__(self, mode, marker, go):
        self.mode, self.marker, self.go = mode, marker, go

    def on_step(self, info):
        Pause.steps += 1
        if self.mode == "pause" and info["epoch"] == 2 and info["batch"] == 3:
            # the worker pids, then the test signals or kills this process or a worker
            workers = sorted(multiprocessing.active_children(), key=lambda p: p.name)   # rnn-worker-<i>
            self.marker.write_text(json.dumps([p.pid for p in workers]))
            deadline = time.monotonic() + 60
            while not self.go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)


def main():
    mode, checkpoint_dir, out, workers = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3]), int(sys.argv[4])
    cfg = ModelConfig(vocab_size=16, cell="lstm", embed_dim=8, hidden_size=8, dropout=0.3,
                      bidirectional=True, num_layers=2)
    model = SentimentModel.create(cfg, np.random.default_rng(0))
    try:
        result = fit(model, Adam(0.01), toy_data(256, 1), toy_data(128, 2),
                     TrainConfig(epochs=3, batch_size=32, patience=0, trace_every=3, workers=workers),
                     np.random.default_rng(5), checkpoint_dir=checkpoint_dir,
                     callbacks=[Pause(mode, out.with_suffix(".paused"), out.with_suffix(".go"))])
    except TrainingInterrupted as e:
        print(e)
        sys.exit(3)
    except WorkerDied as e:
        print(f"error: {{e}}", file=sys.stderr)
        sys.exit(4)
    save_arrays(out, model.params)
    timing = {timing!r}
    result["history"] = [{{k: v for k, v in h.items() if k not in timing}} for h in result["history"]]
    out.with_suffix(".json").write_text(json.dumps({{"result": result, "steps_run": Pause.steps}}))


if __name__ == "__main__":       # worker processes import this file again: they must not train
    main()
"""


@pytest.fixture(scope="module")
def train_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "train_toy.py"
    path.write_text(SCRIPT.format(root=str(ROOT), toy_data=inspect.getsource(toy_data), timing=TIMING))
    return path


def run_script(script: Path, mode: str, checkpoint_dir, out: Path, workers: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), mode, str(checkpoint_dir or ""), str(out), str(workers)],
                          capture_output=True, text=True, timeout=180)


def start_paused(script: Path, checkpoint_dir: Path, out: Path, workers: int) -> tuple[subprocess.Popen, list]:
    """Start a run (in a process group of its own, as a shell would) and wait until it sits inside
    step 3 of epoch 2. Returns the process and the pids of its workers."""
    proc = subprocess.Popen([sys.executable, str(script), "pause", str(checkpoint_dir), str(out), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    marker, deadline = out.with_suffix(".paused"), time.monotonic() + 120
    while True:
        try:
            return proc, json.loads(marker.read_text())
        except (FileNotFoundError, ValueError):       # not yet, or half written
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run never reached the pause point: {proc.communicate()}")
        time.sleep(0.01)


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-workers"])
def workers(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def uninterrupted(train_script, tmp_path_factory, workers):
    out = tmp_path_factory.mktemp("reference") / "params.npz"
    proc = run_script(train_script, "run", None, out, workers)
    assert proc.returncode == 0, proc.stderr
    return load_arrays(out), json.loads(out.with_suffix(".json").read_text())


def finish_and_compare(train_script, checkpoint_dir, tmp_path, uninterrupted, steps_expected, workers):
    out = tmp_path / "resumed.npz"
    proc = run_script(train_script, "run", checkpoint_dir, out, workers)
    assert proc.returncode == 0, proc.stderr
    params, record = load_arrays(out), json.loads(out.with_suffix(".json").read_text())
    ref_params, ref_record = uninterrupted
    assert record["steps_run"] == steps_expected, "the rerun must resume, not start over"
    assert set(params) == set(ref_params)
    for name in ref_params:
        assert np.array_equal(params[name], ref_params[name]), name
    assert record["result"] == ref_record["result"]


def checkpoint_meta(checkpoint_dir: Path) -> dict:
    return json.loads(load_arrays(checkpoint_dir / "checkpoint.npz")["meta_json"].tobytes())


def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted(train_script, uninterrupted, tmp_path, workers):
    ckpt = tmp_path / "ckpt"
    proc, worker_pids = start_paused(train_script, ckpt, tmp_path / "killed.npz", workers)
    assert len(worker_pids) == (workers if workers > 1 else 0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert_processes_gone(worker_pids)               # their pipe to the killed process closed
    assert_no_shared_memory(proc.pid)
    meta = checkpoint_meta(ckpt)
    assert meta["state"]["epoch"] == 1 and meta["state"]["sums"] is None
    finish_and_compare(train_script, ckpt, tmp_path, uninterrupted, 2 * 8, workers)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_saves_checkpoint_and_resumes_exactly(train_script, uninterrupted, tmp_path, sig,
                                                               workers):
    """SIGTERM goes to the training process (`kill`), SIGINT to its whole process group (Ctrl-C in
    a terminal): workers ignore it, the step finishes, the checkpoint is saved, all processes end."""
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "stopped.npz"
    proc, worker_pids = start_paused(train_script, ckpt, out, workers)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    out.with_suffix(".go").write_text("go")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "interrupted in epoch 2 after batch 3; checkpoint saved" in stdout
    assert stderr == "", "no process may have died from the signal"
    assert_processes_gone(worker_pids)
    assert_no_shared_memory(proc.pid)
    meta = checkpoint_meta(ckpt)
    assert meta["state"]["epoch"] == 1 and meta["state"]["position"] == 3 and meta["optimizer_t"] == 11
    assert meta["state"]["sums"] is not None
    finish_and_compare(train_script, ckpt, tmp_path, uninterrupted, 5 + 8, workers)


def test_a_killed_worker_stops_training_with_one_line(train_script, tmp_path):
    """SIGKILL one of two workers mid-epoch: the run stops at its next step naming the worker and
    the signal, keeps the last checkpoint, and leaves no process and no shared memory behind."""
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "broken.npz"
    proc, worker_pids = start_paused(train_script, ckpt, out, 2)
    os.kill(worker_pids[1], signal.SIGKILL)
    out.with_suffix(".go").write_text("go")
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 4, stderr
    assert stderr.splitlines() == [f"error: worker 1 (pid {worker_pids[1]}) died from signal SIGKILL"]
    assert_processes_gone(worker_pids)
    assert_no_shared_memory(proc.pid)
    meta = checkpoint_meta(ckpt)
    assert meta["state"]["epoch"] == 1 and meta["state"]["sums"] is None


def test_lr_decay_schedule_per_epoch():
    """Epoch e trains at lr * lr_decay ** (e - 1); the optimizer leaves fit with its own lr."""
    opt = Adam(0.01)
    seen = []
    class Spy:
        def on_step(self, info):
            seen.append((info["epoch"], opt.lr))
    result = fit(toy_model("rnn"), opt, TRAIN, VAL, TrainConfig(epochs=3, lr_decay=0.5, patience=0),
                 np.random.default_rng(0), callbacks=[Spy()])
    assert sorted(set(seen)) == [(1, 0.01), (2, 0.005), (3, 0.0025)]
    assert [h["lr"] for h in result["history"]] == [0.01, 0.005, 0.0025]
    assert opt.lr == 0.01


def test_warmup_ramps_the_first_updates_then_follows_the_epoch_schedule():
    """Update t (from 1) of the run trains at the epoch's rate x min(1, t / warmup_steps), across epochs."""
    opt = Adam(0.01)
    seen = []
    class Spy:
        def on_step(self, info):
            seen.append((info["epoch"], info["step"], opt.lr))
    cfg = TrainConfig(epochs=2, lr_decay=0.5, patience=0, batch_size=64, warmup_steps=6)
    result = fit(toy_model("rnn"), opt, TRAIN, VAL, cfg, np.random.default_rng(0), callbacks=[Spy()])
    per_epoch = len(seen) // 2
    assert 2 < per_epoch < 6, "the ramp should span the epoch boundary"
    for epoch, step, lr in seen:
        assert lr == pytest.approx(0.01 * 0.5 ** (epoch - 1) * min(1.0, step / 6), rel=1e-12), (epoch, step)
    assert [h["lr"] for h in result["history"]] == [0.01, 0.005] and opt.lr == 0.01


def test_ema_validates_and_keeps_the_moving_average_of_the_weights():
    """With ema_decay d the average starts at the initial weights and moves (1 - d) of the way to
    the weights after every update; each epoch's validation scores the average, the model ends with
    the best epoch's average, and the weights it trains on follow the same path as without it."""
    def run(ema_decay):
        model = toy_model("gru", dropout=0.2)
        average, after_step, at_epochs = {k: v.copy() for k, v in model.params.items()}, [], []
        class Spy:
            def on_step(self, info):
                after_step.append({k: v.copy() for k, v in model.params.items()})
                for k, a in average.items():
                    a += (1.0 - ema_decay) * (model.params[k] - a)
            def on_epoch(self, info):
                at_epochs.append((info, {k: v.copy() for k, v in average.items()}))
        cfg = TrainConfig(epochs=2, batch_size=32, patience=0, ema_decay=ema_decay)
        result = fit(model, Adam(0.01), TRAIN, VAL, cfg, np.random.default_rng(0), callbacks=[Spy()])
        return model, result, after_step, at_epochs

    model, result, after_step, at_epochs = run(0.7)
    for info, average in at_epochs:
        copy = toy_model("gru", dropout=0.2)
        for k, v in average.items():
            copy.params[k][...] = v
        scores = evaluate(copy, VAL)
        assert info["val_accuracy"] == scores["accuracy"]
        assert info["val_loss"] == pytest.approx(scores["loss"], rel=1e-5)
    best = at_epochs[result["best_epoch"] - 1][1]
    for k, v in model.params.items():
        assert np.allclose(v, best[k], rtol=1e-5, atol=1e-7), k
    assert not np.allclose(best["fc.W"], after_step[-1]["fc.W"]), "the average is not the last weights"
    _, _, plain_steps, _ = run(0.0)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(plain_steps, after_step) for k in a), \
        "the average must not change the training trajectory"
    with pytest.raises(ValueError, match="ema_decay must lie in"):
        TrainConfig(ema_decay=1.0)


def test_broken_checkpoint_is_refused_and_leaves_the_model_alone(tmp_path):
    """A checkpoint with a missing or misshapen array fails with one ValueError naming the file,
    before any parameter is overwritten."""
    fit(toy_model("gru"), Adam(0.01), TRAIN, VAL, TrainConfig(epochs=1, batch_size=64),
        np.random.default_rng(0), checkpoint_dir=tmp_path)
    path = tmp_path / "checkpoint.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    del arrays["best/fc.b"]
    arrays["param/fc.W"] = np.zeros((1, 1), np.float32)
    np.savez(path, **arrays)
    model = toy_model("gru")
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(ValueError, match=f"{path}: not a usable checkpoint"):
        fit(model, Adam(0.01), TRAIN, VAL, TrainConfig(epochs=2, batch_size=64),
            np.random.default_rng(0), checkpoint_dir=tmp_path)
    assert all(np.array_equal(before[k], model.params[k]) for k in before)
