"""The main job end to end on the smoke profile, as on a fresh clone: `brainseg run` (conftest's
``fresh_run``, shared with test_pipeline_corrupted.py), then again; DVC experiments, metrics and status
on a copy of that clone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_dvc import DVC

from brainseg.pipeline.run_pipeline import pending_promotions, stage_commands
from helpers import PROJECT_ROOT, pipeline_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_stage_commands_follow_dvc_yaml_with_params_filled_in():
    params = {"data": {"root": "data/raw/kaggle_3m", "manifest": "m.csv", "split": "s.csv"}}
    stages = stage_commands(params, PROJECT_ROOT / "dvc.yaml")
    assert [s for s, _ in stages] == ["validate", "manifest", "split", "tune", "features", "features_truth",
                                      "survival", "register", "test_report"]
    assert stages[0][1] == "brainseg data validate data/raw/kaggle_3m --json reports/validate.json"


@pytest.mark.parametrize("report, pending", [
    ({}, []),
    ({"segmenter": {"name": "seg", "version": "3", "promoted": None},
      "survival": {"name": "surv", "version": 2, "promoted": None}}, [("seg", "3"), ("surv", "2")]),
    ({"segmenter": {"name": "seg", "version": "3", "promoted": False}}, []),  # the stage's gate already ran
])
def test_brainseg_run_gates_what_the_register_stage_left_ungated(tmp_path, report, pending):
    path = tmp_path / "register.json"
    if report:
        path.write_text(json.dumps(report))
    assert pending_promotions(path) == pending


def test_main_job_on_the_embedded_default_then_nothing_to_redo(fresh_run):
    clone, stdout, env = fresh_run["clone"], fresh_run["stdout"], pipeline_env()
    assert "mlflow models serve -m models:/brainseg-segmenter@champion" in stdout
    metrics = json.loads((clone / "reports/test/metrics.json").read_text())
    assert metrics["test_n_patients"] >= 1 and 0 <= metrics["test_patient_dice_mean"] <= 1
    assert json.loads((clone / "reports/survival/metrics.json").read_text())["final_roc_auc"] >= 0
    registered = json.loads((clone / "reports/register.json").read_text())
    # the register stage registers and tags; `brainseg run` then puts both through the gate
    assert registered["segmenter"]["promoted"] is None and registered["survival"]["promoted"] is None
    assert 0 <= registered["segmenter"]["val_patient_dice_mean"] <= 1
    assert "promotion gate: brainseg promote brainseg-segmenter 1" in stdout
    assert (clone / "data/raw/kaggle_3m.dvc").is_file()  # the synthetic default is DVC-tracked

    check = """
import base64, json, mlflow, pandas as pd
mlflow.set_tracking_uri("sqlite:///mlflow.db")
c = mlflow.MlflowClient()
seg = c.get_model_version_by_alias("brainseg-segmenter", "champion")
surv = c.get_model_version_by_alias("brainseg-survival", "champion")
runs = mlflow.search_runs(search_all_experiments=True)
tag = runs["tags.brainseg.pipeline_run"].dropna().unique().tolist()
model = mlflow.pyfunc.load_model("models:/brainseg-segmenter@champion")
slice_ = sorted(__import__("pathlib").Path("data/raw/kaggle_3m").glob("*/*_5.tif"))[0]
out = model.predict(pd.DataFrame({"image": [base64.b64encode(slice_.read_bytes()).decode()]}))
print(json.dumps({"seg": seg.version, "surv": surv.version, "tags": tag, "runs": len(runs),
                  "cols": list(out.columns), "rows": len(out)}))
"""
    probe = subprocess.run([sys.executable, "-c", check], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    state = json.loads(probe.stdout.strip().splitlines()[-1])
    assert str(state["seg"]) == "1" and str(state["surv"]) == "1"
    assert len(state["tags"]) == 1  # every run of this execution shares one pipeline tag
    assert state["rows"] == 1 and {"tumor", "area_px", "centroid_x", "mask_png"} <= set(state["cols"])

    again = subprocess.run([sys.executable, "-m", "brainseg", "run"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Data and pipelines are up to date" in again.stdout + again.stderr
    probe2 = subprocess.run([sys.executable, "-c", check], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=300)
    assert json.loads(probe2.stdout.strip().splitlines()[-1])["runs"] == state["runs"]  # nothing re-ran

    plots = subprocess.run(["dvc", "plots", "show", "-o", "plots"], cwd=clone, env=env, capture_output=True,
                           text=True, timeout=120)
    assert plots.returncode == 0, plots.stderr
    page = (clone / "plots" / "index.html").read_text()
    assert "per-patient volume Dice" in page and "vegaEmbed" in page
    assert "cdn.jsdelivr" not in page  # the JavaScript is inlined: the page renders offline


# --------------------------------------------------------------------------------- DVC experiments
# DVC tells the truth on the same fresh clone: `dvc exp run -S` changes exactly what runs (and MLflow
# logs it), metrics are compared across runs, and a code edit shows up in `dvc status`. They read a
# copy of conftest's `fresh_run` (its cheap features -> survival branch: the smoke profile's
# out-of-fold segmenters train 2 steps each), so the pipeline runs once for both.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def sh(cwd, *cmd, check=True):
    done = subprocess.run(list(cmd), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def clone(fresh_run, tmp_path_factory):
    """A copy of the fresh `brainseg run` clone (its survival branch already run), committed."""
    path = tmp_path_factory.mktemp("exp") / "clone"
    shutil.copytree(fresh_run["clone"], path, symlinks=True)
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
    ("brainseg/registry/promotion.py", set()),  # runs in register (and tune), not in this branch
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
