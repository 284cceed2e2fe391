"""Retake the README's two MLflow screenshots (docs/mlflow-charts.png, docs/mlflow-vanishing-gradient.png)
from the project's MLflow store, e.g. after `make pipeline`:

    python docs/screenshots.py          # or: make screenshots
    python docs/screenshots.py --gradient-exp pooling-last

Starts `rnn ui` on a free port, lets docs/screenshots.cjs drive headless Chromium through it (Debian's
`chromium` package; playwright-core from npm, installed into .cache/playwright on first use), then
stops the UI. The charts show the runs that trained the models now in models/<cell>/ (found by the
folders' digests, as evaluate finds them), whatever else the store holds. `--gradient-exp NAME` takes
the gradient picture from the runs of the DVC experiment NAME instead (tag `dvc.exp_name`): with the
default concat pooling every step also receives gradient straight from the mean and max pools, so the
vanishing along the recurrent path shows best in an experiment with `train.pooling=last`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAYWRIGHT = ROOT / ".cache" / "playwright"
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def current_runs_filter() -> str:
    """A search filter for the newest run of each models/<cell>/ folder, by its model_digest tag."""
    sys.path.insert(0, str(ROOT))
    from mlflow import MlflowClient

    from stages import settings
    from stages.mlstore import resolve_root, tracking_location
    from stages.tracking import model_digest

    params = settings.load(ROOT / "params.yaml")
    client = MlflowClient(tracking_location(resolve_root(cwd=ROOT))[0])
    experiment = client.get_experiment_by_name(params["mlflow"]["experiment"])
    ids = []
    for cell in params["train"]["cells"]:
        folder = ROOT / "models" / cell
        if experiment is not None and folder.is_dir():
            runs = client.search_runs([experiment.experiment_id], f"tags.model_digest = '{model_digest(folder)}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            ids += [r.info.run_id for r in runs]
    if not ids:
        raise SystemExit("error: no run in the MLflow store trained the models in models/ (run make pipeline)")
    return "attributes.run_id IN (" + ", ".join(f"'{i}'" for i in ids) + ")"


def experiment_runs_filter(name: str) -> str:
    """A search filter for the runs that `dvc exp run` logged under the experiment name `name`."""
    if "'" in name:
        raise SystemExit(f"error: --gradient-exp {name!r}: a DVC experiment name has no quotes")
    return f"tags.`dvc.exp_name` = '{name}'"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradient-exp", metavar="NAME",
                        help="take the gradient picture from the runs of this DVC experiment")
    args = parser.parse_args()
    if not (PLAYWRIGHT / "node_modules" / "playwright-core").is_dir():
        subprocess.run(["npm", "install", "--no-save", "--prefix", str(PLAYWRIGHT), "playwright-core"], check=True)
    runs = current_runs_filter()
    ui = subprocess.Popen([sys.executable, "-m", "rnn", "ui", "--port", str(free_port())], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, link = time.monotonic() + START_TIMEOUT_S, None
        while link is None:                      # `rnn ui` prints the link once the UI answers
            line = ui.stdout.readline()
            if not line or time.monotonic() > deadline:
                print("error: rnn ui printed no link (see above)", file=sys.stderr)
                return 1
            link = line.strip() if "#/experiments/" in line else None
        charts = link + "&searchFilter=" + urllib.parse.quote(runs)
        gradient_runs = experiment_runs_filter(args.gradient_exp) if args.gradient_exp else runs
        gradient = link + "&searchFilter=" + urllib.parse.quote(gradient_runs)
        env = {**os.environ, "PLAYWRIGHT_CORE": str(PLAYWRIGHT / "node_modules" / "playwright-core")}
        subprocess.run(["node", str(ROOT / "docs" / "screenshots.cjs"), charts, gradient, str(ROOT / "docs")], env=env,
                       check=True, timeout=300)
        print("wrote docs/mlflow-charts.png and docs/mlflow-vanishing-gradient.png")
        return 0
    finally:
        os.killpg(ui.pid, signal.SIGTERM)        # rnn ui stops the MLflow UI it started
        ui.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
