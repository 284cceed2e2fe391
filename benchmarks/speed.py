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

Shapes are B x T x E x H (batch, steps, embedding size, hidden size). The GRU is built with
reset_after=True, the form torch implements. Ratios are NumPy time / torch time (above 1: NumPy is
slower). peak_rss_mb is the whole process's peak so far, torch included when it is loaded.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

SHAPES = {"default": ["64x200x100x128"],
          "all": ["32x100x64x64", "64x200x100x128", "128x400x128x256"]}
CELLS = ("rnn", "gru", "lstm")
SETTLE_S = 0.3        # pause before each timed call when two libraries alternate


def parse_shape(text: str) -> list[tuple[int, int, int, int]]:
    """'default', 'all' or an explicit 'BxTxExH' -> list of (B, T, E, H)."""
    specs = SHAPES.get(text, [text])
    shapes = []
    for spec in specs:
        if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*){3}", spec):
            raise argparse.ArgumentTypeError(
                f"shape must be 'default', 'all' or BxTxExH with positive integers, got {text!r}")
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
    ap.add_argument("--shape", type=parse_shape, default=parse_shape("default"),
                    help="'default' (64x200x100x128), 'all' (also 32x100x64x64 and 128x400x128x256) "
                         "or an explicit BxTxExH")
    ap.add_argument("--cells", type=parse_cells, default=list(CELLS), help="comma list, default rnn,gru,lstm")
    ap.add_argument("--repeats", type=positive, default=7, help="timed steps per measurement (median)")
    ap.add_argument("--warmup", type=non_negative, default=1, help="untimed steps before timing")
    ap.add_argument("--threads", type=positive, default=os.cpu_count() or 1,
                    help="BLAS/OpenMP threads for NumPy and torch (default: all cores)")
    ap.add_argument("--lengths", choices=("full", "random"), default="full",
                    help="full: every sequence has T tokens; random: uniform in [1, T] (torch packs)")
    ap.add_argument("--vocab", type=positive, default=20_000)
    ap.add_argument("--vs-torch", action="store_true", help="also time the same model in PyTorch")
    ap.add_argument("--no-flush", action="store_true",
                    help="keep denormals: our backward's flushing off, torch.set_flush_denormal(False)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # OpenBLAS reads its thread count once, when NumPy loads it: set it before the import below.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

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


def make_batch(B: int, T: int, vocab: int, lengths_mode: str, rng: np.random.Generator):
    """Random token ids (B, T) right-padded with 0, lengths (B,), labels (B,) in {0, 1}."""
    lengths = np.full(B, T) if lengths_mode == "full" else rng.integers(1, T + 1, B)
    ids = rng.integers(1, vocab, (B, T))
    ids[np.arange(T)[None, :] >= lengths[:, None]] = 0
    return ids, lengths, rng.integers(0, 2, B).astype(np.float32)


def numpy_side(cell: str, E: int, H: int, vocab: int, batch, rng: np.random.Generator):
    """Our model and its (train_step, infer) closures."""
    config = ModelConfig(vocab_size=vocab, cell=cell, embed_dim=E, hidden_size=H,
                         reset_after=True, dtype="float32")
    model = SentimentModel.create(config, rng)
    optimizer = Adam(lr=1e-3)
    ids, lengths, labels = batch

    def train_step():
        _, grads, _, _ = model.loss(ids, lengths, labels)
        optimizer.step(model.params, grads)

    def infer():
        model.forward(ids, lengths, keep_cache=False)     # what prediction runs

    return model, train_step, infer


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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10     # bytes vs KiB


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
    rng = np.random.default_rng(args.seed)
    batch = make_batch(B, T, args.vocab, args.lengths, rng)
    model, np_train, np_infer = numpy_side(cell, E, H, args.vocab, batch, rng)
    sides = {"numpy": (np_train, np_infer)}
    if torch is not None:
        sides["torch"] = torch_side(torch, model, batch, packed=args.lengths == "random")
    for train_step, infer in sides.values():
        for _ in range(args.warmup):
            train_step()
            infer()
    times = {(side, what): [] for side in sides for what in ("train", "infer")}
    for _ in range(args.repeats):            # alternate, so both sides share any change in load
        for what, k in (("train", 0), ("infer", 1)):
            for side, fns in sides.items():
                if len(sides) > 1:
                    # After a call, OpenBLAS's worker threads spin for ~2^28 cycles (~0.1 s) and
                    # OpenMP's a little: without a pause the side timed next would share its
                    # cores with the other side's idle threads (seen: torch's LSTM step 0.154 s
                    # here against 0.100 s alone).
                    time.sleep(SETTLE_S)
                times[side, what].append(timed(fns[k]))
    med = {key: statistics.median(v) for key, v in times.items()}
    tokens = int(batch[1].sum())
    has_torch = "torch" in sides

    def ratio(what):
        return med["numpy", what] / med["torch", what] if has_torch else None

    return {
        "cell": cell, "batch": B, "steps": T, "embed": E, "hidden": H, "vocab": args.vocab,
        "lengths": args.lengths, "tokens": tokens, "threads": args.threads, "repeats": args.repeats,
        "numpy_train_step_s": med["numpy", "train"],
        "numpy_tokens_per_s": tokens / med["numpy", "train"],
        "numpy_infer_s": med["numpy", "infer"],
        "numpy_infer_tokens_per_s": tokens / med["numpy", "infer"],
        "torch_train_step_s": med["torch", "train"] if has_torch else None,
        "torch_tokens_per_s": tokens / med["torch", "train"] if has_torch else None,
        "torch_infer_s": med["torch", "infer"] if has_torch else None,
        "torch_infer_tokens_per_s": tokens / med["torch", "infer"] if has_torch else None,
        "train_ratio": ratio("train"), "infer_ratio": ratio("infer"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "flush": not args.no_flush, "numpy_flush": args.numpy_flush,
        "numpy_version": np.__version__, "torch_version": torch.__version__ if has_torch else None,
    }


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table_header() -> None:
    print(f"{'cell':5} {'BxTxExH':>16} {'train s':>9} {'torch s':>9} {'ratio':>6} "
          f"{'tok/s':>9} {'infer tok/s':>11} {'torch':>11} {'ratio':>6} {'rss MB':>8}")


def print_table_row(r: dict) -> None:
    shape = f"{r['batch']}x{r['steps']}x{r['embed']}x{r['hidden']}"
    print(f"{r['cell']:5} {shape:>16} {fmt(r['numpy_train_step_s'], '9.4f')} "
          f"{fmt(r['torch_train_step_s'], '9.4f'):>9} {fmt(r['train_ratio'], '6.2f'):>6} "
          f"{fmt(r['numpy_tokens_per_s'], '9.0f')} {fmt(r['numpy_infer_tokens_per_s'], '11.0f')} "
          f"{fmt(r['torch_infer_tokens_per_s'], '11.0f'):>11} {fmt(r['infer_ratio'], '6.2f'):>6} "
          f"{r['peak_rss_mb']:8.0f}", flush=True)


def main(args: argparse.Namespace) -> None:
    args.numpy_flush = set_numpy_flush(not args.no_flush)
    torch = load_torch(args) if args.vs_torch else None
    if not args.json:
        print(f"threads={args.threads} lengths={args.lengths} repeats={args.repeats} "
              f"flush={not args.no_flush} (ours: {args.numpy_flush}) float32; "
              f"ratio = numpy time / torch time")
        print_table_header()
    for shape in args.shape:
        for cell in args.cells:
            row = bench(cell, shape, args, torch)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print_table_row(row)


if __name__ == "__main__":
    main(ARGS)
