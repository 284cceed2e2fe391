"""The compare stage's summary as text and table: Markdown and CSV rows from summary.json's dict."""

from __future__ import annotations

NAMES = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM", "baseline": "NBSVM"}
PUBLISHED = ("Published for NBSVM with uni- and bigrams on this test set: 91.22 % (Wang & Manning, 2012), "
             "91.2-91.6 % in later re-runs (Mesnil et al., 2015).")
COLUMNS = ("model", "seeds", "test_accuracy", "test_accuracy_sd", "ci95_low", "ci95_high", "ensemble_accuracy",
           "best_val_accuracy", "test_f1", "test_auc", "epochs", "train_seconds", "parameters", "lm_val_perplexity")


def points(x: float) -> str:
    return f"{100 * x:+.2f}"


def summary_rows(summary: dict) -> list[dict]:
    rows = []
    for cell, s in summary["cells"].items():
        acc = s["test_accuracy"]
        rows.append({"model": cell, "seeds": len(acc["seeds"]), "test_accuracy": acc["mean"], "test_accuracy_sd": acc["sd"],
                     "ci95_low": acc["ci95"][0], "ci95_high": acc["ci95"][1], "ensemble_accuracy": s["ensemble_accuracy"],
                     "best_val_accuracy": s["val_accuracy"]["mean"], "test_f1": s["test_f1"], "test_auc": s["test_auc"],
                     "epochs": s["epochs"], "train_seconds": s["train_seconds"], "parameters": s["parameters"],
                     "lm_val_perplexity": s["lm_val_perplexity"]})
    b = summary["baseline"]
    rows.append({**dict.fromkeys(COLUMNS), "model": "baseline", "seeds": 1, "test_accuracy": b["test_accuracy"]["mean"],
                 "ci95_low": b["test_accuracy"]["ci95"][0], "ci95_high": b["test_accuracy"]["ci95"][1],
                 "test_f1": b["test_f1"], "test_auc": b["test_auc"], "train_seconds": b["train_seconds"]})
    return rows


def summary_markdown(summary: dict) -> str:
    """The tables as Markdown: accuracy over seeds with intervals, then each pair's difference."""
    def num(v, fmt="{:.4f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = ["# RNN vs GRU vs LSTM on IMDB, and a bag-of-bigrams baseline", "",
             f"Test accuracy on {summary['test_reviews']:,} reviews: mean ± sd over the seeds of each cell with a "
             "95 % Student-t interval over seeds; the seeds' ensemble averages their probabilities. The baseline "
             "is deterministic: its interval is a bootstrap over the test reviews.", "",
             "| model | seeds | test accuracy | 95 % CI | seeds' ensemble | best val accuracy | F1 | AUC | epochs | "
             "training s per seed | LM val perplexity |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary_rows(summary):
        sd = "" if r["test_accuracy_sd"] is None else f" ± {r['test_accuracy_sd']:.4f}"
        lines.append(f"| {NAMES[r['model']]} | {r['seeds']} | {r['test_accuracy']:.4f}{sd} | "
                     f"[{r['ci95_low']:.4f}, {r['ci95_high']:.4f}] | {num(r['ensemble_accuracy'])} | "
                     f"{num(r['best_val_accuracy'])} | {num(r['test_f1'])} | {num(r['test_auc'])} | "
                     f"{num(r['epochs'], '{:.1f}')} | {num(r['train_seconds'], '{:.0f}')} | "
                     f"{num(r['lm_val_perplexity'], '{:.1f}')} |")
    lines += ["", PUBLISHED, "", "## Differences in test accuracy (points)", "",
              "Paired bootstrap over the test reviews and the seeds (the same reviews for both models); McNemar's "
              "exact test on the two seeds' ensembles. A ranking is stated only where the interval excludes 0.", "",
              "| difference | points | 95 % CI | bootstrap p | McNemar p | shown |", "|---|---:|---:|---:|---:|---|"]
    for key, p in summary["pairs"].items():
        a, b = key.split("-")
        lines.append(f"| {NAMES[a]} − {NAMES[b]} | {points(p['difference'])} | [{points(p['ci95'][0])}, "
                     f"{points(p['ci95'][1])}] | {p['p_value']:.3g} | {p['mcnemar']['p_value']:.3g} | {p['shown']} |")
    lines += ["", "![validation accuracy per epoch](val_accuracy.png)", "",
              "![gradient norm vs distance from the last token](grad_trace.png)", ""]
    return "\n".join(lines)
