"""`python -m sweeps`: create a study, run workers, show it, apply a trial (docs/sweeps.md).

    python -m sweeps create sweeps/lstm.yaml        # once, before any worker
    python -m sweeps work sweeps/lstm.yaml &        # as many workers as the machine has room for,
    python -m sweeps work sweeps/lstm.yaml          #   on as many machines as share the storage
    python -m sweeps show sweeps/lstm.yaml          # state counts, best trials, experiments, runs
    python -m sweeps apply sweeps/lstm.yaml         # the best trial's experiment into the workspace

Run from the project (any folder inside it). A module like the stages (`python -m stages.train`),
not an installed console script: it works on the project checkout it is run in, which an installed
`rnn` package (the library) knows nothing about.
"""

from __future__ import annotations

import argparse
import json
import sys

from sweeps.spec import SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create the study (once, before the workers)")
    work = commands.add_parser("work", help="run trials until the study's n_trials are done")
    work.add_argument("--trials", type=int, metavar="K", help="stop after K trials of this worker")
    work.add_argument("--no-wait", action="store_true",
                      help="stop when nothing is left to take, even while other workers' trials still run")
    work.add_argument("--push", metavar="REMOTE",
                      help="after each trial, `dvc exp push REMOTE <experiment>` (a team's git remote)")
    show = commands.add_parser("show", help="state counts and the best trials")
    show.add_argument("--top", type=int, default=5, metavar="N", help="best N trials (default 5)")
    show.add_argument("--json", action="store_true", help="as JSON")
    apply = commands.add_parser("apply", help="`dvc exp apply` a trial's experiment to the workspace")
    apply.add_argument("--trial", type=int, metavar="N", help="trial number (default: the best trial)")
    apply.add_argument("--pull", metavar="REMOTE", help="first `dvc exp pull REMOTE <experiment>`")
    for sub in (create, work, show, apply):
        sub.add_argument("study", help="the study file (YAML)")
    args = parser.parse_args(argv)

    try:
        from sweeps import engine      # Optuna is imported only once the arguments are fine
    except ModuleNotFoundError as exc:
        if exc.name != "optuna":
            raise
        print("error: optuna is not installed: pip install -e '.[sweep]' (docs/sweeps.md)", file=sys.stderr)
        return 2

    try:
        spec = load_spec(args.study)
        root = engine.project_root()
        if args.command == "create":
            study = engine.create(spec, root)
            waiting = len(study.get_trials(deepcopy=False))
            print(f"study {spec.name} created at commit {study.user_attrs['commit'][:7]}"
                  + (f", {waiting} grid points enqueued" if waiting else f", {spec.n_trials} trials to run"))
        elif args.command == "work":
            engine.work(spec, root, max_trials=args.trials, wait=not args.no_wait, push=args.push)
        elif args.command == "show":
            summary = engine.summary(spec, root, args.top)
            print(json.dumps(summary, indent=2) if args.json else engine.format_summary(summary))
        else:
            trial = engine.apply(spec, root, args.trial, args.pull)
            print(f"applied trial {trial.number} ({trial.user_attrs['experiment']}, {spec.key} = {trial.value:.4f}): "
                  + " ".join(trial.user_attrs.get("overrides", [])))
    except (SpecError, engine.SweepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0
