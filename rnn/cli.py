"""The `rnn` command (also `python -m rnn`): use trained models and list tracked runs.

    rnn predict  --model models/lstm/seed0 "A wonderful film." ...  (or --file F, or standard input)
    rnn evaluate --model models/lstm/seed0 --dir aclImdb/test        (or --csv F with text,label columns)
                 [--workers N|auto]                                  (processes; default: all cores)
    rnn explain  --model models/lstm/seed0 "Not a bad film at all"   [--no-color] [--html page.html]
    rnn generate --model models/lm/lstm "This movie was"        [--tokens 60] [--temperature 0.8] [--seed 0]
    rnn runs     [--experiment NAME] [--tracking-uri URI]
    rnn ui       [--port 5000] [--link-only]                    MLflow's UI on the project's runs

Errors are reported in one line on stderr with exit status 2. pandas and mlflow are imported
only by the subcommands that need them.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .config import MAX_REVIEW_BYTES
from .errors import shorten
from .io import atomic_file
from .metrics import binary_metrics
from .parallel import resolve_workers
from .predict import LABELS, load_language_model, load_model
from .text import tokenize

LABEL_VALUES = {"1": 1, "1.0": 1, "pos": 1, "positive": 1, "0": 0, "0.0": 0, "neg": 0, "negative": 0}
DEFAULT_EXPERIMENT = "imdb-sentiment"
STORE_TIMEOUT_S = 5.0          # check_store gives up on a store that does not answer within this
# Columns of `rnn runs`: the train settings each run trained with (the tracker logs them with the
# cell's overrides merged, as "train.<name>"), then metrics as logged by train and evaluate.
RUN_PARAMS = ("optimizer", "lr", "hidden_size", "num_layers", "pooling", "dropout")
RUN_METRICS = {"test_acc": "accuracy/test", "test_auc": "test/roc_auc",
               "best_val_acc": "accuracy/val_best", "epochs": "train/epochs_run"}
# MLflow 3's UI on a model-training experiment, its runs as charts. (Without workflowType a fresh
# browser opens the GenAI view of traces, whatever the experiment.)
UI_LINK = "{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART"
UI_START_TIMEOUT_S = 120


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"rnn {args.command}: error: {shorten(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnn", description="Use trained sentiment models; list tracked runs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, run, help):
        s = sub.add_parser(name, help=help, description=help)
        s.set_defaults(run=run)
        if name not in ("runs", "ui"):
            s.add_argument("--model", required=True, help="model folder, e.g. models/lstm/seed0")
        return s

    s = command("predict", _predict, "Label reviews as positive or negative.")
    s.add_argument("texts", nargs="*", help="reviews (default: --file, else standard input, one per line)")
    s.add_argument("--file", help="a text file with one review per line, or a .csv with a 'text' column")
    s.add_argument("--json", action="store_true",
                   help="print JSON lines {text, label, probability (of that label), p_positive}")

    s = command("evaluate", _evaluate, "Score a model on labelled reviews.")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", help="folder with pos/ and neg/ subfolders of .txt reviews (aclImdb layout)")
    src.add_argument("--csv", help="a .csv with 'text' and 'label' (1/0, pos/neg, positive/negative) columns")
    s.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    s.add_argument("--workers", default="auto",
                   help="worker processes scoring batches of 256 reviews: a number, or 'auto' (default) "
                        "for every core this process may use")

    s = command("explain", _explain, "Show how much each word moved the prediction (leave-one-out).")
    s.add_argument("text", nargs="*", help="the review (default: standard input)")
    s.add_argument("--top", type=int, default=10, help="how many of the strongest words to list")
    s.add_argument("--no-color", action="store_true", help="plain text with scores instead of colours")
    s.add_argument("--html", help="also write a self-contained HTML page highlighting the words")

    s = command("generate", _generate, "Write text with a language model (the pretrain stage's models/lm/<cell>).")
    s.add_argument("prompt", nargs="*", help="the words to continue (default: standard input; may be empty)")
    s.add_argument("--tokens", type=int, default=60, help="how many words to write (default 60)")
    s.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits before sampling: lower is safer, 0 always takes the likeliest word")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling: the same seed writes the same text")
    s.add_argument("--json", action="store_true", help="print {prompt, text, tokens, temperature, seed}")

    s = command("runs", _runs, "List the MLflow runs of an experiment.")
    s.add_argument("--experiment", help="default: params.yaml mlflow.experiment, else " + DEFAULT_EXPERIMENT)
    s.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db")

    s = command("ui", _ui, "Start MLflow's UI on the project's runs and print the link to the experiment.")
    s.add_argument("--experiment", help="default: params.yaml mlflow.experiment, else " + DEFAULT_EXPERIMENT)
    s.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db "
                   "(an http(s) server is not started, only linked to)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    s.add_argument("--link-only", action="store_true", help="print the link, start nothing")
    return p


# ------------------------------------------------------------------------------------ predict
def _predict(args) -> int:
    predictor = load_model(args.model)
    if args.texts and args.file:
        raise ValueError("give reviews as arguments or with --file, not both")
    texts = args.texts or (_read_texts(Path(args.file)) if args.file else _stdin_lines())
    if not texts:
        raise ValueError(f"no reviews in {args.file or 'standard input'}")
    probs = _probabilities(predictor, texts, args.model)
    wordless = sum(not tokenize(t) for t in texts)
    if wordless:                   # what the model says about nothing: no more than its bias
        print(f"rnn predict: note: {wordless} of the {len(texts)} reviews hold no word; such a review is read "
              "as one unknown word (<unk>)", file=sys.stderr)
    if args.json:
        for text, p in zip(texts, probs):
            label = LABELS[int(p >= 0.5)]
            print(json.dumps({"text": text, "label": label, "probability": round(float(max(p, 1 - p)), 6),
                              "p_positive": round(float(p), 6)}, ensure_ascii=False, allow_nan=False))
        return 0
    print(f"{'label':<9} {'prob':>5}  text")
    for text, p in zip(texts, probs):
        print(f"{LABELS[int(p >= 0.5)]:<9} {max(p, 1 - p):5.3f}  {_shorten(text, 70)}")
    return 0


def _probabilities(predictor, texts: list[str], model: str, workers: int = 1):
    """P(positive) (N,), on `workers` processes; an error rather than NaN if the model's arithmetic
    overflows."""
    probs = predictor.predict_proba(texts, workers=workers)
    bad = int(len(probs) - np.count_nonzero(np.isfinite(probs)))
    if bad:
        raise ValueError(f"{model}: the model gives no finite probability for {bad} of {len(probs)} reviews "
                         "(its weights overflow float arithmetic)")
    return probs


def _read_texts(path: Path) -> list[str]:
    """Reviews of a .csv's 'text' column, or the non-blank lines of any other file."""
    if path.suffix.lower() == ".csv":
        return _read_csv(path, ["text"])["text"].tolist()
    data = path.read_bytes()
    if b"\0" in data:
        raise ValueError(f"{path}: not a text file (it holds NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return [line for line in text.splitlines() if line.strip()]


def _read_csv(path: Path, columns: list[str]):
    import pandas as pd
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except ValueError as e:          # pandas ParserError and EmptyDataError are ValueErrors
        raise ValueError(f"{path}: not a readable CSV file: {e}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} "
                         f"(columns: {', '.join(map(str, df.columns))})")
    return df


def _stdin_lines() -> list[str]:
    if sys.stdin.isatty():
        print("reading reviews from standard input, one per line; end with Ctrl-D", file=sys.stderr)
    return [line for line in sys.stdin.read().splitlines() if line.strip()]


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


# ----------------------------------------------------------------------------------- evaluate
def _evaluate(args) -> int:
    try:
        workers = resolve_workers(args.workers)
    except ValueError:
        raise ValueError(f"--workers must be a positive integer or 'auto', got {args.workers!r}") from None
    predictor = load_model(args.model)
    source = Path(args.dir or args.csv)
    texts, labels = _read_labelled_dir(source) if args.dir else _read_labelled_csv(source)
    m = binary_metrics(labels, _probabilities(predictor, texts, args.model, workers))
    positives = sum(labels)
    if args.json:
        print(json.dumps({"model": args.model, "data": str(source), **m}, allow_nan=False))
        return 0
    print(f"model      {args.model}\ndata       {source}: {m['n']} reviews "
          f"({positives} positive, {m['n'] - positives} negative)")
    for k in ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"):
        print(f"{k:<10} {'n/a (one class only)' if m[k] is None else format(m[k], '.4f')}")
    (tn, fp), (fn, tp) = m["confusion"]
    w = max(len(str(m["n"])), 9)
    print(f"\nconfusion   {'predicted':>{2 * w + 1}}\n{'actual':<11} {'negative':>{w}} {'positive':>{w}}")
    print(f"{'negative':<11} {tn:>{w}} {fp:>{w}}\n{'positive':<11} {fn:>{w}} {tp:>{w}}")
    return 0


def _read_labelled_dir(folder: Path) -> tuple[list[str], list[int]]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    texts, labels, skipped = [], [], []
    for label, name in ((1, "pos"), (0, "neg")):
        for f in sorted((folder / name).glob("*.txt")):
            if not f.is_file():              # a FIFO would block the read forever; a folder fails it
                skipped.append(f)
                continue
            with open(f, "rb") as review:       # never more than the cap: the file may be huge
                data = review.read(MAX_REVIEW_BYTES + 1)
            if len(data) > MAX_REVIEW_BYTES:
                raise ValueError(f"{f}: more than the {MAX_REVIEW_BYTES >> 20} MiB a review may have")
            # Corpora other than IMDB are not always clean UTF-8; a stray byte should not stop scoring.
            texts.append(data.decode("utf-8", errors="replace"))
            labels.append(label)
    if skipped:
        what = "entry that is not a regular file" if len(skipped) == 1 else "entries that are not regular files"
        print(f"rnn evaluate: skipped {len(skipped)} .txt {what} (e.g. {skipped[0]})", file=sys.stderr)
    if not texts:
        raise ValueError(f"{folder}: no reviews in pos/*.txt or neg/*.txt")
    return texts, labels


def _read_labelled_csv(path: Path) -> tuple[list[str], list[int]]:
    df = _read_csv(path, ["text", "label"])
    labels = []
    for row, value in enumerate(df["label"], start=2):       # row 1 is the header
        label = LABEL_VALUES.get(value.strip().lower())
        if label is None:
            raise ValueError(f"{path}: line {row}: label {value!r} is not one of "
                             "1/0, pos/neg, positive/negative")
        labels.append(label)
    if not labels:
        raise ValueError(f"{path}: no reviews")
    return df["text"].tolist(), labels


# ------------------------------------------------------------------------------------ explain
def _explain(args) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    predictor = load_model(args.model)
    text = " ".join(args.text) if args.text else sys.stdin.read()
    p = float(predictor.predict_proba([text])[0])
    label = LABELS[int(p >= 0.5)]
    words = predictor.explain(text)
    print(f"{label} {max(p, 1 - p):.3f}")
    if not words:
        print("no words to explain")
        return 0
    scale = max(abs(s) for _, s in words) or 1.0
    color = not args.no_color and "NO_COLOR" not in os.environ
    print(" ".join(_ansi(w, s / scale) if color else f"{w}({s:+.2f})" for w, s in words))
    total = len(tokenize(text))
    if total > len(words):
        print(f"(the model reads {len(words)} of the {total} words: truncate={predictor.encoder.truncate})")
    print("\nstrongest words (change in logit when left out):")
    for w, s in sorted(words, key=lambda ws: -abs(ws[1]))[:args.top]:
        print(f"  {s:+7.3f}  {_ansi(w, s / scale) if color else w}")
    if args.html:
        with atomic_file(args.html, "w") as f:
            f.write(_html_page(words, scale, label, max(p, 1 - p), args.model))
        print(f"\nwrote {args.html}")
    return 0


def _ansi(word: str, t: float) -> str:
    """`word` in green (t > 0) or red (t < 0), from grey at t = 0 to full colour and bold at |t| = 1."""
    target = (0, 200, 0) if t > 0 else (230, 40, 40)
    r, g, b = (round(150 + (c - 150) * abs(t)) for c in target)
    bold = "1;" if abs(t) > 0.5 else ""
    return f"\x1b[{bold}38;2;{r};{g};{b}m{word}\x1b[0m"


def _html_page(words: list[tuple[str, float]], scale: float, label: str, prob: float, model: str) -> str:
    spans = " ".join(
        f'<span title="{s:+.3f}" style="background:rgba({"0,170,0" if s > 0 else "220,30,30"},'
        f'{abs(s) / scale * 0.8:.2f})">{html.escape(w)}</span>' for w, s in words)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rnn explain: {label}</title>
<style>body{{font:17px/1.9 sans-serif;max-width:46em;margin:2em auto;padding:0 1em}}
span{{padding:.1em .15em;border-radius:.2em}} small{{color:#666}}</style></head>
<body><h1>{label} <small>{prob:.3f}</small></h1>
<p>{spans}</p>
<p><small>Green words pushed the prediction towards positive, red towards negative (the change in
the logit when the word is left out; hover for the value). Model: {html.escape(model)}</small></p>
</body></html>
"""


# ----------------------------------------------------------------------------------- generate
def _generate(args) -> int:
    if args.tokens < 1 or args.tokens > 10_000:
        raise ValueError(f"--tokens must lie in [1, 10000], got {args.tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    writer = load_language_model(args.model)
    prompt = " ".join(args.prompt) if args.prompt else (sys.stdin.read() if not sys.stdin.isatty() else "")
    words = writer.generate(prompt, args.tokens, args.temperature, args.seed)
    text = " ".join([*tokenize(prompt), *words])
    if args.json:
        print(json.dumps({"prompt": prompt, "text": text, "tokens": args.tokens,
                          "temperature": args.temperature, "seed": args.seed}, ensure_ascii=False))
    else:
        print(text)
    return 0


# --------------------------------------------------------------------------------------- runs
# Where runs go and whether that store answers: `rnn runs`, `rnn ui` and the stages (stages/mlstore.py)
# share these, without importing MLflow.

# MLflow's usage telemetry sets and removes an environment variable from a thread of its own while
# the HTTP client reads the environment for proxy settings; with a server under load a stage lost
# its params to "log-batch failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'" (seen in a sweep
# on two machines). The runs here never need it, and machines without internet cannot send it.
# Set before MLflow is first imported: `runs`, `ui` and stages/mlstore.py import this module first.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
QUEUED_EXP_DIR = "/.dvc/tmp/exps/"


class TrackingUnavailable(ConnectionError):
    """The MLflow store cannot be reached or used."""


def resolve_root(environ: dict[str, str] | None = None, cwd: str | Path | None = None) -> Path:
    """The absolute project root runs are stored under: `DVC_ROOT` when set, else the nearest
    directory upward from `cwd` holding params.yaml (FileNotFoundError if none).

    Queued (`dvc exp run --queue`) and `--temp` experiments run in a throw-away copy
    `<repo>/.dvc/tmp/exps/[standalone/]tmpXXXX`. DVC 3.67 sets DVC_ROOT to the real repo there (the
    cwd is the copy); older DVC set it to the copy, so such a root is mapped back to the repo, or
    the runs would vanish with the copy.
    """
    environ = os.environ if environ is None else environ
    cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
    if environ.get("DVC_ROOT"):
        root = (cwd / environ["DVC_ROOT"]).resolve()          # an absolute DVC_ROOT replaces cwd
        text = root.as_posix() + "/"
        return Path(text[:text.index(QUEUED_EXP_DIR)] or "/") if QUEUED_EXP_DIR in text else root
    marked = (d for d in (cwd, *cwd.parents) if (d / "params.yaml").is_file())
    root = next(marked, None)
    if root is None:
        raise FileNotFoundError(f"params.yaml not found in {cwd} or any parent directory")
    return root


def tracking_location(root: Path, environ: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment, or None for the store's default).

    `MLFLOW_TRACKING_URI` wins, else `sqlite:///<root>/mlflow.db`. SQLite paths are made absolute
    (a relative one is taken from the root) and artifacts go beside the database in mlartifacts/:
    both would otherwise follow the cwd, in a queued experiment a copy deleted after the run.
    """
    environ = os.environ if environ is None else environ
    uri = environ.get("MLFLOW_TRACKING_URI", "").strip() or "sqlite:///mlflow.db"
    if not uri.startswith("sqlite:///"):
        return uri, None
    path, query = uri[len("sqlite:///"):].partition("?")[::2]
    db = root / path                   # an absolute path replaces root
    return f"sqlite:///{db.as_posix()}" + (f"?{query}" if query else ""), (db.parent / "mlartifacts").as_uri()


def login() -> tuple[str | None, dict[str, str]]:
    """(user name, HTTP headers) of the MLflow account this process logs in with, as MLflow's client
    finds it: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, else ~/.mlflow/credentials;
    (None, {}) without one."""
    import base64
    import configparser
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password):
        file = configparser.ConfigParser()
        try:
            file.read(Path.home() / ".mlflow" / "credentials", encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            pass                                   # MLflow's client will say what is wrong with it
        user = user or file.get("mlflow", "mlflow_tracking_username", fallback=None)
        password = password or file.get("mlflow", "mlflow_tracking_password", fallback=None)
    if not (user and password):
        return None, {}
    return user, {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def check_store(uri: str, writing: bool = False) -> Path | None:
    """Fail in one line, within STORE_TIMEOUT_S, when the store at `uri` cannot be used: no server
    answers at an http(s) URI, or it refuses our login (`login`: HTTP 401 or 403); an SQLite file is
    no readable database, or (`writing`, as the stages do) cannot be created or written, or
    (reading) is missing or without MLflow's tables. Returns the SQLite file, if any. Raises
    TrackingUnavailable."""
    fix = "fix MLFLOW_TRACKING_URI, or set mlflow.enabled: false in params.yaml" if writing else \
        "fix --tracking-uri / MLFLOW_TRACKING_URI"
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=probe"
        user, header = login()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=header), timeout=STORE_TIMEOUT_S):
                pass
        except urllib.error.HTTPError as e:        # any other HTTP status is an answer
            if e.code in (401, 403):               # a server with logins (mlflow server --app-name basic-auth)
                who = f"the account {user!r}" if user else "a client without a login"
                raise TrackingUnavailable(
                    f"MLflow tracking server {uri} refuses {who} (HTTP {e.code}): set MLFLOW_TRACKING_USERNAME and "
                    f"MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to an account of yours; {fix}") from None
        except OSError as e:                       # URLError, refused, timed out
            reason = " ".join(str(getattr(e, "reason", e)).split())
            raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable ({reason}); start it, {fix}") \
                from None
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):].partition("?")[0])
    folder = next(p for p in (db.parent, *db.parent.parents) if p.exists())
    if not writing and not db.is_file():
        raise TrackingUnavailable(f"no MLflow store at {db}: nothing tracked yet")
    if not folder.is_dir():
        raise TrackingUnavailable(f"MLflow store {uri}: {folder} is not a folder; {fix}")
    if db.exists():
        if not db.is_file():
            raise TrackingUnavailable(f"MLflow store {uri}: {db} is not a file; {fix}")
        import contextlib
        import sqlite3
        try:
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True,
                                                    timeout=STORE_TIMEOUT_S)) as con:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "experiments" in tables:
                    con.execute("SELECT count(*) FROM experiments").fetchone()
        except sqlite3.Error as e:
            raise TrackingUnavailable(f"MLflow store {uri}: {db} is not a usable SQLite database "
                                      f"({' '.join(str(e).split())}); move it away, {fix}") from None
        if not writing and "experiments" not in tables:
            raise TrackingUnavailable(f"MLflow store {uri}: {db} is an SQLite database without MLflow's tables")
    # (the folder too: SQLite writes a journal beside the database)
    unwritable = [p for p in (folder, db) if p.exists() and not os.access(p, os.W_OK)]
    if writing and unwritable:
        raise TrackingUnavailable(f"MLflow store {uri}: {unwritable[-1]} is not writable; {fix}")
    return db


