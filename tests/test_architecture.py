"""The import rules of ARCHITECTURE.md, checked on the source (ast), so layers stay layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "brainseg"

GLUE = ("mlflow", "optuna", "optuna_integration", "streamlit", "brainseg.cli", "brainseg.workflows", "brainseg.training_run",
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
    (["config.py", "settings_io.py", "profiles.py"], GLUE + TRAINING + ("tensorflow", "tf_keras"),
     "settings load without TensorFlow"),
    (["modelcard.py"], GLUE + TRAINING, "a model card is facts in, markdown out (registry.py logs it)"),
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


# ------------------------------------------------------------------------------ the import graph
def module_names(package: Path) -> dict[str, Path]:
    """``{"brainseg.outcome.workflow": path, "brainseg.outcome": .../__init__.py, ...}``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def internal_imports(path: Path, module: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere (module level, functions,
    TYPE_CHECKING blocks): relative imports resolved, ``from pkg import x`` -> ``pkg.x`` when x is a
    module, ``from pkg.mod import name`` -> ``pkg.mod``."""
    root = next(iter(modules)).split(".")[0]

    def deepest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {deepest(a.name) for a in node.names if a.name.split(".")[0] == root}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == root:
                found |= {deepest(f"{base}.{a.name}") for a in node.names}
    found.discard(None)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(package)
    return {name: internal_imports(path, name, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module, and modules importing themselves
    (Tarjan): every module of one can reach every other through imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start = min(component)
    came_from: dict[str, str] = {}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:  # back at the start: walk the path to v backwards
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if w not in came_from:
                came_from[w] = v
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles():
    graph = import_graph()
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in brainseg (imports inside functions count too):\n" + "\n".join(
        f"{' -> '.join(closed_path(graph, c))}  (cycle among {', '.join(sorted(c))})" for c in cycles)


def test_the_cycle_finder_follows_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b\n",              # inside a function, `from pkg import module`
        "b.py": "from pkg.sub.c import thing\n",                 # `from module import name`
        "sub/__init__.py": "",
        "sub/c.py": "from .. import a\nthing = 1\n",             # relative, two levels
        "d.py": "import pkg.e\n",                                # plain import, a pair
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n",
        "f.py": "from pkg.f import x\nx = 1\n",                  # a module importing itself
        "g.py": "import os\nfrom pkg import a\n",                # imports into a cycle, not part of one
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.g"] == {"pkg.a"}
    cycles = sorted(closed_path(graph, c) for c in import_cycles(graph))
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"], ["pkg.d", "pkg.e", "pkg.d"], ["pkg.f", "pkg.f"]]


# ------------------------------------------------------------------------------ module size
MAX_LINES = 350


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_the_size_limit():
    big = {str(p.relative_to(PACKAGE)): line_count(p) for p in sorted(PACKAGE.rglob("*.py"))}
    over = {f: n for f, n in big.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them along their concerns): {over}"


# ------------------------------------------------------------------------------ the MLflow doors
# MLflow belongs behind two doors: runs, params, metrics and artifacts in tracking.py; versions,
# aliases, model cards and loading a model by URI in registry.py; the two pyfunc models and the
# serving app speak MLflow's own interfaces.
MLFLOW_DOORS = {"tracking.py", "registry.py", "serving/pyfunc.py", "serving/app.py", "outcome/pyfunc.py"}
# Modules that still import MLflow themselves today: to be moved behind tracking.py / registry.py
# (issue 26). A module leaves this list once it no longer imports MLflow; none joins it.
MLFLOW_TO_MOVE = {
    # the benchmark's harness (a tracking store per run, `mlflow models serve`, the pyfunc as served)
    "bench/report.py", "bench/server.py",
    # the served segmenter's request side: its 400 is MLflow's own exception type (BadRequest)
    "serving/request.py",
}


def mlflow_importers() -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
            if any(n == "mlflow" or n.startswith("mlflow.") for n in imports_of(p))}


def test_mlflow_is_imported_only_behind_its_doors():
    new = sorted(mlflow_importers() - MLFLOW_DOORS - MLFLOW_TO_MOVE)
    assert not new, (f"{new} import MLflow: go through brainseg.tracking (runs, metrics, artifacts) or "
                     "brainseg.registry (versions, aliases, loading a model by URI)")


def test_the_mlflow_allow_list_only_shrinks():
    gone = sorted(MLFLOW_TO_MOVE - mlflow_importers())
    assert not gone, f"{gone} no longer import MLflow: remove them from MLFLOW_TO_MOVE"
