"""The test report is the only thing the test patients' masks change: `brainseg run` on data whose test
masks are wrong (the tumor moved) against the same run on the untouched data (conftest's
``fresh_run``). A file of its own, so that its whole `brainseg run` runs in the other pytest-xdist
process while test_pipeline.py builds the clean one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from helpers import copy_checkout, pipeline_env, run_reports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _run_with_corrupted_test_masks(path: Path) -> dict:
    """`brainseg data prepare`, then move every test patient's tumor (np.roll: same pixel count, so
    the same manifest and split, but wrong labels), then `brainseg run`."""
    clone = copy_checkout(path)
    env = pipeline_env()

    def sh(*cmd):
        done = subprocess.run(list(cmd), cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done

    sh(sys.executable, "-m", "brainseg", "data", "prepare")
    split_before = (clone / "data/processed/split.csv").read_text()
    split = pd.read_csv(clone / "data/processed/split.csv")
    manifest = pd.read_csv(clone / "data/processed/manifest.csv")
    test = manifest[manifest["patient"].isin(split.loc[split["subset"] == "test", "patient"])]
    moved = 0
    for mask_path in test.loc[test["tumor_px"] > 0, "mask_path"]:
        target = Path(mask_path) if Path(mask_path).is_absolute() else clone / mask_path
        tifffile.imwrite(target, np.roll(tifffile.imread(target), (17, 23), axis=(0, 1)))
        moved += 1
    assert moved, "no test slice with tumor to corrupt"
    sh("dvc", "add", "data/raw/kaggle_3m")
    run = sh(sys.executable, "-m", "brainseg", "run")
    result = run_reports(clone, run.stdout)
    assert result["split"] == split_before  # the pipeline kept the same split
    return result


def test_corrupted_test_masks_change_only_the_test_report(request, tmp_path):
    corrupt = _run_with_corrupted_test_masks(tmp_path / "corrupt")
    # the same deterministic `brainseg run` on the untouched data: asked for only now, so that the
    # other test process builds it while this one ran the corrupted run
    clean = request.getfixturevalue("fresh_run")
    assert corrupt["split"] == clean["split"]  # same patients in train/val/test
    for key in ("best_trial", "best_params"):
        assert clean["tune"][key] == corrupt["tune"][key], key  # tuning chose the same
    assert corrupt["tune"]["best_value"] == pytest.approx(clean["tune"]["best_value"], abs=1e-6)
    seg_clean, seg_corrupt = clean["register"]["segmenter"], corrupt["register"]["segmenter"]
    assert seg_corrupt["val_patient_dice_mean"] == pytest.approx(seg_clean["val_patient_dice_mean"], abs=1e-6)
    for result in (clean, corrupt):  # smoke: no refit, so the tune stage chose them for the best trial
        seg, chosen = result["register"]["segmenter"], result["tune"]["postprocessing"]
        assert seg["inference_chosen_on"] == "val" and seg["inference"] == chosen["inference"]
        assert result["tune"]["best_model_uri"] == chosen["model_uri"]  # registered and test-reported
    assert seg_corrupt["inference"] == seg_clean["inference"]  # TTA and post-processing chosen the same
    for result in (clean, corrupt):  # promoted exactly as before: v1 through the gate
        assert "brainseg-segmenter v1" in result["stdout"] and "-> champion" in result["stdout"]
    assert corrupt["test"]["test_patient_dice_mean"] != pytest.approx(clean["test"]["test_patient_dice_mean"],
                                                                      abs=1e-3)
