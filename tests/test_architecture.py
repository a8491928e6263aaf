"""The import rules of ARCHITECTURE.md, checked on the source (ast), so layers stay layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "brainseg"

GLUE = ("mlflow", "optuna", "optuna_integration", "streamlit", "brainseg.cli", "brainseg.workflows",
        "brainseg.tracking", "brainseg.registry", "brainseg.serving", "brainseg.app", "brainseg.bench")
TRAINING = ("brainseg.train", "brainseg.evaluate", "brainseg.tune", "brainseg.inference", "brainseg.models",
            "brainseg.outcome")

# (files, forbidden import prefixes, why)
RULES = [
    (["data/**/*.py"], GLUE + TRAINING, "the data layer reads and prepares data; nothing above it"),
    (["models/**/*.py", "metrics.py"], GLUE + ("brainseg.train", "brainseg.evaluate", "brainseg.tune"),
     "architectures, losses and metrics are pure compute"),
    (["inference.py", "train.py", "evaluate.py"], GLUE,
     "fit, score and infer without a tracking server (MLflow enters through callbacks and workflows)"),
    (["config.py"], GLUE + TRAINING + ("tensorflow", "tf_keras"), "settings load without TensorFlow"),
    (["budget.py"], GLUE + TRAINING + ("tensorflow", "tf_keras", "brainseg.data"),
     "the budget plan is arithmetic: the Keras side feeds it measurements"),
]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def cases():
    for patterns, forbidden, why in RULES:
        for pattern in patterns:
            for path in sorted(PACKAGE.glob(pattern)):
                yield pytest.param(path, forbidden, why, id=str(path.relative_to(PACKAGE)))


@pytest.mark.parametrize("path, forbidden, why", list(cases()))
def test_layer_imports(path, forbidden, why):
    bad = sorted(n for n in imports_of(path) if any(n == f or n.startswith(f + ".") for f in forbidden))
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}: {why}"


def test_the_rules_cover_files():
    assert len(list(cases())) >= 10


def test_the_checker_catches_a_forbidden_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from brainseg.train import train\n    import mlflow.pyfunc\n")
    assert {"brainseg.train", "mlflow.pyfunc"} <= imports_of(f)
