"""dvc.yaml tells the truth: each stage lists the code it runs and the params it reads, metrics are
versioned, no stage applies a profile behind DVC's back, and the test split decides nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from helpers import PROJECT_ROOT

DVC = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
CLI = "brainseg.cli"  # a package: one module per noun


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


def command_function(cmd: str):
    """``brainseg data validate ...`` -> the function of the ``brainseg.cli`` package behind it."""
    from typer.main import get_command

    from brainseg.cli import app

    words = cmd.split()[1:]
    group = get_command(app)
    node = group
    while hasattr(node, "commands"):
        node = node.commands[words.pop(0)]
    return node.callback


def is_cli(mod: str) -> bool:
    return mod == CLI or mod.startswith(CLI + ".")


def function_node(mod: str, name: str) -> ast.FunctionDef:
    tree = ast.parse(module_file(mod).read_text())
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def stage_code(cmd: str) -> set[str]:
    """Files a stage's command runs: the console script imports the cli package (the module-level
    imports of each cli module it reaches), runs ``main`` (which imports brainseg.tracking.mlflow_runs), then the
    command's function; every other brainseg module counts with all it imports (:func:`code_of`)."""
    func = command_function(cmd)
    mods: set[str] = set()
    for mod, fn in ((CLI, "main"), (func.__module__, func.__name__)):
        here = mod + ".__init__" if module_file(mod).name == "__init__.py" else mod
        mods |= brainseg_imports(function_node(mod, fn), here)
    cli_seen: set[str] = set()
    todo = [CLI, func.__module__, *(m for m in mods if is_cli(m))]
    while todo:  # cli modules: module-level imports only (their other commands do not run)
        mod = todo.pop()
        if mod in cli_seen:
            continue
        cli_seen.add(mod)
        path = module_file(mod)
        assert path is not None, f"import of missing module {mod}"
        here = mod + ".__init__" if path.name == "__init__.py" else mod
        for n in ast.parse(path.read_text()).body:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                found = brainseg_imports(n, here)
                todo += [m for m in found if is_cli(m)]
                mods |= {m for m in found if not is_cli(m)}
    cli_files = {str(module_file(m).relative_to(PROJECT_ROOT)) for m in cli_seen}
    return code_of({m for m in mods if not is_cli(m)}) | cli_files


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
def test_a_stage_depends_on_no_code_it_does_not_run(stage):
    """A listed package or file holds code the stage runs, so an edit elsewhere re-runs nothing."""
    code = stage_code(DVC[stage]["cmd"])
    extra = [d for d in DVC[stage].get("deps", [])
             if d.startswith("brainseg") and not any(covered(f, [d]) for f in code)]
    assert not extra, f"dvc.yaml stage {stage!r} lists {extra}, which its command never imports"


def test_a_training_edit_re_runs_training_not_data_validation():
    for edited in ("brainseg/training/train.py", "brainseg/training/training_run.py", "brainseg/models/unets.py",
                   "brainseg/inference/segmenter.py", "brainseg/tracking/mlflow_runs.py"):
        assert not covered(edited, DVC["validate"]["deps"]), f"editing {edited} would re-run data validation"
        assert covered(edited, DVC["tune"]["deps"]), f"editing {edited} must re-run training (the tune stage)"


def test_the_code_check_follows_the_cli_package_and_catches_a_missing_dep():
    code = stage_code(DVC["validate"]["cmd"])
    # the package and the modules it imports run; other commands' deferred imports do not
    assert {"brainseg/cli/__init__.py", "brainseg/cli/common.py", "brainseg/cli/data.py",
            "brainseg/cli/segment.py", "brainseg/settings/profiles.py"} <= code
    assert "brainseg/pipeline/workflows.py" not in code
    assert "brainseg/pipeline/workflows.py" in stage_code(DVC["tune"]["cmd"])
    deps = [d for d in DVC["validate"]["deps"] if d != "brainseg/cli"]
    assert sorted(f for f in code if not covered(f, deps)) == sorted(f for f in code if f.startswith("brainseg/cli/"))


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
    ("tune", ["train", "tune", "evaluate", "split", "data", "register"]),  # tune.register: the refit registers
    ("register", ["register", "data", "survival.final"]),
    ("survival", ["survival"]),
    ("features", ["train", "evaluate", "split", "data", "survival.oof"]),  # out-of-fold segmenters
])
def test_stages_list_the_sections_they_read(stage, sections):
    assert set(sections) <= set(DVC[stage]["params"])


def test_stages_that_read_images_depend_on_the_image_folder():
    """Editing pixels changes the data version these stages read and tag: DVC must re-run them."""
    for name in ("validate", "manifest", "features", "features_truth", "tune", "register", "test_report"):
        assert "${data.root}" in DVC[name]["deps"], f"dvc.yaml stage {name!r}: add ${{data.root}} to its deps"


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
