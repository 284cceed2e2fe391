"""Every setting in params.yaml: one pydantic model per section, the per-cell merge, and one hash.

Each stage reads its settings through `load`, so a typo or an out-of-range value anywhere in the file
fails before any work, in one line naming the file, the dotted key and the value. The models' defaults
are the one source of every default; params.yaml writes them out (a test holds them equal).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from rnn.config import (CELLS, CLIP_MODES, GATES, MAX_LEN, OPTIMIZERS, POOLINGS, PROBE_VARIANTS, TRUNCATE_MODES,
                        ModelConfig, TrainConfig, model_size)
from rnn.errors import InputError

# What one process may build: a typo such as hidden_size: 1000000 is refused in one line, not met by a
# MemoryError after DVC removed the outputs (~16 bytes per parameter with Adam, ~4 per cached value).
MAX_PARAMETERS = 100_000_000    # default classifiers: 2.1 M (the embedding 2.0 M); language models 4.7 M
MAX_ACTIVATIONS = 500_000_000   # values cached per training step; defaults: 20 M (lstm)


class ParamsError(InputError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


def did_you_mean(word: object, options, prefix: str = "") -> str:
    """' (did you mean <prefix><option>?)' for the option closest to `word` (case aside), else ''."""
    lowered = {str(o).lower(): str(o) for o in options}
    hint = difflib.get_close_matches(str(word).lower(), list(lowered), n=1)
    return f" (did you mean {prefix}{lowered[hint[0]]}?)" if hint else ""


def _check(test, why: str):
    """An after-validator: the value if `test(value)`, else a ValueError saying `why`."""
    def check(value):
        if not test(value):
            raise ValueError(why)
        return value
    return AfterValidator(check)


def _cells(value: list) -> list:
    if not value:
        raise ValueError("must list at least one of " + ", ".join(CELLS))
    for cell in value:
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}{did_you_mean(cell, CELLS)}; allowed: " + ", ".join(CELLS))
    if len(set(value)) != len(value):
        raise ValueError("lists a cell twice")
    return value


def _ints(v: list, low: int) -> bool:
    return all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in v)


Cells = Annotated[list, AfterValidator(_cells)]
Url = Annotated[str, _check(lambda v: re.match(r"^(https?|ftp|file)://\S+$", v), "must be an http(s), ftp or file URL")]
Md5 = Annotated[str, _check(lambda v: re.fullmatch(r"[0-9a-fA-F]{32}", v), "must be 32 hexadecimal digits")]
Int0 = Annotated[int, Field(ge=0)]
Int1 = Annotated[int, Field(ge=1)]
Dropout = Annotated[float, Field(ge=0, le=0.95)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Decay = Annotated[float, Field(gt=0, le=1)]


class Section(BaseModel):
    """strict: bool is no int (YAML `yes` would become 1), '5' no number; an int is accepted as float."""
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_mapping(cls, value, info):    # `clip:` with nothing under it means every default
        annotation = cls.model_fields[info.field_name].annotation
        return {} if value is None and isinstance(annotation, type) and issubclass(annotation, Section) else value


class Data(Section):
    url: Url = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
    md5: Md5 = "7c2ac02c03563afcf9b574c7e56c153a"
    limit: Optional[Annotated[int, Field(ge=4)]] = None    # 2 a class: one for training, one to validate
    retries: Int0 = 3
    timeout: Positive = 60.0


class Prepare(Section):
    max_len: Annotated[int, Field(ge=1, le=MAX_LEN)] = 600
    truncate: Literal[TRUNCATE_MODES] = "both"
    vocab_size: Annotated[int, Field(ge=2)] = 20000
    min_freq: Int1 = 2
    val_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.1
    seed: Int0 = 0


class Embed(Section):
    method: Literal["random", "pretrained", "svd"] = "svd"
    path: Optional[str] = None
    scale: Optional[Positive] = None
    seed: Int0 = 0
    context_size: Annotated[int, Field(ge=2)] = 10000
    window: Int1 = 5


class Clip(Section):
    mode: Literal[CLIP_MODES] = "norm"
    threshold: Positive = 5.0


class Adversarial(Section):
    """Adversarial training on the embeddings (rnn.model.adversarial_perturbation); epsilon 0 = off."""
    epsilon: Annotated[float, Field(ge=0, le=10)] = 0.1
    weight: Annotated[float, Field(ge=0, le=10)] = 1.0


class Fitting(Section):
    """What every training loop here is given (the classifier's defaults; pretrain sets its own)."""
    epochs: Int1 = 4
    batch_size: Int1 = 64
    lr: Positive = 0.002
    lr_decay: Decay = 0.5
    optimizer: Literal[OPTIMIZERS] = "adam"


class CellKnobs(Fitting):
    """The settings one cell trains with; `train.overrides.<cell>` may set any of them."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, le=0.999)] = 0.9
    hidden_size: Int1 = 128
    embed_dim: Int1 = 100
    num_layers: Int1 = 1
    bidirectional: bool = False
    dropout: Dropout = 0.5
    embed_dropout: Dropout = 0.0
    pooling: Literal[POOLINGS] = "concat"
    reset_after: bool = False
    forget_bias: float = 1.0
    freeze_embedding: bool = False
    init: Literal["lm", "embeddings"] = "lm"
    pretrained_lr_scale: Decay = 1.0
    clip: Clip = Clip()
    adversarial: Adversarial = Adversarial()
    warmup_steps: Int0 = 0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    patience: Int0 = 1
    trace: bool = True
    trace_every: Int1 = 1


Overrides = create_model("Overrides", __base__=Section, **{cell: (CellKnobs, CellKnobs()) for cell in CELLS})


class Train(CellKnobs):
    cells: Cells = list(CELLS)
    seeds: Annotated[list, _check(lambda v: v and len(v) <= 100 and _ints(v, 0) and len(set(v)) == len(v),
                                  "must be 1 to 100 distinct integers >= 0")] = [0, 1, 2]
    workers: Annotated[Any, _check(lambda v: v == "auto" or (type(v) is int and v >= 1),
                                   "must be an integer >= 1 or auto")] = "auto"
    overrides: Overrides = Overrides()


class Pretrain(Fitting):
    epochs: Int1 = 1
    batch_size: Int1 = 32
    lr: Positive = 0.005
    num_sampled: Int1 = 1024
    dropout: Dropout = 0.1
    embed_dropout: Dropout = 0.0
    clip: Clip = Clip()
    tokens_per_epoch: Optional[Int1] = None
    val_reviews: Int1 = 500
    seed: Int0 = 0


class Evaluate(Section):
    batch_size: Int1 = 256
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    length_edges: Annotated[list, _check(lambda v: _ints(v, 1) and all(b > a for a, b in zip(v, v[1:])),
                                         "must be strictly increasing positive integers")] = [100, 200, 400]
    roc_points: Annotated[int, Field(ge=2)] = 200


class Probe(Section):
    cells: Cells = list(CELLS)
    distances: Annotated[list, _check(lambda v: v and _ints(v, 0) and len(set(v)) == len(v),
                                      "must be distinct integers >= 0")] = [5, 10, 25, 50, 100, 200]
    lead: Int0 = 20
    train_distance: Literal["exact", "upto"] = "upto"
    variant: Literal[PROBE_VARIANTS] = "signal"
    distractors: Int0 = 0
    vocab_size: Annotated[int, Field(ge=7)] = 20
    embed_dim: Int1 = 16
    hidden_size: Int1 = 32
    batch_size: Int1 = 64
    steps: Int1 = 300
    test_size: Annotated[int, Field(ge=2)] = 1000
    optimizer: Literal[OPTIMIZERS] = "adam"
    lr: Positive = 0.01
    clip_mode: Literal[CLIP_MODES] = "norm"
    clip_threshold: Positive = 1.0
    trace_steps: Int1 = 20
    seed: Int0 = 0


class Compare(Section):
    resamples: Annotated[int, Field(ge=100, le=100_000)] = 2000
    seed: Int0 = 0


class Baseline(Section):
    """NBSVM over uni- (and bi-, tri-) grams of the full review text (stages/baseline.py)."""
    ngram_max: Annotated[int, Field(ge=1, le=3)] = 2
    min_df: Int1 = 2
    max_features: Optional[Int1] = None
    alpha: Positive = 1.0
    C: Positive = 1.0
    beta: Annotated[float, Field(ge=0, le=1)] = 0.5
    seed: Int0 = 0


class Mlflow(Section):
    enabled: bool = True
    experiment: str = "imdb-sentiment"
    probe_experiment: str = "memory-probe"
    pretrain_experiment: str = "language-models"
    log_every_steps: Int1 = 200
    system_metrics_every: Annotated[float, Field(ge=0)] = 10.0
    register_: bool = Field(False, alias="register")      # `register` would shadow ABCMeta.register


SECTIONS = {"data": Data, "prepare": Prepare, "embed": Embed, "pretrain": Pretrain, "train": Train,
            "evaluate": Evaluate, "compare": Compare, "probe": Probe, "baseline": Baseline, "mlflow": Mlflow}
AllParams = create_model("AllParams", __base__=Section, **{name: (m, m()) for name, m in SECTIONS.items()})
CELL_KNOBS = tuple(CellKnobs.model_fields)


Params = dict       # the validated params: {section: {key: value}}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)
for _ch in "-+0123456789":       # integers must keep winning over the float resolver above
    _Loader.yaml_implicit_resolvers[_ch] = sorted(
        _Loader.yaml_implicit_resolvers[_ch], key=lambda r: r[0] != "tag:yaml.org,2002:int")


def read_yaml(path: str | Path) -> dict:
    """The params file as a plain mapping, unvalidated; one-line error if it is unusable."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ParamsError(f"{path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def uncommitted_changes(root: Path) -> str:
    """'params.yaml differs from the committed one in a.b (1 -> 2), ...: undo with `git checkout
    params.yaml`', or '' outside git, without a committed params.yaml, or when nothing differs."""
    try:
        committed = subprocess.run(["git", "show", "HEAD:./params.yaml"], cwd=root, capture_output=True,
                                   timeout=10, check=True).stdout.decode("utf-8")
        old, new = (yaml.load(text, Loader=_Loader) for text in (committed, (root / "params.yaml").read_text("utf-8")))
    except (OSError, ValueError, subprocess.SubprocessError, yaml.YAMLError):
        return ""
    before, after = (flatten(tree if isinstance(tree, dict) else {}) for tree in (old, new))
    keys = [k for k in sorted(before.keys() | after.keys()) if before.get(k, ...) != after.get(k, ...)]
    if not keys:
        return ""

    def quote(value: object) -> str:      # at most 60 characters of a value
        text = "absent" if value is ... else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    shown = ", ".join(f"{k} ({quote(before.get(k, ...))} -> {quote(after.get(k, ...))})" for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return (f"params.yaml differs from the committed one in {shown}{more} (a `dvc exp run -S` leaves its values "
            "there): undo with `git checkout params.yaml`")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train.clip.mode": value, ...} of a nested mapping, keys under `prefix` (an empty mapping is a value)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return flat


def load(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole params file (see `validate`)."""
    return validate(read_yaml(path), Path(path).name)


def validate(raw: dict, source: str = "params.yaml") -> Params:
    """Every section checked, defaults filled in; `train.overrides` keeps only what was written."""
    try:
        model = AllParams.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_one_line(exc, source)) from None
    params = model.model_dump(by_alias=True)
    params["train"]["overrides"] = {cell: over for cell, over in
                                    model.train.overrides.model_dump(exclude_unset=True).items() if over}
    _cross_checks(params, source)
    return params


_TYPES = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
          "list": "a list", "model": "a mapping", "dict": "a mapping"}


def _one_line(exc: ValidationError, source: str) -> str:
    """pydantic's first error as `<source>: <dotted key> = <value>: <why>`."""
    error = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")   # unknown keys first
    *parents, last = [str(part) for part in error["loc"]]
    key, kind, ctx = ".".join(error["loc"]), error["type"], error.get("ctx", {})
    model = AllParams
    for part in parents:
        model = _fields(model)[part].annotation
    if kind == "extra_forbidden":
        what = "key " if parents else "section "
        return f"{source}: unknown {what}{key}{did_you_mean(last, _fields(model), '.'.join(parents + ['']))}"
    field = _fields(model)[last]
    if kind.endswith(("_type", "_parsing", "_from_float")):
        why = "must be " + _TYPES.get(kind.split("_")[0], kind) + (" or null" if field.default is None else "")
    elif kind == "literal_error":
        choices = field.annotation.__args__
        hint = did_you_mean(error["input"], choices) if isinstance(error["input"], str) else ""
        why = f"must be one of {', '.join(choices)}{hint}"
    elif kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        sign, bound = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"),
                       "less_than_equal": ("<=", "le")}[kind]
        why = f"must be {sign} {ctx[bound]:g}"
    else:
        why = str(ctx.get("error", error["msg"]))
    value = error["input"]      # as YAML would write it, strings quoted
    return f"{source}: {key} = {json.dumps(value) if value is None or isinstance(value, bool) else repr(value)}: {why}"


def _fields(model: type[BaseModel]) -> dict:
    """{key as params.yaml writes it: pydantic FieldInfo} of a section."""
    return {info.alias or name: info for name, info in model.model_fields.items()}


def _cross_checks(params: dict, source: str) -> None:
    """Constraints between keys, checked once every section is valid on its own."""
    probe = params["probe"]
    earlier = probe["distractors"] if probe["variant"] == "signal" else 1
    if probe["lead"] < earlier:
        raise ParamsError(f"{source}: probe.lead = {probe['lead']}: must be >= {earlier}, the tokens placed "
                          f"before the decisive one (variant {probe['variant']}, distractors {probe['distractors']})")
    if probe["trace_steps"] > probe["steps"]:
        raise ParamsError(f"{source}: probe.trace_steps = {probe['trace_steps']}: must be <= probe.steps")
    probe["distances"] = sorted(probe["distances"])
    pre, max_len = params["pretrain"], params["prepare"]["max_len"]
    if pre["tokens_per_epoch"] is not None and pre["tokens_per_epoch"] < pre["batch_size"] * max_len:
        raise ParamsError(f"{source}: pretrain.tokens_per_epoch = {pre['tokens_per_epoch']}: must be at least "
                          f"one batch of reviews, pretrain.batch_size {pre['batch_size']} x prepare.max_len "
                          f"{max_len} = {pre['batch_size'] * max_len} tokens (or null: all of them)")
    train = params["train"]
    for cell, over in train["overrides"].items():    # a cell not in train.cells keeps its (unused) override
        if over.get("embed_dim", train["embed_dim"]) != train["embed_dim"]:
            raise ParamsError(f"{source}: train.overrides.{cell}.embed_dim = {over['embed_dim']}: must equal "
                              f"train.embed_dim = {train['embed_dim']}, the width of the embed stage's vectors")
    for cell in train["cells"]:
        cfg = cell_settings(params, cell)
        if cfg["init"] == "lm" and cfg["bidirectional"] and cfg["num_layers"] > 1:
            where = f"train.overrides.{cell}" if "bidirectional" in train["overrides"].get(cell, {}) else "train"
            raise ParamsError(f"{source}: {where}.bidirectional = true with num_layers {cfg['num_layers']}: "
                              "init lm starts the two directions from two language models, which fit one "
                              "layer only (above it a layer reads both); set num_layers 1 or init embeddings")
        _check_size(source, f"train ({cell})", cell, cfg, params["prepare"]["vocab_size"], params["prepare"]["max_len"],
                    "prepare.vocab_size", "prepare.max_len")
    for cell in probe["cells"]:
        _check_size(source, f"probe ({cell})", cell, {**probe, "num_layers": 1, "bidirectional": False},
                    probe["vocab_size"], probe["distances"][-1] + 1 + probe["lead"], "probe.vocab_size",
                    "the longest probe sequence")


def _check_size(source: str, where: str, cell: str, cfg: dict, vocab_size: int, length: int, vocab_key: str,
                length_key: str) -> None:
    """The model of settings `cfg` within MAX_PARAMETERS, a training step of sequences of `length` within
    MAX_ACTIVATIONS cached values."""
    embed_dim, hidden_size, num_layers, bidirectional, batch_size = (
        cfg[k] for k in ("embed_dim", "hidden_size", "num_layers", "bidirectional", "batch_size"))
    n = model_size(cell, vocab_size, embed_dim, hidden_size, num_layers, bidirectional)
    if n > MAX_PARAMETERS:
        raise ParamsError(f"{source}: {where}: {vocab_key} {vocab_size}, embed_dim {embed_dim}, hidden_size "
                          f"{hidden_size}, num_layers {num_layers}: the model would have {n:.3g} parameters, "
                          f"more than the {MAX_PARAMETERS:.0e} one process may train")
    cached = batch_size * length * (GATES[cell] + 2) * hidden_size * num_layers * (2 if bidirectional else 1)
    if cached > MAX_ACTIVATIONS:
        raise ParamsError(f"{source}: {where}: batch_size {batch_size} x {length_key} {length} x hidden_size "
                          f"{hidden_size} x num_layers {num_layers}: a training step would cache {cached:.3g} "
                          f"values, more than {MAX_ACTIVATIONS:.0e}")


def _usage(argv: list[str], more: str = "", why: str = "") -> ParamsError:
    name = Path(argv[0]).stem if argv else "<stage>"
    return ParamsError(f"usage: python -m stages.{name} <cell>{more}  (cell: {' | '.join(CELLS)}{why})")


def cell_argument(argv: list[str]) -> str:
    """The cell a per-cell stage was started for (`python -m stages.<name> <cell>`), checked."""
    if len(argv) != 2:
        raise _usage(argv)
    return check_cell(argv[1])


def check_cell(cell: str) -> str:
    """`cell` if it is one of CELLS, else a one-line ParamsError with a suggestion."""
    if cell not in CELLS:
        raise ParamsError(f"unknown cell {cell!r}{did_you_mean(cell, CELLS)}: expected one of {', '.join(CELLS)}")
    return cell


def replicate_argument(argv: list[str], params: Params) -> tuple[str, int]:
    """(cell, seed) a replicate's stage was started for (`python -m stages.<name> <cell> <seed>`), checked."""
    if len(argv) != 3 or not argv[2].isdigit():
        raise _usage(argv, " <seed>", "; seed: one of train.seeds")
    cell, seed = check_cell(argv[1]), int(argv[2])
    if seed not in params["train"]["seeds"]:
        raise ParamsError(f"seed {seed} is not in train.seeds {params['train']['seeds']}")
    return cell, seed


def replicate_name(cell: str, seed: int) -> str:
    """A replicate's folder below models/, metrics/, plots/ and data/predictions/."""
    return f"{cell}/seed{seed}"


def cell_settings(params: Params, cell: str, seed: int | None = None) -> dict:
    """`cell`'s settings: the `train` knobs, `train.overrides.<cell>` on top, `seed` (default: the first)."""
    check_cell(cell)
    base = {key: params["train"][key] for key in CELL_KNOBS}
    return {**_merge(base, params["train"]["overrides"].get(cell, {})),
            "seed": params["train"]["seeds"][0] if seed is None else seed}


def _merge(base: dict, over: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return merged


# The train settings that shape the encoder a language model hands to the classifier.
# bidirectional: pretrain then trains a second language model on the reversed reviews.
ARCHITECTURE = ("embed_dim", "hidden_size", "num_layers", "bidirectional", "reset_after", "forget_bias")


def pretrain_settings(params: Params, cell: str) -> dict:
    """`cell`'s language model settings: the `pretrain` section and, so that its encoder fits the
    classifier, the architecture keys of the cell's train settings."""
    cfg = cell_settings(params, cell)
    return {**params["pretrain"], **{k: cfg[k] for k in ARCHITECTURE}}


def run_hash(params: Params, cell: str, stage: str = "train", workers: int | str | None = None,
             seed: int | None = None) -> str:
    """sha256 of what decides the model `stage` (train or pretrain) trains for `cell`: data, prepare and
    embed, the cell's settings (with init lm the language model's too) and the workers (they change
    the sums' rounding). The MLflow runs' `params_hash` tag and the checkpoint keys use it."""
    relevant = {s: params[s] for s in ("data", "prepare", "embed")}
    relevant.update(cell=cell, stage=stage,
                    workers=params["train"]["workers"] if workers is None else workers)
    if stage == "pretrain":
        relevant["pretrain"] = pretrain_settings(params, cell)
    else:
        relevant["train"] = cfg = cell_settings(params, cell, seed)
        if cfg["init"] == "lm":
            relevant["pretrain"] = pretrain_settings(params, cell)
    return digest(relevant)


def digest(obj: object) -> str:
    """sha256 hex of the canonical JSON of `obj`."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def model_config(cfg: dict, cell: str, vocab_size: int, task: str = "sentiment") -> ModelConfig:
    """The `ModelConfig` of settings `cfg` (train, pretrain or probe): its keys that name a field,
    the library's defaults for the rest."""
    given = {f.name: cfg[f.name] for f in fields(ModelConfig) if f.name in cfg}
    if "adversarial" in cfg:
        given.update(adversarial_epsilon=cfg["adversarial"]["epsilon"], adversarial_weight=cfg["adversarial"]["weight"])
    given.update(vocab_size=vocab_size, cell=cell, task=task,
                 reset_after=cfg.get("reset_after", False) and cell == "gru")   # rnn/lstm have no such switch
    return ModelConfig(**given)


def train_config(cfg: dict, workers: int, **fixed) -> TrainConfig:
    """The `TrainConfig` of a cell's train (or pretrain) settings `cfg`, with `fixed` on top."""
    given = {f.name: cfg[f.name] for f in fields(TrainConfig) if f.name in cfg}
    given.update(clip_mode=cfg["clip"]["mode"], clip_threshold=cfg["clip"]["threshold"], workers=workers, **fixed)
    return TrainConfig(**given)
