"""The import rules of ARCHITECTURE.md, checked on the source (ast), so layers stay layers."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "brainseg"

PACKAGES = ("settings", "data", "models", "inference", "evaluation", "training", "tracking", "registry",
            "serving", "outcome", "tune", "pipeline", "app", "bench", "cli")


def above(*names: str) -> tuple[str, ...]:
    """``brainseg.<name>`` for each package name."""
    return tuple(f"brainseg.{n}" for n in names)


TOOLS = ("mlflow", "optuna", "optuna_integration", "streamlit")
TF = ("tensorflow", "tf_keras", "segmentation_models")

# (files, forbidden import prefixes, why): one glob per package, so every module is under a rule
# (test_every_module_is_under_a_rule); a few pure modules carry a second, stricter rule.
RULES = [
    (["*.py"], above(*PACKAGES[2:-1]) + TOOLS + TF,
     "the package's top holds only __init__ (the Keras variables) and __main__ (the CLI)"),
    (["settings/**/*.py"], above(*PACKAGES[1:]) + TOOLS + TF, "settings load without TensorFlow or MLflow"),
    (["data/**/*.py"], above(*PACKAGES[2:]) + TOOLS, "the data layer reads and prepares data; nothing above it"),
    (["models/**/*.py"], above(*PACKAGES[3:]) + TOOLS, "architectures and losses are pure compute"),
    (["inference/**/*.py"], above(*PACKAGES[4:]) + TOOLS,
     "slice -> mask without a tracking server, training or scoring"),
    (["evaluation/**/*.py"], above("training", "serving", "outcome", "tune", "pipeline", "app", "bench", "cli")
     + ("optuna", "optuna_integration", "streamlit"), "scoring is below training and every workflow"),
    (["evaluation/metrics.py", "evaluation/evaluate.py", "evaluation/plots.py"],
     above(*PACKAGES[5:]) + TOOLS, "metrics, scoring and figures are pure compute (evaluate_run is the glue)"),
    (["evaluation/surface.py"], above(*PACKAGES[1:]) + TOOLS + TF, "boundary figures: numpy / scipy on masks"),
    (["training/**/*.py"], above("registry", "serving", "outcome", "tune", "pipeline", "app", "bench", "cli")
     + ("mlflow", "optuna", "optuna_integration", "streamlit"),
     "training calls MLflow only through tracking (training_run is the tracked run)"),
    ([f"training/{m}.py" for m in ("train", "train_callbacks", "checkpoint", "full_disk", "throughput", "progress",
                                   "progress_callbacks")], above("tracking", "registry") + TOOLS,
     "fit without a tracking server (MLflow enters through callbacks and training_run)"),
    (["training/budget.py"], above(*PACKAGES[1:]) + TOOLS + TF,
     "the budget plan is arithmetic: the Keras side feeds it measurements"),
    (["tracking/**/*.py"], above("training", "registry", "outcome", "tune", "pipeline", "app", "bench", "cli")
     + ("optuna", "optuna_integration", "streamlit"), "the MLflow door for runs knows no workflow"),
    (["registry/**/*.py"], above("training", "outcome", "tune", "pipeline", "app", "bench", "cli")
     + ("optuna", "optuna_integration", "streamlit"), "versions, the gate and cards know no training or workflow"),
    (["registry/modelcard.py"], above(*PACKAGES[1:]) + TOOLS + TF,
     "a model card is facts in, markdown out (model_registry logs it)"),
    (["serving/**/*.py"], above("evaluation", "training", "tracking", "registry", "tune", "pipeline", "app", "bench",
                                "cli") + ("optuna", "optuna_integration", "streamlit"),
     "the served model is inference and a request, nothing of training or the registry"),
    (["outcome/**/*.py"], above("tune", "pipeline", "app", "bench", "cli") + ("optuna", "optuna_integration",
                                                                              "streamlit"),
     "the outcome model knows no tuning or workflow"),
    (["tune/**/*.py"], above("pipeline", "app", "bench", "cli") + ("streamlit",),
     "tuning calls training, never the workflows above it"),
    (["pipeline/**/*.py"], above("app", "bench", "cli") + ("streamlit",),
     "workflows across stages; the surfaces call them"),
    (["app/**/*.py"], above("training", "tune", "bench", "cli") + ("optuna", "optuna_integration"),
     "the page segments through the one inference path, it never trains"),
    (["bench/**/*.py"], above("app", "cli") + ("streamlit",), "the benchmark measures; the CLI calls it"),
    (["cli/**/*.py"], ("streamlit", "brainseg.app.page"), "commands call workflows; the page runs in its own process"),
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


def test_every_module_is_under_a_rule():
    covered = {path for patterns, _, _ in RULES for pattern in patterns for path in PACKAGE.glob(pattern)}
    missing = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p not in covered)
    assert not missing, f"modules no layer rule covers (add their package to RULES): {missing}"


def test_the_top_of_the_package_holds_only_init_and_main():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(PACKAGES)


def test_the_checker_catches_a_forbidden_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from brainseg.training.train import train\n    import mlflow.pyfunc\n")
    assert {"brainseg.training.train", "mlflow.pyfunc"} <= imports_of(f)


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


# ------------------------------------------------------------------------------ deferred imports
# An import inside a function defers loading a heavy library (TensorFlow, MLflow, Optuna, pandas...) that
# the module itself does not load, so that `brainseg --help` and light commands start fast; every
# other import belongs at the top of the module. Imports in a `try:` body (an optional or
# platform-specific dependency: psutil, ctypes) are exempt.
HEAVY = ("pandas", "tensorflow", "tf_keras", "segmentation_models", "mlflow", "optuna", "optuna_integration",
         "matplotlib", "sklearn", "skimage", "streamlit")


def _targets(node: ast.AST, module: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """What one import statement names: package modules (deepest existing) or external names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
        if node.level else (node.module or "")
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def heavy_loads(package: Path = PACKAGE) -> dict[str, set[str]]:
    """For every module of ``package``: the heavy libraries its module-level imports load, transitively."""
    modules = module_names(package)
    top = {m: [t for n in ast.parse(p.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))
               for t in _targets(n, m, p, modules)] for m, p in modules.items()}
    memo: dict[str, set[str]] = {}

    def loads(name: str, seen: frozenset) -> set[str]:
        if name.split(".")[0] in HEAVY:
            return {name.split(".")[0]}
        while name and name not in modules:  # `pkg.mod.name` -> `pkg.mod`
            name = name.rpartition(".")[0]
        if not name or name in seen:
            return set()
        if name not in memo:
            memo[name] = set().union(*(loads(t, seen | {name}) for t in top[name]))
        return memo[name]

    return {m: loads(m, frozenset()) for m in modules}


