"""Synchronous data parallelism over worker processes, with NumPy and the standard library only.

NumPy runs every elementwise operation on one core, and threads in one process lose to the GIL
between NumPy's many short calls (README, "Speed"), so the other cores are used by processes:

    with make_runner(model, {"ids": ids, "lengths": lengths, "labels": labels}, workers=2) as runner:
        loss, grads, shares = runner.gradients(rows, seed)     # the batch data[rows], all shares summed
        optimizer.step(model.params, grads)                     # the workers see the new weights
        logits = runner.predict_logits(val_ids, val_lengths)    # inference on the same workers

One step: the main process deals the batch's rows into one share per worker, with about equal
numbers of tokens, and sends each worker its share's indices; each worker runs `model.share_loss`
on its rows (loss and gradients summed over them, divided by `model.loss_denominator` of the whole
batch: its reviews for the classifier, its predicted tokens for the language model) and writes the
gradients into its own slot of shared memory; the main process adds the slots up (the sparse
embedding gradients row by row) and steps the optimizer. The rest lives in shared memory too: the
training data, and the parameters, which `model.params` points into while the pool is open, so an
optimizer step updates them in place for every process. Pipes carry only indices and small results.

Determinism: the split depends only on the batch, a share's gradient only on its rows and the
step's seed (dropout masks are keyed on batch positions, see rnn.model.sort_batch), and the main
process adds the slots in worker order; every worker uses one BLAS thread. So for a given number of
workers the numbers never depend on timing, and across numbers of workers they agree to rounding.

Faults: workers ignore Ctrl-C and SIGTERM (the training loop stops them after a whole step) and exit
when their pipe to the main process closes, so they never outlive it. A worker that dies raises
`WorkerDied` naming it and its signal, and the pool shuts down. The shared memory block is unlinked
from /dev/shm as soon as every worker has mapped it (a mapping outlives its name), so nothing is
left behind however the processes end. (Only if the main process is killed in the second or so
before that does the block stay linked; multiprocessing's resource tracker then removes it.)

A model class fits if it is built as `cls(config, params)`, keeps its parameters in `.params` (a
flat dict of arrays) and has `share_loss` and `loss_denominator` like SentimentModel (and
LanguageModel, rnn/lm.py); inference calls any of its methods by name (`map`).
"""
from __future__ import annotations

import atexit
import gc
import os
import pickle
import secrets
import signal
import threading
import traceback
import weakref
from collections.abc import Iterable
from contextlib import contextmanager
from multiprocessing import connection, get_context, shared_memory

import numpy as np

from .errors import InputError, WorkerDied
from .layers import SparseRows

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
JOIN_SECONDS = 2.0          # how long `close` waits for a worker to exit before killing it
SHM_FOLDER = "/dev/shm"     # where POSIX shared memory lives on Linux (a tmpfs: 64 MB in Docker by default)


class SharedMemoryTooSmall(InputError):
    """The pool's shared memory would not fit in /dev/shm (writing past its end kills with SIGBUS)."""


def shm_free_bytes() -> int | None:
    """Bytes free in SHM_FOLDER, None where there is no such folder (not Linux)."""
    try:
        st = os.statvfs(SHM_FOLDER)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_shm_space(size: int, workers: int) -> None:
    """Raise SharedMemoryTooSmall when a block of `size` bytes would not fit in SHM_FOLDER. A tmpfs
    hands out pages only when they are written, so an oversized block is created without complaint
    and the first write past the free space kills the process with SIGBUS, without a message."""
    free = shm_free_bytes()
    if free is not None and size > free:
        raise SharedMemoryTooSmall(
            f"{SHM_FOLDER} has {free / 2**20:,.1f} MiB free, {workers} worker processes need "
            f"{size / 2**20:,.1f} MiB of shared memory (the data, the weights and a gradient slot per worker): "
            "set train.workers: 1 in params.yaml (--workers 1 for the rnn command; no shared memory), "
            "or give it more room (docker run --shm-size=2g)")


