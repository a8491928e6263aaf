"""dvc.yaml tells the truth: each stage lists the code it runs and the params it reads, metrics are
versioned, no stage applies a profile behind DVC's back, and the test split decides nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT

DVC = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
CLI = PROJECT_ROOT / "brainseg" / "cli.py"


def module_file(mod: str) -> Path | None:
    p = PROJECT_ROOT.joinpath(*mod.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def brainseg_imports(node: ast.AST, current: str) -> set[str]:
    """brainseg modules imported anywhere in ``node`` (module level and inside functions)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.split(".")[0] == "brainseg"}
        elif isinstance(n, ast.ImportFrom):
            mod = n.module or ""
            if n.level:
                mod = ".".join(current.split(".")[:-n.level] + ([n.module] if n.module else []))
            if mod.split(".")[0] == "brainseg":
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in n.names if module_file(f"{mod}.{a.name}")}
    return out


def code_of(modules: set[str]) -> set[str]:
    """Files of ``modules`` and of everything they import, transitively (an over-approximation:
    imports inside functions count). An import of a missing brainseg module fails."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = module_file(mod)
        if path is None:
            parent = mod.rsplit(".", 1)[0]
            assert module_file(parent) is not None, f"import of missing module {mod}"
            continue  # `from package import name` where name is not a module
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        here = mod + ".__init__" if path.name == "__init__.py" else mod
        todo += brainseg_imports(ast.parse(path.read_text()), here)
    return {str(module_file(m).relative_to(PROJECT_ROOT)) for m in seen}


def command_function(cmd: str) -> str:
    """``brainseg data validate ...`` -> the name of the cli.py function behind it."""
    from typer.main import get_command

    from brainseg.cli import app

    words = cmd.split()[1:]
    group = get_command(app)
    node = group
    while hasattr(node, "commands"):
        node = node.commands[words.pop(0)]
    return node.callback.__name__


def stage_code(cmd: str) -> set[str]:
    tree = ast.parse(CLI.read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    top = {m for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
           for m in brainseg_imports(n, "brainseg.cli")}
    # the console script runs cli.main, which imports brainseg.tracking
    mods = top | brainseg_imports(funcs[command_function(cmd)], "brainseg.cli") | brainseg_imports(funcs["main"],
                                                                                                  "brainseg.cli")
    return code_of(mods) | {"brainseg/cli.py"}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_stage_lists_the_code_it_runs(stage):
    deps = DVC[stage].get("deps", [])
    missing = sorted(f for f in stage_code(DVC[stage]["cmd"]) if not covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r}: add {missing} to its deps"
    for d in deps:
        if d.startswith("brainseg"):
            assert (PROJECT_ROOT / d).exists(), f"dvc.yaml stage {stage!r} lists {d}, which does not exist"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_every_listed_param_exists_and_templated_values_are_listed(stage):
    listed = DVC[stage].get("params", [])
    for key in listed:
        node = PARAMS
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"stage {stage}: param {key} not in params.yaml"
            node = node[part]
    text = yaml.safe_dump(DVC[stage])
    for used in re.findall(r"\$\{([^}]+)\}", text):
        assert covered(used.replace(".", "/"), [p.replace(".", "/") for p in listed]), (stage, used)


@pytest.mark.parametrize("stage, sections", [
    ("tune", ["train", "tune", "evaluate", "split", "data"]),
    ("register", ["register", "data", "survival.final"]),
    ("survival", ["survival"]),
])
def test_stages_list_the_sections_they_read(stage, sections):
    assert set(sections) <= set(DVC[stage]["params"])


def test_no_stage_applies_a_profile_and_metrics_are_versioned():
    for name, stage in DVC.items():
        assert "--profile" not in stage["cmd"], name
        assert "experiments/profiles.yaml" not in stage.get("deps", []), name  # stages do not read it
        for entry in stage.get("metrics", []):
            cache = True if isinstance(entry, str) else next(iter(entry.values())).get("cache", True)
            assert cache is True, f"{name}: metrics must be cached DVC outputs (versioned)"


def test_the_test_split_decides_nothing():
    assert PARAMS["register"]["subset"] == "val" and PARAMS["evaluate"]["subset"] == "val"
    assert PARAMS["register"]["promote"] is False
    report = DVC["test_report"]
    assert "--subset test" in report["cmd"] and "--skip-unlabelled" in report["cmd"]
    for name, stage in DVC.items():  # nothing downstream reads the test report
        if name != "test_report":
            assert not any(str(d).startswith("reports/test") for d in stage.get("deps", [])), name
