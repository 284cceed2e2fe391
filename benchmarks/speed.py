#!/usr/bin/env python
"""Training and inference speed of our NumPy model, optionally against the same model in PyTorch.

One training step is the whole of it: embedding lookup (vocabulary 20,000), one recurrent layer,
last hidden state, dense layer to a logit, BCE-with-logits loss, backpropagation, and an Adam
update, in float32. Inference is the forward pass alone. Each measurement is the median of
`--repeats` single steps after `--warmup` steps; with `--vs-torch` the NumPy and torch repeats
alternate, so both sides see the same machine load. Both start from the same weights (copied with
rnn.interop) and see the same batch. This is a measurement, not a test: nothing here asserts a time.

    python benchmarks/speed.py                                  # 64x200x100x128, rnn/gru/lstm
    python benchmarks/speed.py --shape all --vs-torch --json    # three shapes, one JSON line each
    python benchmarks/speed.py --shape 32x100x64x64 --cells lstm --lengths random --no-flush
    python benchmarks/speed.py --vs-torch --workers 2 --repeats 9   # data-parallel NumPy vs torch

Shapes are B x T x E x H (batch, steps, embedding size, hidden size), or a comma list of them. The
GRU is built with reset_after=True, the form torch implements. Ratios are NumPy time / torch time
(above 1: NumPy is slower). peak_rss_mb is the whole process's peak so far, torch included when it
is loaded (worker processes not included: workers_peak_rss_mb is the largest ended worker's); the
table ends with both.

With --workers N, NumPy runs the step as training does (rnn.parallel): once in this process with
one BLAS thread (1 worker, what workers: 1 does) and once over N worker processes with one BLAS
thread each; torch keeps --threads threads. The ratios then compare N workers with torch, and
speed-up is the 1-worker time over the N-worker time (at most N). The default shapes are then
64x200x100x128 and 128x200x100x128.

Every row also has the GEMM floor: the time of the step's matrix products alone, in the layer's
shapes, on this machine in the same run (one worker's share on one thread with --workers), and each
side's time over it; the run starts with the CPU's vector flags and the BLAS kernel NumPy uses.
--clock cpu (one thread, one process) times CPU instead of wall time, for a machine shared with
other work. benchmarks/README.md has the fields and the measurements.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

SHAPES = {"default": ["64x200x100x128"],
          "all": ["32x100x64x64", "64x200x100x128", "128x400x128x256"],
          "workers": ["64x200x100x128", "128x200x100x128"]}
QUICK = {"shape": "4x5x8x8", "repeats": 1, "warmup": 0, "vocab": 50}
CELLS = ("rnn", "gru", "lstm")
SETTLE_S = 0.3        # pause before each timed call when two libraries alternate


def parse_shape(text: str) -> list[tuple[int, int, int, int]]:
    """'default', 'all', 'workers' or explicit 'BxTxExH' (comma list) -> list of (B, T, E, H)."""
    specs = SHAPES.get(text, text.split(","))
    shapes = []
    for spec in specs:
        if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){3}", spec):
            raise argparse.ArgumentTypeError(
                f"shape must be 'default', 'all', 'workers' or BxTxExH with positive integers "
                f"(comma list), got {text!r}")
        shapes.append(tuple(int(v) for v in spec.split("x")))
    return shapes


def parse_cells(text: str) -> list[str]:
    cells = text.split(",")
    bad = [c for c in cells if c not in CELLS]
    if bad or not cells:
        raise argparse.ArgumentTypeError(f"cells must be a comma list of {', '.join(CELLS)}, got {text!r}")
    return cells


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=parse_shape, default=None,
                    help="'default' (64x200x100x128), 'all' (also 32x100x64x64 and 128x400x128x256), "
                         "'workers' (64x200x100x128 and 128x200x100x128, the default with --workers) "
                         "or explicit BxTxExH, comma-separated")
    ap.add_argument("--cells", type=parse_cells, default=list(CELLS), help="comma list, default rnn,gru,lstm")
    ap.add_argument("--repeats", type=positive, default=7, help="timed steps per measurement (median)")
    ap.add_argument("--warmup", type=non_negative, default=1, help="untimed steps before timing")
    ap.add_argument("--threads", type=positive, default=os.cpu_count() or 1,
                    help="BLAS/OpenMP threads for NumPy and torch (default: all cores); with "
                         "--workers for torch only")
    ap.add_argument("--workers", type=positive, default=None,
                    help="also time NumPy data-parallel over this many worker processes (rnn.parallel)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: shape 4x5x8x8, vocabulary 50, 1 repeat, no warm-up")
    ap.add_argument("--lengths", choices=("full", "random"), default="full",
                    help="full: every sequence has T tokens; random: uniform in [1, T] (torch packs)")
    ap.add_argument("--vocab", type=positive, default=20_000)
    ap.add_argument("--vs-torch", action="store_true", help="also time the same model in PyTorch")
    ap.add_argument("--no-flush", action="store_true",
                    help="keep denormals: our backward's flushing off, torch.set_flush_denormal(False)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: this process's CPU time (time.process_time), which "
                         "other processes on a shared machine hardly change; only with --threads 1 and "
                         "without --workers (worker processes are not counted, threads are summed)")
    args = ap.parse_args(argv)
    if args.clock == "cpu" and (args.workers or args.threads != 1):
        ap.error("--clock cpu needs --threads 1 and no --workers: it counts this process's CPU time")
    if args.quick:
        args.shape, args.repeats, args.warmup, args.vocab = (parse_shape(QUICK["shape"]), QUICK["repeats"],
                                                             QUICK["warmup"], QUICK["vocab"])
    if args.shape is None:
        args.shape = parse_shape("workers" if args.workers else "default")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
# the machine's own OpenBLAS settings, before this script sets the thread count below
INHERITED_OPENBLAS = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")}
if ARGS is not None:
    # OpenBLAS reads its thread count once, when NumPy loads it: set it before the import below.
    # With --workers, NumPy keeps one thread per process, as training does; torch.set_num_threads
    # gives torch its --threads.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(1 if ARGS.workers else ARGS.threads)

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rnn.recurrent  # noqa: E402
from rnn.interop import to_torch_model_state  # noqa: E402
from rnn.model import ModelConfig, SentimentModel  # noqa: E402
from rnn.optim import Adam  # noqa: E402
from rnn.parallel import make_runner  # noqa: E402


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def make_batch(B: int, T: int, vocab: int, lengths_mode: str, rng: np.random.Generator):
    """Random token ids (B, T) right-padded with 0, lengths (B,), labels (B,) in {0, 1}."""
    lengths = np.full(B, T) if lengths_mode == "full" else rng.integers(1, T + 1, B)
    ids = rng.integers(1, vocab, (B, T))
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return ids, lengths, rng.integers(0, 2, B).astype(np.float32)


def make_model(cell: str, E: int, H: int, vocab: int, rng: np.random.Generator) -> SentimentModel:
    config = ModelConfig(vocab_size=vocab, cell=cell, embed_dim=E, hidden_size=H,
                         reset_after=True, dtype="float32")
    return SentimentModel.create(config, rng)


def numpy_side(model: SentimentModel, batch, workers: int | None):
    """(train_step, infer, close) of our model: in this process (workers None or 1) or on a pool."""
    optimizer = Adam(lr=1e-3)
    ids, lengths, labels = batch
    if workers is None:                                   # the plain model, as before rnn.parallel
        def train_step():
            _, grads, _, _ = model.loss(ids, lengths, labels)
            optimizer.step(model.params, grads)

        def infer():
            model.forward(ids, lengths, keep_cache=False)     # what prediction runs

        return train_step, infer, lambda: None
    runner = make_runner(model, {"ids": ids, "lengths": lengths, "labels": labels}, workers)
    rows = np.arange(len(lengths))

    def train_step():                                     # what fit does, less norms and clipping
        _, grads, _ = runner.gradients(rows, seed=0)
        optimizer.step(model.params, grads)

    def infer():
        runner.predict_logits(ids, lengths, len(lengths))

    return train_step, infer, runner.close


def torch_side(torch, model: SentimentModel, batch, packed: bool):
    """The same network in torch (weights copied from ours), and its (train_step, infer) closures."""
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence

    cfg = model.config
    cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cfg.cell]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)  # dense grads
            self.rnn = cls(cfg.embed_dim, cfg.hidden_size, batch_first=True)
            self.fc = nn.Linear(cfg.hidden_size, 1)

        def forward(self, ids, lengths):
            x = self.embedding(ids)
            if packed:
                x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, h_n = self.rnn(x)
            h_n = h_n[0] if isinstance(h_n, tuple) else h_n
            return self.fc(h_n[-1])[:, 0]

    net = Net()
    net.load_state_dict({k: torch.from_numpy(v.copy())
                         for k, v in to_torch_model_state(cfg, model.params).items()}, strict=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    ids, lengths, labels = (torch.from_numpy(np.asarray(a)) for a in batch)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(ids, lengths), labels).backward()
        optimizer.step()

    def infer():
        with torch.inference_mode():
            net(ids, lengths)

    return train_step, infer


def timed(fn, clock=time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10     # bytes vs KiB


def children_peak_rss_mb() -> float:
    """Peak RSS of the largest finished child process (the worker processes, once closed)."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


