"""Stage `baseline`: NBSVM, the bag-of-n-grams baseline the recurrent cells should beat.

    python -m stages.baseline

NBSVM (Wang & Manning, 2012): binary n-gram features scaled by their naive-Bayes log-count ratios, a
logistic regression on them (for probabilities) and the paper's interpolation towards naive Bayes;
Mesnil et al. (2015) report 91.2-91.6 % on the IMDB test set with uni- and bigrams. The reviews of
data/prepared/{train,val}.npz (prepare's split, by id and label) but their full text from
data/raw/train.parquet, every word and n-gram kept: the recurrent models' 20k-word vocabulary and
400-token cut would make the baseline weaker than the literature's. Validation accuracy is for
choosing `baseline.*`; test accuracy must not choose them. Writes metrics/baseline/eval.json and
data/predictions/baseline.npz (`labels` int8, `probabilities` float32, `review_ids` int64), one row
per test review in the order of data/prepared/test.npz (checked), to pair with the cells' rows.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from rnn.errors import InputError
from rnn.metrics import binary_metrics
from rnn.nbsvm import interpolate_weights, nb_ratio
from rnn.text import tokenize
from stages import outputs, settings
from stages.common import Outputs, project_root, run_stage

PREDICTIONS = "data/predictions/baseline.npz"
METRICS = "metrics/baseline/eval.json"


def read_reviews(raw: Path, split: Path | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, labels (N,) int8, review ids (N,) int64) of the reviews in `raw` (a download parquet),
    or of those a prepared split lists, in the split's order. A review is known by id and label:
    IMDB numbers the positive and the negative reviews separately."""
    if not raw.is_file():
        raise FileNotFoundError(f"{raw}: not found (run the download stage first)")
    df = pd.read_parquet(raw, columns=["id", "text", "label"])
    if split is None:
        return df["text"].tolist(), df["label"].to_numpy(np.int8), df["id"].to_numpy(np.int64)
    part = outputs.load_split(split)
    if "review_ids" not in part:
        raise InputError(f"{split}: missing array review_ids (rerun the prepare stage)")
    wanted = pd.DataFrame({"id": part["review_ids"].astype(np.int64), "label": part["labels"].astype(np.int8)})
    df = df.astype({"id": np.int64, "label": np.int8})
    found = wanted.merge(df, on=["id", "label"], how="left", validate="one_to_one")
    if found["text"].isna().any():
        row = found[found["text"].isna()].iloc[0]
        raise InputError(f"{split}: review {row['id']} (label {row['label']}) is not in {raw}; rerun the prepare stage")
    return found["text"].tolist(), found["label"].to_numpy(np.int8), found["id"].to_numpy(np.int64)


class NBSVM:
    """Binary n-gram features x, NB-scaled r * x, logistic regression on them; the weights then move
    towards their mean magnitude as in Wang & Manning: w' = (1 - beta) * mean|w| + beta * w."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.vectorizer = CountVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None,
                                          ngram_range=(1, cfg["ngram_max"]), min_df=cfg["min_df"],
                                          max_features=cfg["max_features"], binary=True, dtype=np.float32)
        self.ratio = np.zeros(0, np.float32)
        self.weights = np.zeros(0, np.float32)
        self.bias = 0.0

    def fit(self, texts: list[str], labels: np.ndarray) -> "NBSVM":
        x = self.vectorizer.fit_transform(texts)
        self.ratio = nb_ratio(x, labels, self.cfg["alpha"])
        # liblinear's dual solver: fast when features (millions of bigrams) outnumber reviews.
        clf = LogisticRegression(C=self.cfg["C"], solver="liblinear", dual=True, max_iter=1000,
                                 random_state=self.cfg["seed"])
        clf.fit(x.multiply(self.ratio).tocsr(), labels)
        self.weights = interpolate_weights(clf.coef_.ravel(), self.cfg["beta"])
        self.bias = float(clf.intercept_[0])
        return self

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """P(positive) (N,) float32 of each text."""
        x = self.vectorizer.transform(texts)
        score = x @ (self.ratio * self.weights) + self.bias
        return (0.5 * (1.0 + np.tanh(0.5 * score))).astype(np.float32)      # the logistic, without overflow


def run(cfg: dict, root: Path) -> dict:
    """Fit on the training part, score validation and test, write the outputs; returns eval.json's dict."""
    prepared = root / "data/prepared"
    train, val = (read_reviews(root / "data/raw/train.parquet", prepared / f"{s}.npz") for s in ("train", "val"))
    test = read_reviews(root / "data/raw/test.parquet")
    order = outputs.load_split(prepared / "test.npz")
    if not (np.array_equal(order["labels"], test[1]) and np.array_equal(order.get("review_ids", test[2]), test[2])):
        raise InputError(f"{prepared / 'test.npz'} and {root / 'data/raw/test.parquet'} list other reviews; "
                         "rerun the prepare stage")

    t0 = time.perf_counter()
    model = NBSVM(cfg).fit(train[0], train[1])
    train_seconds = time.perf_counter() - t0
    val_scores = binary_metrics(val[1], model.predict_proba(val[0]))
    probs = model.predict_proba(test[0])
    scores = binary_metrics(test[1], probs)
    (tn, fp), (fn, tp) = scores.pop("confusion")
    metrics = {"model": "nbsvm", **scores, "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
               "val_accuracy": val_scores["accuracy"], "train_reviews": len(train[1]),
               "train_seconds": train_seconds, "seconds": time.perf_counter() - t0,
               "features": len(model.ratio), "settings": cfg}
    with Outputs(root) as out:
        out.write_metrics(METRICS, metrics)
        out.save_npz(PREDICTIONS, labels=test[1], probabilities=probs, review_ids=test[2])
    return metrics


def log_run(tracker, cfg: dict, metrics: dict) -> None:
    tracker.log_params({f"baseline.{k}": v for k, v in cfg.items()})
    tracker.log_metrics({"accuracy/test": metrics["accuracy"], "accuracy/val": metrics["val_accuracy"],
                         "test/f1": metrics["f1"], "test/roc_auc": metrics["roc_auc"],
                         "loss/test": metrics["log_loss"], "train/seconds": metrics["train_seconds"],
                         "train/features": metrics["features"]})


def main() -> None:
    root = project_root()
    params = settings.load(root / "params.yaml")

    from stages.tracking import Tracker      # MLflow is imported only when tracking is on

    # Its own run in the cells' experiment, tagged cell=baseline; started first, so that an unusable
    # store stops the stage before the work.
    with Tracker.start(params, "baseline", "baseline") as tracker:
        metrics = run(params["baseline"], root)
        log_run(tracker, params["baseline"], metrics)
    print(f"baseline (NBSVM): test accuracy {metrics['accuracy']:.4f}, val {metrics['val_accuracy']:.4f}, "
          f"{metrics['features']} features, trained in {metrics['train_seconds']:.1f}s")


if __name__ == "__main__":
    run_stage(main)