def needless_deferrals(package: Path = PACKAGE) -> list[str]:
    modules, heavy = module_names(package), heavy_loads(package)
    out = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        exempt = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for s in t.body for n in ast.walk(s)}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in exempt:
                    loads = set()
                    for target in _targets(node, module, path, modules):
                        root = target.split(".")[0]
                        loads |= ({root} if root in HEAVY
                                  else heavy.get(target, heavy.get(target.rpartition(".")[0], set())))
                    if not loads - heavy[module]:
                        out.append(f"{path.relative_to(package.parent)}:{node.lineno} {ast.unparse(node)}")
    return sorted(set(out))


def test_imports_inside_functions_only_defer_heavy_libraries():
    found = needless_deferrals()
    assert not found, ("imports inside functions that defer no heavy library (move them to the top of the "
                       "module):\n" + "\n".join(found))


def test_the_deferral_rule_tells_a_heavy_import_from_a_light_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    files = {
        "__init__.py": "",
        "light.py": "import json\n",
        "heavy.py": "import tensorflow\n",
        "a.py": ("def f():\n    import json\n"            # light: belongs at the top
                 "def g():\n    from pkg import heavy\n"  # defers TensorFlow: fine
                 "def h():\n    from pkg.light import json\n"  # a light module: belongs at the top
                 "def i():\n    try:\n        import psutil\n    except ImportError:\n        pass\n"),
        "b.py": "import mlflow\ndef f():\n    import mlflow.pyfunc\n",  # MLflow is loaded already
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert heavy_loads(pkg)["pkg.heavy"] == {"tensorflow"} and heavy_loads(pkg)["pkg.light"] == set()
    assert needless_deferrals(pkg) == ["pkg/a.py:2 import json", "pkg/a.py:6 from pkg.light import json",
                                       "pkg/b.py:3 import mlflow.pyfunc"]


# ------------------------------------------------------------------------------ module size
MAX_LINES = 350


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_the_size_limit():
    big = {str(p.relative_to(PACKAGE)): line_count(p) for p in sorted(PACKAGE.rglob("*.py"))}
    over = {f: n for f, n in big.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them along their concerns): {over}"


# ------------------------------------------------------------------------------ the MLflow doors
# MLflow belongs behind two doors: runs, params, metrics and artifacts in tracking/mlflow_runs.py;
# versions, aliases, model cards and loading a model by URI in registry/model_registry.py; the two pyfunc models and the
# serving app speak MLflow's own interfaces.
MLFLOW_DOORS = {"tracking/mlflow_runs.py", "tracking/search.py", "registry/model_registry.py", "serving/pyfunc.py",
                "serving/scoring_app.py", "outcome/pyfunc.py"}


def test_mlflow_importers_are_exactly_the_doors():
    # the issue's own check: grep -rlE "^\s*(import|from) mlflow" brainseg lists these and no other
    import re

    pattern = re.compile(r"^\s*(import|from) mlflow", re.M)
    found = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())}
    assert found == MLFLOW_DOORS, found ^ MLFLOW_DOORS