VECTOR_FLAGS = re.compile(r"sse4_2|avx\w*|fma|f16c|amx\w*")


def machine_info() -> dict:
    """What the figures depend on: the CPU's vector flags (/proc/cpuinfo), the BLAS NumPy loaded
    and the kernel it chose (threadpoolctl, when installed), and the OpenBLAS variables the machine
    set (before this script set the thread count)."""
    flags, model = [], None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            if key.strip() == "flags":
                flags = sorted(f for f in value.split() if VECTOR_FLAGS.fullmatch(f))
                break
    except OSError:
        pass
    blas = None
    try:
        from threadpoolctl import threadpool_info
        blas = [{"library": Path(lib.get("filepath", "")).name,
                 **{k: lib.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}}
                for lib in threadpool_info() if lib.get("user_api") == "blas"]
    except ImportError:
        pass
    return {"cpu_model": model, "cpu_vector_flags": flags, "blas": blas,
            "openblas_env": INHERITED_OPENBLAS}


def step_flops(G: int, B: int, T: int, E: int, H: int) -> tuple[float, float]:
    """(training step, inference) FLOPs of the matrix products: the input projection, the recurrent
    product at every step, and in training their two gradients each (dW_x, dX, dW_h, da_prev)."""
    forward = 2.0 * T * B * G * H * (E + H)
    return 3 * forward, forward