def _store(args) -> tuple[Path, str, str]:
    """(project root, tracking URI, experiment name) of `runs` and `ui`."""
    try:
        root = resolve_root()
    except FileNotFoundError:          # outside a project: --tracking-uri or MLFLOW_TRACKING_URI names the store
        root = Path.cwd().resolve()
    uri = args.tracking_uri or tracking_location(root)[0]
    experiment = args.experiment or _params_experiment(root) or DEFAULT_EXPERIMENT
    check_store(uri)
    return root, uri, experiment


def _runs(args) -> int:
    root, uri, experiment = _store(args)
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    if uri.startswith(("http://", "https://")):   # a server that dies now: seconds, not MLflow's minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(STORE_TIMEOUT_S)))
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no experiment {experiment!r} in {uri}")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=10_000)
    except ValueError:
        raise
    except MlflowException as e:
        raise ValueError(f"{uri}: {e.message}") from None
    except Exception as e:           # SQLAlchemy's or requests' errors from a damaged or dying store
        raise ValueError(f"MLflow store {uri}: {type(e).__name__}: {e}") from None
    if not runs:
        print(f"no runs in experiment {experiment!r} ({uri})")
        return 0
    rows = []
    for r in runs:
        params, metrics, cell = r.data.params, r.data.metrics, r.data.tags.get("cell")
        row = {"run": r.info.run_name, "cell": cell, "status": r.info.status,
               "started": pd.Timestamp(r.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M")}
        for k in RUN_PARAMS:
            row[k] = params.get(f"train.{k}")
        row.update({header: metrics.get(name) for header, name in RUN_METRICS.items()})
        rows.append(row)
    table = pd.DataFrame(rows).dropna(axis=1, how="all")
    print(f"experiment {experiment!r} ({uri}): {len(rows)} run{'s' * (len(rows) > 1)}, newest first")
    print(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
    return 0


# ----------------------------------------------------------------------------------------- ui
def _ui(args) -> int:
    """`mlflow ui` on the project's store (in the project root), the link printed once it answers;
    runs until Ctrl-C. An http(s) tracking URI is a running server: only its link is printed."""
    root, uri, experiment = _store(args)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    try:
        exp = MlflowClient(uri).get_experiment_by_name(experiment)
    except MlflowException as e:
        raise ValueError(f"{uri}: {e.message}") from None
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} in {uri}")
    serve = uri.startswith("sqlite:")
    base = f"http://{args.host}:{args.port}" if serve else uri.rstrip("/")
    link = UI_LINK.format(base=base, experiment_id=exp.experiment_id)
    if args.link_only or not serve:
        print(link)
        return 0
    import subprocess
    import time
    import urllib.request
    # GenAI job runners (scorers) are not used by this project; without them the UI starts faster.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    import signal
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))   # stop the UI too
    # Its own process group, so that stopping it also stops the uvicorn worker it starts.
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                             "--host", args.host, "--port", str(args.port), "--workers", "1"], cwd=root, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise OSError(f"mlflow ui exited with status {proc.returncode} (is port {args.port} "
                                  "in use? try --port)") from None
                if time.monotonic() > deadline:
                    raise OSError(f"mlflow ui did not answer at {base} within {UI_START_TIMEOUT_S} s") from None
                time.sleep(0.3)
        print(f"MLflow UI for experiment {experiment!r} ({uri}); Ctrl-C stops it:\n{link}", flush=True)
        return proc.wait()
    finally:
        _stop_group(proc)


def _stop_group(proc) -> None:
    import signal
    import subprocess
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            pass


def _params_experiment(root: Path) -> str | None:
    path = root / "params.yaml"
    if not path.is_file():
        return None
    import yaml
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    mlflow = params.get("mlflow") if isinstance(params, dict) else None
    return mlflow.get("experiment") if isinstance(mlflow, dict) else None
