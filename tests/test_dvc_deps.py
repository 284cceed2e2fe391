"""dvc.yaml lists exactly the code each stage runs: the modules its script imports, no more, no less.

A stage module imports the project's code at its top (the MLflow code, stages/tracking.py,
stages/mlstore.py and the MLflow model file stages/pyfunc_model.py, is the one exception: imported
where tracking starts and, on purpose, not a DVC dependency), so loading the module in a fresh interpreter shows everything the stage will run.
The end-to-end test checks the other half with `dvc status` after edits.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOT_DEPENDENCIES = {"stages/tracking.py", "stages/mlstore.py", "stages/pyfunc_model.py"}

LOADED = """
import importlib, json, sys
from pathlib import Path
root = Path.cwd().resolve()
importlib.import_module(sys.argv[1])
files = {str(Path(m.__file__).resolve().relative_to(root)) for m in list(sys.modules.values())
         if getattr(m, "__file__", None) and Path(m.__file__).resolve().parent in (root / "rnn", root / "stages")}
print(json.dumps(sorted(files)))
"""


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    """{stage name: (module run by its cmd, its .py deps)} from dvc.yaml."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        module = stage["cmd"].split()[2]                 # python -m <module> [arg]
        out[name] = (module, [d for d in stage["deps"] if d.endswith(".py")])
    return out


@pytest.mark.parametrize("stage", sorted(stage_commands()))
def test_code_deps_are_the_modules_the_stage_imports(stage):
    module, deps = stage_commands()[stage]
    loaded = json.loads(subprocess.run([sys.executable, "-c", LOADED, module], cwd=REPO, capture_output=True,
                                       text=True, check=True, timeout=60).stdout)
    assert not set(loaded) & NOT_DEPENDENCIES, f"{module} imports MLflow code at its top"
    assert sorted(deps) == loaded, f"dvc.yaml deps of {stage} vs the files `import {module}` loads"


def test_stage_modules_import_project_code_only_at_the_top():
    for path in sorted((REPO / "stages").glob("*.py")):
        if f"stages/{path.name}" in NOT_DEPENDENCIES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    names = ([a.name for a in inner.names] if isinstance(inner, ast.Import) else
                             [inner.module or ""] if isinstance(inner, ast.ImportFrom) else [])
                    for name in names:
                        if name.split(".")[0] in ("rnn", "stages"):
                            assert f"{name.replace('.', '/')}.py" in NOT_DEPENDENCIES, \
                                f"{path.name}: {node.name} imports {name} inside a function"


def test_train_stages_read_every_train_setting():
    """A train setting missing from train@'s params would leave the replicates silently stale when
    it changes: every key of the schema's train section is listed (cells and seeds make the matrix;
    overrides are read per cell)."""
    from stages.settings import Train
    listed = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["params"])
    expected = {f"train.{key}" for key in Train.model_fields} - {"train.cells", "train.seeds", "train.overrides"}
    assert expected - listed == set(), "train settings train@<cell> does not declare"
    assert "train.overrides.${item.cell}" in listed
