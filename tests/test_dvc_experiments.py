"""DVC tells the truth on a fresh clone: `dvc exp run -S` changes exactly what runs (and MLflow logs
it), metrics are compared across runs, and a code edit shows up in `dvc status`. Uses the cheap
features -> survival branch of the pipeline (the smoke profile's out-of-fold segmenters train 2 steps each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_dvc import DVC
from test_pipeline import _copy_checkout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def sh(cwd, *cmd, check=True):
    done = subprocess.run(list(cmd), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A fresh clone with the synthetic default, the survival branch run once and committed."""
    path = _copy_checkout(tmp_path_factory.mktemp("exp") / "clone")
    sh(path, sys.executable, "-m", "brainseg", "data", "prepare")
    sh(path, "dvc", "repro", "survival")
    sh(path, "git", "add", "-A")
    sh(path, "git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", "baseline")
    return path


def survival_repeats_logged(path) -> set[str]:
    probe = ("import mlflow, json; mlflow.set_tracking_uri('sqlite:///mlflow.db'); "
             "r = mlflow.search_runs(experiment_names=['brainseg-survival']); "
             "print(json.dumps(sorted(set(r['params.repeats'].dropna()))))")
    return set(json.loads(sh(path, sys.executable, "-c", probe).stdout.strip().splitlines()[-1]))


def find(node, predicate):
    """Every dict inside a JSON document for which ``predicate`` holds."""
    if isinstance(node, dict):
        if predicate(node):
            yield node
        for v in node.values():
            yield from find(v, predicate)
    elif isinstance(node, list):
        for v in node:
            yield from find(v, predicate)


@pytest.mark.parametrize("edited, changed", [
    ("brainseg/outcome/cv.py", {"features", "survival"}),
    ("brainseg/promotion.py", set()),  # runs in register (and tune), not in this branch
])
def test_a_code_edit_shows_in_dvc_status_for_the_stages_that_run_it(clone, edited, changed):
    assert json.loads(sh(clone, "dvc", "status", "features", "survival", "--json").stdout or "{}") == {}
    target = clone / edited
    original = target.read_text()
    try:
        target.write_text(original + "\n# edited\n")
        status = json.loads(sh(clone, "dvc", "status", "features", "survival", "--json").stdout or "{}")
        assert set(status) == changed
        for stage in changed:  # reported through the dep that holds it (the file or its package)
            holders = [d for d in DVC[stage]["deps"] if edited == d or edited.startswith(d + "/")]
            assert holders and any(h in json.dumps(status[stage]) for h in holders), status[stage]
    finally:
        target.write_text(original)


def test_exp_run_set_changes_what_runs_mlflow_logs_it_and_metrics_compare(clone):
    params = (clone / "params.yaml").read_text()
    assert "repeats: 2" in params
    assert survival_repeats_logged(clone) == {"2"}
    sh(clone, "dvc", "exp", "run", "-S", "survival.repeats=3", "survival")
    assert survival_repeats_logged(clone) == {"2", "3"}  # the run used exactly the recorded value

    shown = json.loads(sh(clone, "dvc", "exp", "show", "--json").stdout)
    rows = list(find(shown, lambda d: isinstance(d.get("params"), dict) and "params.yaml" in d["params"]))
    repeats = {r["params"]["params.yaml"]["data"]["survival"]["repeats"] for r in rows}
    assert {2, 3} <= repeats, repeats
    with_metrics = [r for r in rows if r.get("metrics", {}).get("reports/survival/metrics.json")]
    assert len(with_metrics) >= 2, "dvc exp show has no survival metrics for the baseline and the experiment"

    diff = json.loads(sh(clone, "dvc", "metrics", "diff", "--all", "--json").stdout)
    final = diff["reports/survival/metrics.json"]["final_roc_auc"]
    assert final["old"] is not None and final["new"] is not None  # both runs displayed
    changed = json.loads(sh(clone, "dvc", "params", "diff", "--json").stdout)["params.yaml"]["survival.repeats"]
    assert (changed["old"], changed["new"]) == (2, 3)
