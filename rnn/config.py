"""What the package knows about its models and training, in one place: the cells and their gate
counts, the choice lists, and the two configuration records `ModelConfig` and `TrainConfig`.

Standard library only: the pipeline's settings (stages/settings.py) check params.yaml against these
lists without loading any model code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

CELLS = ("rnn", "gru", "lstm")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}            # G: gate blocks of a cell's (D, G*H) weights
POOLINGS = ("last", "mean", "max", "concat")       # concat: [last, mean, max] side by side
TASKS = ("sentiment", "language_model")
OPTIMIZERS = ("sgd", "adam", "adamw")
CLIP_MODES = ("none", "value", "norm")
TRUNCATE_MODES = ("head", "tail", "both")          # which tokens of a long review are kept
PROBE_VARIANTS = ("signal", "order")               # the memory probe's tasks (rnn/probe.py)
MAX_LEN = 10_000                                   # tokens per review at most (IMDB's longest: ~2,500)
# Bytes of UTF-8 a review may have, in an archive or sent to a served model (IMDB's largest: 14 KB):
# reading or tokenizing more would only use memory.
MAX_REVIEW_BYTES = 1 << 20


def cell_kind(cell: str, reset_after: bool = False) -> str:
    """The key of a configured cell in rnn.cells' registry: 'gru' splits by its `reset_after` switch."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}: expected one of {', '.join(CELLS)}")
    return "gru_after" if cell == "gru" and reset_after else cell


def model_size(cell: str, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int,
               bidirectional: bool) -> int:
    """Parameters of the encoder (embedding and recurrent layers) with a one-logit head: the order of
    magnitude a size limit needs. Not counted: concat pooling's wider head (3x), GRU's reset_after (H per
    layer) and a language model's output layer (vocab_size x (H + 1))."""
    G, H, dirs = GATES[cell], hidden_size, 2 if bidirectional else 1
    recurrent = sum(dirs * G * H * ((embed_dim if k == 0 else dirs * H) + H + 1) for k in range(num_layers))
    return vocab_size * embed_dim + recurrent + dirs * H + 1


@dataclass
class ModelConfig:
    """Everything that fixes the model's shape and behaviour; built from params.yaml by the stages."""
    vocab_size: int
    cell: str = "lstm"                # rnn | gru | lstm
    embed_dim: int = 100
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0              # between layers and before the dense layer; the library's own
                                      # default is none, the pipeline's 0.5 (params.yaml) was measured
    pooling: str = "last"             # last | mean | max | concat (sentiment only); the library's own
                                      # default is the article's last state, the pipeline's concat
                                      # (params.yaml) was measured
    reset_after: bool = False         # GRU only: False = the article's form, True = PyTorch's
    forget_bias: float = 1.0          # LSTM only: initial forget-gate bias
    freeze_embedding: bool = False
    embed_dropout: float = 0.0        # dropout on the embedded input: one mask per sequence, the
                                      # same at every step (a dropped feature stays dropped)
    adversarial_epsilon: float = 0.0  # adversarial training (sentiment, training only): the size of the
                                      # perturbation of the embedded review, in units of the review's
                                      # root-mean-square word-vector norm; 0 = off
    adversarial_weight: float = 1.0   # ... the weight of the loss at the perturbed input
    task: str = "sentiment"           # sentiment | language_model: which head (and model class)
    num_sampled: int = 1024           # language model: candidates drawn per step for the sampled softmax
    dtype: str = "float32"

    def __post_init__(self):
        cell_kind(self.cell, self.reset_after)
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        for name in ("dropout", "embed_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        for name in ("adversarial_epsilon", "adversarial_weight"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.task == "language_model" and self.bidirectional:
            raise ValueError("a language model reads left to right: bidirectional must be false")
        if int(self.num_sampled) < 1:
            raise ValueError(f"num_sampled must be >= 1, got {self.num_sampled}")

    @property
    def kind(self) -> str:
        return cell_kind(self.cell, self.reset_after)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        return cls(**d)


@dataclass
class TrainConfig:
    """How `rnn.train.fit` trains: epochs, batches, clipping, schedule, early stopping, tracing."""
    epochs: int = 5              # the pipeline's 4 (params.yaml: measured with adversarial training)
    batch_size: int = 64
    clip_mode: str = "norm"      # none | value | norm
    clip_threshold: float = 5.0
    lr_decay: float = 1.0        # the learning rate of epoch e is lr * lr_decay ** (e - 1); the library's
                                 # own default is constant, the pipeline halves it (params.yaml, measured)
    warmup_steps: int = 0        # the learning rate rises linearly over the run's first n updates; 0: off
    ema_decay: float = 0.0       # validate and keep an exponential moving average of the weights, updated
                                 # after every step with this decay, in [0, 1); 0: off, the weights as they are
    patience: int = 2            # epochs without a better validation accuracy before stopping; 0: never
    trace: bool = True           # record the per-timestep gradient trace
    trace_every: int = 1         # ... every this many steps
    workers: int | str = 1       # processes computing each batch (and validation); "auto": all cores

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