def gemm_floor(G: int, B: int, T: int, E: int, H: int, repeats: int = 3, clock=time.perf_counter
               ) -> tuple[float, float]:
    """(training, inference) seconds this process takes for the matrix products alone of one step
    of B rows, as the layer does them (best of `repeats`, timed with `clock`): a floor no
    implementation on this BLAS and these threads goes below."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    X, W_x = rng.random((T * B, E), f32), rng.random((E, G * H), f32)
    W_h, a = rng.random((G, H, H), f32), rng.random((B, H), f32)
    dZ, gates = rng.random((T * B, G * H), f32), np.empty((G, B, H), f32)
    dz = rng.random((G, B, H), f32)

    def forward():
        X @ W_x
        for _ in range(T):
            np.matmul(a, W_h, out=gates)

    def backward():
        for _ in range(T):
            np.matmul(dz, W_h, out=gates)
        X.T @ dZ, dZ @ W_x.T
        np.matmul(rng.random((H, T * B), f32), dZ)

    def timed_by_clock(fn) -> float:
        start = clock()
        fn()
        return clock() - start

    infer = min(timed_by_clock(forward) for _ in range(repeats))
    return infer + min(timed_by_clock(backward) for _ in range(repeats)), infer


def set_numpy_flush(flush: bool) -> bool:
    """Ask our backward loop to flush denormals or not; returns what it will actually do."""
    if hasattr(rnn.recurrent, "FLUSH_DENORMALS"):
        rnn.recurrent.FLUSH_DENORMALS = flush
    elif not flush:
        print("warning: rnn.recurrent has no FLUSH_DENORMALS switch; our side still flushes",
              file=sys.stderr)
    return bool(getattr(rnn.recurrent, "FLUSH_DENORMALS", True))


def load_torch(args):
    try:
        import torch
    except ImportError:
        print("warning: torch is not installed; --vs-torch columns are null", file=sys.stderr)
        return None
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(not args.no_flush)
    return torch


def bench(cell: str, shape: tuple, args, torch) -> dict:
    B, T, E, H = shape
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rng = np.random.default_rng(args.seed)
    batch = make_batch(B, T, args.vocab, args.lengths, rng)
    model = make_model(cell, E, H, args.vocab, rng)
    sides, closers = {}, []
    try:
        # each NumPy side trains its own copy (a pool serves one model); torch starts from `model`
        for workers in (sorted({1, args.workers}) if args.workers else [None]):
            name = "numpy_workers" if workers and workers > 1 else "numpy"
            train_step, infer, close = numpy_side(model.astype(np.float32), batch, workers)
            closers.append(close)
            sides[name] = (train_step, infer)
        if torch is not None:
            sides["torch"] = torch_side(torch, model, batch, packed=args.lengths == "random")
        med = time_sides(sides, args)
    finally:
        for close in closers:
            close()
    tokens = int(batch[1].sum())
    best = "numpy_workers" if "numpy_workers" in sides else "numpy"
    # the products of one worker's share on its one core, or of the whole batch on this process
    G = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
    share = -(-B // args.workers) if args.workers else B
    floor_train, floor_infer = gemm_floor(G, share, T, E, H, clock=CLOCKS[args.clock])
    flops_train, flops_infer = step_flops(G, B, T, E, H)
    share_train, _ = step_flops(G, share, T, E, H)

    def get(side, what, per_token=False):
        if side not in sides:
            return None
        return tokens / med[side, what] if per_token else med[side, what]

    def ratio(a, b, what):
        return med[a, what] / med[b, what] if a in sides and b in sides else None

    def at_floor(side, what):
        """The side's time over the GEMM floor's: 1.0 would be nothing but matrix products."""
        return med[side, what] / (floor_train if what == "train" else floor_infer) if side in sides else None

    return {
        "cell": cell, "batch": B, "steps": T, "embed": E, "hidden": H, "vocab": args.vocab,
        "lengths": args.lengths, "tokens": tokens, "threads": args.threads, "repeats": args.repeats,
        "clock": args.clock,
        "workers": args.workers,
        "numpy_train_step_s": get("numpy", "train"),
        "numpy_tokens_per_s": get("numpy", "train", True),
        "numpy_infer_s": get("numpy", "infer"),
        "numpy_infer_tokens_per_s": get("numpy", "infer", True),
        "numpy_workers_train_step_s": get("numpy_workers", "train"),
        "numpy_workers_tokens_per_s": get("numpy_workers", "train", True),
        "numpy_workers_infer_s": get("numpy_workers", "infer"),
        "numpy_workers_infer_tokens_per_s": get("numpy_workers", "infer", True),
        "torch_train_step_s": get("torch", "train"),
        "torch_tokens_per_s": get("torch", "train", True),
        "torch_infer_s": get("torch", "infer"),
        "torch_infer_tokens_per_s": get("torch", "infer", True),
        "train_ratio": ratio(best, "torch", "train"), "infer_ratio": ratio(best, "torch", "infer"),
        "workers_train_speedup": ratio("numpy", "numpy_workers", "train"),
        "workers_infer_speedup": ratio("numpy", "numpy_workers", "infer"),
        "train_gflop": flops_train / 1e9, "infer_gflop": flops_infer / 1e9,
        "gemm_floor_train_s": floor_train, "gemm_floor_infer_s": floor_infer,
        "gemm_gflops": share_train / floor_train / 1e9,
        "numpy_train_vs_floor": at_floor(best, "train"), "numpy_infer_vs_floor": at_floor(best, "infer"),
        "torch_train_vs_floor": at_floor("torch", "train"), "torch_infer_vs_floor": at_floor("torch", "infer"),
        "peak_rss_mb": round(peak_rss_mb(), 1), "workers_peak_rss_mb": round(children_peak_rss_mb(), 1),
        # the machine's 1-minute load average before and after: other processes on these cores
        # slow torch's threads (which spin and wait for each other) more than our processes
        "load_average": [load_before, os.getloadavg()[0] if load_before is not None else None],
        "flush": not args.no_flush, "numpy_flush": args.numpy_flush,
        "numpy_version": np.__version__, "torch_version": torch.__version__ if torch is not None else None,
        **args.machine,
    }


def time_sides(sides: dict, args) -> dict:
    """{(side, "train" | "infer"): median seconds}, the sides' calls alternating."""
    for train_step, infer in sides.values():
        for _ in range(args.warmup):
            train_step()
            infer()
    times = {(side, what): [] for side in sides for what in ("train", "infer")}
    for _ in range(args.repeats):            # alternate, so all sides share any change in load
        for what, k in (("train", 0), ("infer", 1)):
            for side, fns in sides.items():
                if len(sides) > 1:
                    # After a call, OpenBLAS's worker threads spin for ~2^28 cycles (~0.1 s) and
                    # OpenMP's a little: without a pause the side timed next would share its
                    # cores with the other side's idle threads (seen: torch's LSTM step 0.154 s
                    # here against 0.100 s alone). Idle pool workers wait in a read, not a spin.
                    time.sleep(SETTLE_S)
                times[side, what].append(timed(fns[k], CLOCKS[args.clock]))
    return {key: statistics.median(v) for key, v in times.items()}


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table_header(args) -> None:
    if args.workers:
        n = f"{args.workers} wk"
        print(f"{'':5} {'':>16} {'training step (s)':^28} {'':6} {'':>8}   "
              f"{'inference (tokens/s)':^32} {'':6} {'':>8}")
        print(f"{'cell':5} {'BxTxExH':>16} {'1 worker':>8} {n:>9} {'torch':>9} {'ratio':>6} {'speed-up':>8}   "
              f"{'1 worker':>10} {n:>10} {'torch':>10} {'ratio':>6} {'speed-up':>8}   "
              f"{'floor s':>8} {'np/floor':>8} {'pt/floor':>8}")
        return
    print(f"{'cell':5} {'BxTxExH':>16} {'train s':>9} {'torch s':>9} {'ratio':>6} "
          f"{'tok/s':>9} {'infer tok/s':>11} {'torch':>11} {'ratio':>6} {'rss MB':>8} "
          f"{'floor s':>8} {'np/floor':>8} {'pt/floor':>8}")


