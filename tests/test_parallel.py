"""Data parallelism over worker processes (rnn.parallel): a batch's loss and gradient agree for 1, 2
and 3 workers to float64 rounding, dropout on; a fixed number of workers gives bit-identical runs;
inference on the workers matches the model's; parameters live in shared memory and come back;
errors and dead workers end the pool with one clear exception and nothing left behind.
Correctness only: no timing is asserted."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest

from gradcheck import rel_err
from helpers import assert_no_shared_memory, assert_processes_gone, make_model
from rnn.layers import SparseRows
from rnn.model import dense_grad
from rnn.optim import Adam
from rnn.parallel import LocalRunner, WorkerDied, WorkerPool, resolve_workers, split_rows, sum_sparse_rows
from rnn.train import Dataset, TrainConfig, evaluate, fit

V = 40
SIZES = {"vocab_size": V, "embed_dim": 6, "hidden_size": 5}


def make_data(n: int, seed: int, T: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, n)
    ids = rng.integers(1, V, (n, T)).astype(np.int32)
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return {"ids": ids, "lengths": lengths, "labels": rng.integers(0, 2, n).astype(np.int8)}


DATA = make_data(60, 1)


# ------------------------------------------------------------------------------- small pieces
def test_resolve_workers():
    assert resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert (resolve_workers(3), resolve_workers("2"), resolve_workers(np.int64(1))) == (3, 2, 1)
    for bad in (0, -1, True, 1.5, "two", "", None):
        with pytest.raises(ValueError, match=r"workers must be a positive integer or 'auto', got "):
            resolve_workers(bad)


def test_split_rows_covers_the_batch_with_balanced_tokens():
    lengths = np.random.default_rng(0).integers(1, 400, 64)
    for n in (1, 2, 3, 5):
        shares = split_rows(lengths, n)
        np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(64))
        tokens = [int(lengths[s].sum()) for s in shares]
        assert max(tokens) - min(tokens) <= lengths.max(), tokens
        assert all(np.all(np.diff(s) > 0) for s in shares)
    assert [list(s) for s in split_rows(np.array([5, 9]), 3)] == [[1], [0], []]


def test_sum_sparse_rows_equals_the_dense_sum():
    rng = np.random.default_rng(0)
    parts = [SparseRows(np.sort(rng.choice(20, k, replace=False)), rng.normal(size=(k, 3)), (20, 3))
             for k in (5, 9, 1)]
    total = sum_sparse_rows(parts)
    assert np.all(np.diff(total.rows) > 0) and total.shape == (20, 3)
    np.testing.assert_allclose(total.to_dense(), sum(p.to_dense() for p in parts), rtol=1e-15)


# ----------------------------------------------------------------------- gradients and inference
@pytest.fixture(scope="module")
def pools():
    """One float64 model with dropout between two bidirectional layers, served in this process
    and by pools of 2 and 3 workers."""
    model = make_model("lstm", num_layers=2, bidirectional=True, dropout=0.4, pooling="mean", **SIZES)
    copy = model.astype
    opened = {1: LocalRunner(model, DATA), 2: WorkerPool(copy("float64"), 2, DATA),
              3: WorkerPool(copy("float64"), 3, DATA)}
    yield model, opened
    for pool in opened.values():
        pool.close()


@pytest.mark.parametrize("size", [17, 2, 1], ids=["17-rows", "2-rows", "1-row"])
def test_gradient_agrees_across_worker_counts(pools, size):
    """Loss, every gradient, the rows' logits and the gradient trace of one step, dropout on, agree
    between 1, 2 and 3 workers to float64 rounding (a batch of 1 or 2 rows leaves workers idle)."""
    model, runners = pools
    rows = np.random.default_rng(size).permutation(len(DATA["lengths"]))[:size]
    results = {}
    for workers, runner in runners.items():
        loss, grads, shares = runner.gradients(rows, seed=1234, trace=True)
        logits, sums = np.empty(size), np.zeros(12)
        for positions, extras in shares:
            logits[positions] = extras["logits"]
            s = extras["trace"]["a"][0]
            sums[:len(s)] += s
        results[workers] = loss, grads, logits, sums
    loss1, grads1, logits1, sums1 = results[1]
    no_dropout = model.forward(DATA["ids"][rows], DATA["lengths"][rows])[0]
    assert not np.allclose(logits1, no_dropout), "dropout must be on"
    for workers in (2, 3):
        loss, grads, logits, sums = results[workers]
        assert abs(loss - loss1) / abs(loss1) < 1e-12
        assert set(grads) == set(grads1)
        for name, g in grads.items():
            assert isinstance(g, SparseRows) == (name == "embedding.weight")
            assert rel_err(dense_grad(g), dense_grad(grads1[name])) < 1e-12, (workers, name)
        np.testing.assert_array_equal(grads["embedding.weight"].rows, grads1["embedding.weight"].rows)
        assert rel_err(logits, logits1) < 1e-12 and rel_err(sums, sums1) < 1e-12


def test_a_fixed_number_of_workers_is_bit_identical(pools):
    _, runners = pools
    rows = np.arange(0, 60, 3)
    a, b = (runners[3].gradients(rows, seed=7) for _ in range(2))
    assert a[0] == b[0]
    for name in a[1]:
        assert dense_grad(a[1][name]).tobytes() == dense_grad(b[1][name]).tobytes(), name


def test_inference_on_the_workers_equals_the_model(pools):
    model, runners = pools
    ids, lengths = DATA["ids"], DATA["lengths"]
    expected = model.predict_logits(ids, lengths)
    for batch_size in (256, 7, 1):
        for workers in (2, 3):
            assert rel_err(runners[workers].predict_logits(ids, lengths, batch_size), expected) < 1e-12
    assert rel_err(runners[2].predict_logits(ids[:1], lengths[:1]), expected[:1]) < 1e-12


def test_model_and_evaluate_take_workers():
    model = make_model("gru", reset_after=True, **SIZES)
    data = Dataset(**make_data(30, 2))
    expected = model.predict_logits(data.ids, data.lengths)
    assert rel_err(model.predict_logits(data.ids, data.lengths, 8, workers=2), expected) < 1e-12
    one, two = evaluate(model, data), evaluate(model, data, batch_size=10, workers="auto")
    assert two["accuracy"] == one["accuracy"] and two["loss"] == pytest.approx(one["loss"], rel=1e-12)


def test_one_pool_per_model():
    model = make_model("rnn", **SIZES)
    with WorkerPool(model, 1):
        with pytest.raises(ValueError, match="already served by an open WorkerPool"):
            WorkerPool(model, 2)
    WorkerPool(model, 1).close()


def test_parameters_live_in_shared_memory_and_come_back():
    """While the pool is open the workers read model.params as they are now; afterwards the model
    holds its own arrays again, with the values it had at the end."""
    model = make_model("rnn", **SIZES)
    own = dict(model.params)
    data = make_data(10, 3)
    with WorkerPool(model, 2, data) as pool:
        assert all(model.params[k] is not own[k] for k in own)
        before = pool.predict_logits(data["ids"], data["lengths"])
        model.params["fc.b"][...] += 1.0                      # as an optimizer step would, in place
        after = pool.predict_logits(data["ids"], data["lengths"])
        np.testing.assert_allclose(after, before + 1.0, rtol=1e-12)
    assert all(model.params[k] is own[k] for k in own)
    np.testing.assert_allclose(model.predict_logits(data["ids"], data["lengths"]), after, rtol=1e-12)


# ------------------------------------------------------------------------------------ training
class ProcessCount:
    """Callback: how many processes this process started since `baseline` (other tests' pools)."""

    def __init__(self, baseline: set):
        self.baseline, self.seen = baseline, set()

    def on_step(self, info):
        self.seen.add(len(set(multiprocessing.active_children()) - self.baseline))


def test_fit_bit_identical_for_two_workers_and_close_to_one_process():
    """Two runs with 2 workers (float32, dropout on) end bit-identical; one process gives the same
    run up to float rounding; workers=1 starts no process at all."""
    train, val = Dataset(**make_data(96, 4)), Dataset(**make_data(40, 5))
    runs, baseline = [], set(multiprocessing.active_children())
    for workers in (2, 2, 1):
        model = make_model("lstm", dtype="float32", dropout=0.3, num_layers=2, **SIZES)
        count = ProcessCount(baseline)
        result = fit(model, Adam(0.01), train, val, TrainConfig(epochs=2, batch_size=16, workers=workers),
                     np.random.default_rng(3), callbacks=[count])
        assert count.seen == {workers if workers > 1 else 0}
        runs.append((model.params, result))
    (p_a, r_a), (p_b, r_b), (p_1, r_1) = runs
    for name in p_a:
        assert p_a[name].tobytes() == p_b[name].tobytes(), name
        np.testing.assert_allclose(p_1[name], p_a[name], rtol=1e-4, atol=1e-5, err_msg=name)
    strip = [{k: v for k, v in h.items() if "seconds" not in k and k != "tokens_per_s"} for h in r_a["history"]]
    assert strip == [{k: v for k, v in h.items() if "seconds" not in k and k != "tokens_per_s"}
                     for h in r_b["history"]]
    assert [h["train_accuracy"] for h in r_1["history"]] == [h["train_accuracy"] for h in r_a["history"]]
    assert set(multiprocessing.active_children()) <= baseline
    assert_no_shared_memory(os.getpid())


# -------------------------------------------------------------------------------------- faults
def test_an_error_in_a_worker_is_raised_as_it_was():
    model = make_model("gru", **SIZES)
    own = dict(model.params)
    pool = WorkerPool(model, 2)
    pids = pool.pids
    with pytest.raises(ValueError, match="every sequence needs at least one token"):
        pool.predict_logits(DATA["ids"][:4], np.array([3, 0, 2, 1]))
    assert all(model.params[k] is own[k] for k in own), "the pool closed and gave the parameters back"
    assert_processes_gone(pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.predict_logits(DATA["ids"][:1], DATA["lengths"][:1])


@pytest.mark.parametrize("when", ["between-steps", "during-steps"])
def test_a_killed_worker_raises_worker_died(when):
    """SIGKILL a worker before a step or while steps run: the next wait raises WorkerDied naming it
    and its signal, the other worker is stopped, no shared memory is left."""
    model = make_model("lstm", num_layers=2, **SIZES)
    pool = WorkerPool(model, 2, DATA)
    pids = pool.pids
    rows = np.arange(60)
    if when == "between-steps":
        os.kill(pids[1], signal.SIGKILL)
    else:
        threading.Timer(0.2, os.kill, (pids[1], signal.SIGKILL)).start()
    with pytest.raises(WorkerDied, match=rf"^worker 1 \(pid {pids[1]}\) died from signal SIGKILL$"):
        for _ in range(100_000):                   # ends when the kill is noticed
            pool.gradients(rows, seed=0)
    assert_processes_gone(pids)
    assert_no_shared_memory(os.getpid())
    assert isinstance(model.params["fc.W"], np.ndarray) and np.isfinite(model.params["fc.W"]).all()
