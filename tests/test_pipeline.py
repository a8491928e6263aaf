"""The main job end to end on the smoke profile, as on a fresh clone: `brainseg run`, then again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from brainseg.pipeline import set_profile, stage_commands
from conftest import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _copy_checkout(dest: Path) -> Path:
    """The project's files as a fresh clone would have them (tracked + new, not ignored)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = PROJECT_ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def test_stage_commands_follow_dvc_yaml_with_params_filled_in():
    params = {"data": {"root": "data/raw/kaggle_3m", "manifest": "m.csv", "split": "s.csv"}}
    stages = stage_commands(params, PROJECT_ROOT / "dvc.yaml")
    assert [s for s, _ in stages] == ["validate", "manifest", "split", "tune", "evaluate", "features",
                                      "survival", "register"]
    assert stages[0][1] == "brainseg data validate data/raw/kaggle_3m --json reports/validate.json"


def test_set_profile_keeps_comments_and_refuses_unknown_profiles(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT_ROOT / "params.yaml", "params.yaml")
    shutil.copytree(PROJECT_ROOT / "experiments", "experiments")
    assert set_profile("cpu") is True
    text = Path("params.yaml").read_text()
    assert "profile: cpu" in text and "# The one source of defaults" in text
    assert set_profile("cpu") is False
    from brainseg.config import ConfigError

    with pytest.raises(ConfigError, match="unknown profile"):
        set_profile("tpu")


def test_main_job_on_the_embedded_default_then_nothing_to_redo(tmp_path):
    clone = _copy_checkout(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    first = subprocess.run([sys.executable, "-m", "brainseg", "run"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "mlflow models serve -m models:/brainseg-segmenter@champion" in first.stdout
    metrics = json.loads((clone / "reports/evaluate/metrics.json").read_text())
    assert metrics["n_patients"] >= 1 and 0 <= metrics["patient_dice_mean"] <= 1
    assert json.loads((clone / "reports/survival/metrics.json").read_text())["final_roc_auc"] >= 0
    registered = json.loads((clone / "reports/register.json").read_text())
    assert registered["segmenter"]["promoted"] and registered["survival"]["promoted"]
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