def print_table_row(r: dict) -> None:
    shape = f"{r['batch']}x{r['steps']}x{r['embed']}x{r['hidden']}"
    if r["workers"]:
        many = r["workers"] > 1
        print(f"{r['cell']:5} {shape:>16} {fmt(r['numpy_train_step_s'], '8.4f')} "
              f"{fmt(r['numpy_workers_train_step_s'] if many else r['numpy_train_step_s'], '9.4f')} "
              f"{fmt(r['torch_train_step_s'], '9.4f'):>9} {fmt(r['train_ratio'], '6.2f'):>6} "
              f"{fmt(r['workers_train_speedup'], '8.2f'):>8}   "
              f"{fmt(r['numpy_infer_tokens_per_s'], '10.0f')} "
              f"{fmt(r['numpy_workers_infer_tokens_per_s'] if many else r['numpy_infer_tokens_per_s'], '10.0f')} "
              f"{fmt(r['torch_infer_tokens_per_s'], '10.0f'):>10} {fmt(r['infer_ratio'], '6.2f'):>6} "
              f"{fmt(r['workers_infer_speedup'], '8.2f'):>8}   {r['gemm_floor_train_s']:8.4f} "
              f"{fmt(r['numpy_train_vs_floor'], '8.2f')} {fmt(r['torch_train_vs_floor'], '8.2f'):>8}", flush=True)
        return
    print(f"{r['cell']:5} {shape:>16} {fmt(r['numpy_train_step_s'], '9.4f')} "
          f"{fmt(r['torch_train_step_s'], '9.4f'):>9} {fmt(r['train_ratio'], '6.2f'):>6} "
          f"{fmt(r['numpy_tokens_per_s'], '9.0f')} {fmt(r['numpy_infer_tokens_per_s'], '11.0f')} "
          f"{fmt(r['torch_infer_tokens_per_s'], '11.0f'):>11} {fmt(r['infer_ratio'], '6.2f'):>6} "
          f"{r['peak_rss_mb']:8.0f} {r['gemm_floor_train_s']:8.4f} {fmt(r['numpy_train_vs_floor'], '8.2f')} "
          f"{fmt(r['torch_train_vs_floor'], '8.2f'):>8}", flush=True)