def resolve_workers(value: int | str) -> int:
    """The `workers` setting as a count: a positive integer, or "auto" = the cores this process
    may run on (os.sched_getaffinity, which honours taskset and container CPU sets)."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"workers must be a positive integer or 'auto', got {value!r}")
    return int(value)


def split_rows(lengths: np.ndarray, shares: int) -> list[np.ndarray]:
    """Deal the rows of a batch into `shares` shares with about equal numbers of tokens.

    lengths: (B,). Rows go out longest first in snake order (0, 1, .., n-1, n-1, .., 1, 0, 0, 1, ..).
    Returns each share's row positions, ascending; a share is empty when B < shares."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    turn = np.arange(len(order)) % (2 * shares)
    owner = np.minimum(turn, 2 * shares - 1 - turn)
    return [np.sort(order[owner == w]) for w in range(shares)]


def map_by_length(runner, method: str, ids: np.ndarray, lengths: np.ndarray, batch_size: int
                  ) -> list[tuple[np.ndarray, object]]:
    """Run the runner's model.<method>(ids, lengths) over many sequences in batches of similar
    length, which waste little on padding: the rows sorted longest first, in batches of at most
    `batch_size`. ids: (N, T), each batch's cut to its longest sequence; lengths: (N,). A
    WorkerPool runs each batch on whichever worker is free. Returns [(rows, result)], one a batch."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    calls = ((ids[rows][:, :int(lengths[rows].max())], lengths[rows]) for rows in chunks)
    return list(zip(chunks, runner.map(method, calls)))


def predict_logits(runner, ids: np.ndarray, lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits (N,) in float64 of a classifier (the runner's model) for many sequences."""
    out = np.empty(len(lengths), np.float64)
    for rows, logits in map_by_length(runner, "logits", ids, lengths, batch_size):
        out[rows] = logits
    return out


def sum_sparse_rows(parts: list[SparseRows]) -> SparseRows:
    """Sum of row-sparse gradients of one matrix; each part's rows are distinct and ascending.

    The union of the rows comes from a mark per row of the matrix, not from sorting them (a
    vocabulary of 20,000 is cheap to scan): 0.65 ms against 1.9 ms with np.union1d and searchsorted
    for 2 x 5,500 of 20,000 rows (measured; both earlier than adding dense per-worker (V, E) slots
    over the union of rows, or sorting all rows with their values and np.add.reduceat)."""
    used = np.zeros(parts[0].shape[0], bool)
    for p in parts:
        used[p.rows] = True
    rows = np.flatnonzero(used)
    place = np.cumsum(used) - 1                  # a used row's position in `rows`
    values = np.zeros((len(rows),) + parts[0].values.shape[1:], parts[0].values.dtype)
    for p in parts:
        values[place[p.rows]] += p.values
    return SparseRows(rows, values, parts[0].shape)


