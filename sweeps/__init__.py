"""Sweeps: Optuna studies whose trials are DVC experiments (`python -m sweeps`, docs/sweeps.md).

Pipeline tooling beside the stages, never imported by `rnn/`. `spec` reads a study file, `backend`
builds Optuna's storage, sampler and pruner, `engine` creates studies and runs workers, `pruning` is
the train stage's hook, `cli` the command.
"""