def mlflow_importers() -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
            if any(n == "mlflow" or n.startswith("mlflow.") for n in imports_of(p))}


def test_mlflow_is_imported_only_behind_its_doors():
    new = sorted(mlflow_importers() - MLFLOW_DOORS)
    assert not new, (f"{new} import MLflow: go through brainseg.tracking.mlflow_runs (runs, metrics, artifacts) or "
                     "brainseg.registry.model_registry (versions, aliases, loading a model by URI)")


# ------------------------------------------------------------------------------ lint
# The project's own ruff settings (pyproject.toml [tool.ruff]: line length 120, isort with the Keras
# variables first); .ci/run runs `ruff check .` too, before the tests.
needs_ruff = pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                                reason="ruff is not installed (pip install -e '.[test]')")


def ruff(*args: str, cwd: Path = PACKAGE.parent) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@needs_ruff
def test_ruff_passes_on_the_package_and_the_tests():
    done = ruff("brainseg", "tests")
    assert done.returncode == 0, f"ruff check brainseg tests:\n{done.stdout[-4000:]}{done.stderr[-1000:]}"


@needs_ruff
def test_ruff_reads_the_projects_settings(tmp_path):
    # 120 characters pass and 121 do not (ruff's default is 88); the Keras variables' import sorts first
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("import brainseg.settings.keras_env  # noqa: F401\n\nimport os\n\n"
                    "X = os.sep + " + repr("x" * 105) + "\n")
    bad.write_text("import os\n\nimport brainseg.settings.keras_env  # noqa: F401\n\n"
                   "X = os.sep + " + repr("x" * 106) + "\n")
    config = ("--config", str(PACKAGE.parent / "pyproject.toml"))
    assert max(len(line) for line in good.read_text().splitlines()) == 120
    done = ruff(*config, str(good))
    assert done.returncode == 0, done.stdout
    done = ruff(*config, str(bad))
    assert done.returncode == 1 and "E501" in done.stdout and "I001" in done.stdout, done.stdout


# ------------------------------------------------------------------------------ one name, one thing
# Public functions that were defined twice for different things (issue 36): each name now has one
# definition in the package (the CLI's `train` is train_command, the pipeline's run run_all_stages, ...).
ONE_MEANING = ("train", "run", "client", "overlay", "measure")


def public_functions(package: Path = PACKAGE) -> dict[str, list[str]]:
    """{function name: [modules defining it at module level]} for public names."""
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                found.setdefault(node.name, []).append(str(path.relative_to(package)))
    return found


def test_names_that_meant_two_things_are_defined_once():
    found = public_functions()
    twice = {name: found[name] for name in ONE_MEANING if len(found.get(name, [])) > 1}
    assert not twice, f"defined in more than one module (name what each does): {twice}"


# ------------------------------------------------------------------------------ the doc says the same
LIBRARIES = {"MLflow": ("mlflow",), "Optuna": ("optuna", "optuna_integration"), "Streamlit": ("streamlit",),
             "TensorFlow": TF}


def documented_rules(text: str) -> dict[tuple[str, ...], set[str]]:
    """ARCHITECTURE.md's layer table: {(modules, ...): forbidden imports}. A row's first cell names
    its modules in backticks (``settings/`` for a package); its last, the forbidden packages in
    backticks and the libraries by name (LIBRARIES)."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        modules = tuple(re.findall(r"`([^`]+)`", cells[0]))
        packages, _, libraries = cells[-1].partition(";")
        forbidden = {f"brainseg.{p}" for p in re.findall(r"`([^`]+)`", packages)}
        for word in re.findall(r"[A-Za-z]+", libraries):
            forbidden.update(LIBRARIES[word])
        out[modules] = forbidden
    return out


def test_architecture_md_states_the_rules():
    doc = documented_rules((PACKAGE.parent / "ARCHITECTURE.md").read_text())
    rules = {tuple(p.replace("/**/*.py", "/") for p in patterns): set(forbidden) for patterns, forbidden, _ in RULES}
    assert doc.keys() == rules.keys(), f"rows only in ARCHITECTURE.md: {doc.keys() - rules.keys()}; " \
                                       f"rules only in the test: {rules.keys() - doc.keys()}"
    wrong = {m: {"doc only": sorted(doc[m] - rules[m]), "test only": sorted(rules[m] - doc[m])}
             for m in rules if doc[m] != rules[m]}
    assert not wrong, f"ARCHITECTURE.md's layer table and RULES disagree: {wrong}"