class LocalRunner:
    """workers = 1: the interface of WorkerPool, run in the calling process (no processes at all)."""

    workers = 1

    def __init__(self, model, data: dict[str, np.ndarray] | None = None):
        self.model, self.data = model, data or {}

    def gradients(self, rows: np.ndarray, seed: int | None, trace: bool = False
                  ) -> tuple[float, dict, list[tuple[np.ndarray, dict]]]:
        """See WorkerPool.gradients."""
        positions = np.arange(len(rows))
        batch = {k: v[rows] for k, v in self.data.items()}
        total = self.model.loss_denominator(batch["lengths"])
        loss, grads, extras = self.model.share_loss(batch, seed, positions, total, trace)
        return loss, grads, [(positions, extras)]

    def predict_logits(self, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """See WorkerPool.predict_logits."""
        return predict_logits(self, ids, lengths, batch_size)

    def map(self, method: str, calls: Iterable[tuple]) -> list:
        """See WorkerPool.map."""
        return [getattr(self.model, method)(*args) for args in calls]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_runner(model, data: dict[str, np.ndarray] | None, workers: int) -> LocalRunner | WorkerPool:
    """What the training loop asks for gradients: a LocalRunner for 1 worker, else a WorkerPool."""
    return LocalRunner(model, data) if workers == 1 else WorkerPool(model, workers, data)


class WorkerPool:
    """`workers` processes serving one model: the gradients of a batch's shares (over `data`, a
    dict of arrays with examples along axis 0, e.g. ids, lengths, labels) and inference.

    While the pool is open, model.params are views into shared memory; `close` (or the end of a
    `with` block) stops the workers and gives the model back its own arrays, holding the final
    values. Start-up takes about a second (each worker starts Python and imports NumPy).
    Workers are started with "spawn": the main module is imported again in each of them, so a
    script that trains must keep its work under `if __name__ == "__main__":`.
    """

    def __init__(self, model, workers: int, data: dict[str, np.ndarray] | None = None):
        if model in _served_models:
            raise ValueError("this model is already served by an open WorkerPool; close that first")
        self.model, self.workers, self.data_keys = model, resolve_workers(workers), list(data or {})
        self._procs, self._conns, self._closed, self._linked = [], [], False, False
        self._own_params = dict(model.params)
        specs = {f"param/{k}": (v.shape, v.dtype) for k, v in model.params.items()}
        specs.update({f"data/{k}": (v.shape, v.dtype) for k, v in (data or {}).items()})
        for w in range(self.workers if data else 0):              # gradient slots, one per worker
            for k, v in model.params.items():
                specs[f"grad{w}/{k}"] = (v.shape, v.dtype)         # a dense gradient, or sparse values
                specs[f"rows{w}/{k}"] = ((v.shape[0],), np.int64)  # ... and their row indices
        layout, size = _layout(specs)
        check_shm_space(size, self.workers)
        self._shm = shared_memory.SharedMemory(f"rnn_{os.getpid()}_{secrets.token_hex(4)}", create=True,
                                               size=size)
        self._linked = True
        _open_pools.add(self)
        _served_models.add(model)
        try:
            self._arrays = _views(self._shm.buf, layout)
            for k, v in (data or {}).items():
                self._arrays[f"data/{k}"][...] = v
            for k, v in self._own_params.items():
                self._arrays[f"param/{k}"][...] = v
                model.params[k] = self._arrays[f"param/{k}"]
            ctx = get_context("spawn")       # not fork: the caller may run threads (MLflow, tqdm)
            with _worker_start_conditions():
                for w in range(self.workers):
                    ours, theirs = ctx.Pipe()
                    proc = ctx.Process(target=_worker_main, name=f"rnn-worker-{w}", daemon=True,
                                       args=(w, theirs, self._shm.name, layout, type(model), model.config,
                                             self.data_keys))
                    proc.start()
                    theirs.close()
                    self._procs.append(proc)
                    self._conns.append(ours)
            self._receive_all(range(self.workers))                 # each has mapped the block
            self._shm.unlink()
            self._linked = False
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # ------------------------------------------------------------------------------ training
    def gradients(self, rows: np.ndarray, seed: int | None, trace: bool = False
                  ) -> tuple[float, dict, list[tuple[np.ndarray, dict]]]:
        """Loss and gradients of the batch data[rows] (its mean, as model.share_loss with all rows).

        seed: the step's seed (dropout masks); trace: ask for the gradient trace. Returns (loss,
        grads, shares): shares lists each busy worker's (positions in the batch, extras), from
        which the caller assembles per-row results such as the logits."""
        rows = np.asarray(rows)
        if not self.data_keys or not len(rows):
            raise ValueError("gradients need a pool made with data and a batch of at least one row")
        lengths = self._arrays["data/lengths"][rows] if "lengths" in self.data_keys else np.ones(len(rows))
        shares = split_rows(lengths, self.workers)
        busy = [w for w in range(self.workers) if len(shares[w])]
        total = self.model.loss_denominator(lengths)       # the batch's examples (or predictions)
        for w in busy:
            self._send(w, ("grad", rows[shares[w]], shares[w], seed, total, trace))
        replies = self._receive_all(busy)
        loss = sum(replies[w][0] for w in busy)
        grads = {}
        for name, k in replies[busy[0]][1].items():
            if k is None:                                          # dense: add the slots in order
                grads[name] = self._arrays[f"grad{busy[0]}/{name}"].copy()
                for w in busy[1:]:
                    grads[name] += self._arrays[f"grad{w}/{name}"]
            else:
                shape = self.model.params[name].shape
                grads[name] = sum_sparse_rows([
                    SparseRows(self._arrays[f"rows{w}/{name}"][:replies[w][1][name]],
                               self._arrays[f"grad{w}/{name}"][:replies[w][1][name]], shape)
                    for w in busy])
        return loss, grads, [(shares[w], replies[w][2]) for w in busy]

    # ----------------------------------------------------------------------------- inference
    def predict_logits(self, ids: np.ndarray, lengths: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits (N,) as model.predict_logits, its length-sorted batches spread over the workers.

        Batches hold at most ceil(N / workers) sequences, so that one batch also uses every worker."""
        size = max(1, min(batch_size, -(-len(lengths) // self.workers)))
        return predict_logits(self, ids, lengths, size)

    def map(self, method: str, calls: Iterable[tuple]) -> list:
        """[model.<method>(*args) for args in calls], each call run by whichever worker is free."""
        calls, results, pending, idle = iter(calls), [], {}, list(range(self.workers))
        while True:
            while idle and (args := next(calls, None)) is not None:
                w = idle.pop()
                self._send(w, ("call", method, args))
                pending[w] = len(results)
                results.append(None)
            if not pending:
                return results
            w, value = self._receive(pending)
            results[pending.pop(w)] = value
            idle.append(w)

    # ------------------------------------------------------------------------------- plumbing
    def _send(self, w: int, message) -> None:
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        try:
            self._conns[w].send(message)
        except OSError:                              # a broken pipe: the worker is gone
            self._died(w)

    def _receive(self, pending: Iterable[int]):
        """(w, value) of the next reply from one of the `pending` workers. Raises WorkerDied as
        soon as any worker dies, and a worker's exception as it was raised there."""
        conns = {self._conns[w]: w for w in pending}
        sentinels = {p.sentinel: w for w, p in enumerate(self._procs)}
        ready = connection.wait([*conns, *sentinels])
        for r in ready:
            if r in conns:
                w = conns[r]
                try:
                    status, value = r.recv()
                except (EOFError, OSError):
                    self._died(w)
                if status == "error":
                    self.close()
                    raise value
                return w, value
        self._died(sentinels[ready[0]])

    def _receive_all(self, workers: Iterable[int]) -> dict:
        pending, replies = set(workers), {}
        while pending:
            w, value = self._receive(pending)
            replies[w] = value
            pending.discard(w)
        return replies

    def _died(self, w: int):
        proc = self._procs[w]
        proc.join(JOIN_SECONDS)                       # it has closed its pipe; let it finish exiting
        code = proc.exitcode
        how = ("is still running but closed its pipe" if code is None else
               f"died from signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        self.close()
        raise WorkerDied(f"worker {w} (pid {proc.pid}) {how}")

    def close(self) -> None:
        """Stop the workers (kill those that do not exit within JOIN_SECONDS) and give the model
        back its own parameter arrays, updated. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        _open_pools.discard(self)
        _served_models.discard(self.model)
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(JOIN_SECONDS)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        for k, own in self._own_params.items():
            if self.model.params[k] is not own:
                own[...] = self.model.params[k]
                self.model.params[k] = own
        self._arrays = None
        if self._linked:
            self._shm.unlink()
            self._linked = False
        _close_block(self._shm)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Pools left open at exit are closed before multiprocessing's own exit handler joins the workers
# (which would wait forever: workers ignore SIGTERM). atexit runs handlers last-registered first,
# and multiprocessing registered its handler when `connection` was imported above.
_open_pools: weakref.WeakSet = weakref.WeakSet()
_served_models: weakref.WeakSet = weakref.WeakSet()
atexit.register(lambda: [pool.close() for pool in list(_open_pools)])


def _layout(specs: dict[str, tuple]) -> tuple[dict[str, tuple], int]:
    """Arrays given as {key: (shape, dtype)} packed into one buffer, each at a 64-byte boundary.
    Returns ({key: (offset, shape, dtype string)}, size in bytes)."""
    layout, end = {}, 0
    for key, (shape, dtype) in specs.items():
        dtype = np.dtype(dtype)
        layout[key] = (end, tuple(shape), dtype.str)
        end += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // 64) * 64
    return layout, max(end, 64)


def _views(buffer, layout: dict) -> dict[str, np.ndarray]:
    """Arrays over `buffer`. np.frombuffer, unlike np.ndarray(buffer=...), holds the buffer, so
    the block cannot be unmapped under a live view (SharedMemory.close raises BufferError)."""
    views = {}
    for key, (offset, shape, dtype) in layout.items():
        count = int(np.prod(shape, dtype=np.int64))
        views[key] = (np.frombuffer(buffer, dtype, count, offset).reshape(shape) if count else
                      np.empty(shape, dtype))
    return views


@contextmanager
def _worker_start_conditions():
    """What the workers inherit when they start: one BLAS thread each (the variables are read when
    NumPy loads, before any of our code runs there), and Ctrl-C and SIGTERM ignored from their
    first instruction. Meanwhile the main process holds those signals back, so none is lost."""
    saved = {k: os.environ.get(k) for k in BLAS_THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(BLAS_THREAD_VARIABLES, "1"))
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if handlers:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _worker_main(index: int, conn, block: str, layout: dict, model_class, config, data_keys: list) -> None:
    """A worker: map the shared block, build the model on its parameters, then answer messages
    ("grad", rows, positions, seed, total, trace) and ("call", method, args) until told to stop
    (None) or the main process is gone (end of file on the pipe)."""
    for sig in STOP_SIGNALS:                 # the main process decides when to stop
        signal.signal(sig, signal.SIG_IGN)
    shm = shared_memory.SharedMemory(block)
    arrays = _views(shm.buf, layout)
    model = model_class(config, {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
    data = {k: arrays[f"data/{k}"] for k in data_keys}
    slots = {f"{kind}/{name}": arrays[f"{kind}{index}/{name}"]               # this worker's own
             for kind in ("grad", "rows") for name in model.params if data_keys}
    conn.send(("ok", "ready"))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        try:
            if message[0] == "grad":
                reply = ("ok", _share_gradients(model, data, slots, *message[1:]))
            else:
                reply = ("ok", getattr(model, message[1])(*message[2]))
        except Exception as e:                               # the main process re-raises it
            e.add_note(f"(raised in worker {index}:)\n{traceback.format_exc()}")
            reply = ("error", e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
        try:
            conn.send(reply)
        except OSError:
            break
    del model, data, slots, arrays
    _close_block(shm)


def _close_block(shm: shared_memory.SharedMemory) -> None:
    """Unmap the block. Arrays over it that are still alive (in a reference cycle not yet
    collected, or kept by a caller) would make close raise BufferError, and SharedMemory.__del__
    would try again at exit and print "Exception ignored ... BufferError: cannot close exported
    pointers exist": collect the cycles first; if a view still lives, the mapping goes with it."""
    for attempt in range(2):
        try:
            shm.close()
            return
        except BufferError:
            if attempt == 0:
                gc.collect()
    shm.close = lambda: None          # what __del__ calls: the last view's end unmaps the block


def _share_gradients(model, data: dict, slots: dict, rows, positions, seed, total, trace):
    """Run model.share_loss on data[rows] and write its gradients into this worker's slots.
    Returns (loss, {name: None for a dense gradient, or its number of sparse rows}, extras)."""
    batch = {k: v[rows] for k, v in data.items()}
    loss, grads, extras = model.share_loss(batch, seed, positions, total, trace)
    kinds = {}
    for name, g in grads.items():
        if isinstance(g, SparseRows):
            n = len(g.rows)
            slots[f"rows/{name}"][:n] = g.rows
            slots[f"grad/{name}"][:n] = g.values
            kinds[name] = n
        else:
            slots[f"grad/{name}"][...] = g
            kinds[name] = None
    return loss, kinds, extras


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False