def describe_machine(m: dict) -> str:
    blas = "; ".join(f"{b['internal_api']} {b['version']} kernel {b['architecture']}, {b['num_threads']} thread(s)"
                     f" ({b['library']})" for b in m["blas"] or []) or "unknown (pip install threadpoolctl)"
    env = " ".join(f"{k}={v}" for k, v in m["openblas_env"].items()) or "none"
    return (f"cpu: {m['cpu_model']}; vector flags: {' '.join(m['cpu_vector_flags']) or 'unknown'}\n"
            f"numpy BLAS: {blas}; OPENBLAS_* variables set by the machine: {env}")


def main(args: argparse.Namespace) -> None:
    args.numpy_flush = set_numpy_flush(not args.no_flush)
    torch = load_torch(args) if args.vs_torch else None
    args.machine = machine_info()
    if not args.json:
        print(describe_machine(args.machine))
        workers = (f"workers={args.workers} (1 BLAS thread each; torch {args.threads} threads) "
                   if args.workers else f"threads={args.threads} ")
        print(f"{workers}lengths={args.lengths} repeats={args.repeats} clock={args.clock} "
              f"flush={not args.no_flush} (ours: {args.numpy_flush}) float32; ratio = numpy time / torch "
              f"time{f' with {args.workers} workers; speed-up = 1 worker / {args.workers}' if args.workers else ''}")
        print_table_header(args)
    for shape in args.shape:
        for cell in args.cells:
            row = bench(cell, shape, args, torch)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print_table_row(row)
    if not args.json:       # the workers table has no column for it
        print(f"peak RSS: {peak_rss_mb():.0f} MB this process, {children_peak_rss_mb():.0f} MB the largest ended "
              "worker process", flush=True)


if __name__ == "__main__":
    main(ARGS)
