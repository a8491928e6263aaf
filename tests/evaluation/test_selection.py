"""Selection never reads test labels: with the test patients' masks replaced by wrong ones after the
split, tuning, registration and promotion run as usual, and with the test masks gone only the test
report says they are unavailable. (A dataset whose images lack masks is refused by the data layer
when its manifest is rebuilt, so the masks are deleted after tuning, with the manifest current.)"""

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import Tracking, make_project
from helpers import invoke


@pytest.fixture(scope="module")
def no_test_masks(tmp_path_factory):
    """A project split as usual; every test mask moved off its tumor (same pixel count, so the same
    manifest and split), a 1-trial study; then the test patients' mask files deleted."""
    path = make_project(tmp_path_factory.mktemp("sequestered"))
    old = os.getcwd()
    os.chdir(path)
    try:
        with Tracking(path / "mlflow.db"):
            for args in (("data", "manifest"), ("data", "split")):
                result = invoke(*args)
                assert result.exit_code == 0, result.output
            split = pd.read_csv("data/processed/split.csv")
            manifest = pd.read_csv("data/processed/manifest.csv")
            test = set(split.loc[split["subset"] == "test", "patient"])
            assert test, "the split has no test patients"
            removed = [Path(p) for p in manifest.loc[manifest["patient"].isin(test), "mask_path"]]
            for p in removed:
                tifffile.imwrite(p, np.roll(tifffile.imread(p), (17, 23), axis=(0, 1)))
            result = invoke("tune", "--profile", "smoke", "--n-trials", "1")
            assert result.exit_code == 0, result.output
            assert pd.read_csv("data/processed/split.csv").equals(split)  # the same split
            for p in removed:
                p.unlink()
    finally:
        os.chdir(old)
    return path, len(removed)


@pytest.fixture
def project(no_test_masks, monkeypatch):
    path, removed = no_test_masks
    monkeypatch.chdir(path)
    # the manifest stays current for this data version (as with a DVC-tracked dataset whose test
    # labels are withheld): no rebuild, which would refuse images without masks
    monkeypatch.setattr("brainseg.data.context.ensure_prepared", lambda settings, echo=None: [])
    with Tracking(path / "mlflow.db"):
        yield removed


def test_tuning_registration_and_promotion_need_no_test_mask(project):
    summary = json.loads(Path("reports/tune.json").read_text())
    assert summary.get("best_run_id"), summary
    result = invoke("register", "--tune", "reports/tune.json", "--survival", "missing.json", "--promote",
                    "--out", "reports/register.json")
    assert result.exit_code == 0, result.output
    seg = json.loads(Path("reports/register.json").read_text())["segmenter"]
    assert seg["promoted"] is True and seg["val_patient_dice_mean"] is not None
    champion = mlflow.MlflowClient().get_model_version_by_alias("brainseg-segmenter", "champion")
    assert str(champion.version) == seg["version"]
    assert seg["inference_chosen_on"] == "val" and seg["inference"] == summary["postprocessing"]["inference"]
    client = mlflow.MlflowClient()
    for run_id in (summary["best_run_id"], summary["postprocessing"]["run_id"]):  # the trial, the choice
        assert not any(k.startswith("test_") for k in client.get_run(run_id).data.metrics)  # no test patient


def test_the_handed_on_model_stores_the_settings_chosen_on_val(project):
    """Without a refit, the model the study hands on (registered, reported) is the best trial's
    network with the candidate that scores best on the validation patients stored with it."""
    from brainseg.data.arrays import load_full_images
    from brainseg.data.context import DataContext
    from brainseg.evaluation.evaluate import select_postprocessing
    from brainseg.inference.segmenter import InferenceSettings
    from brainseg.registry.model_registry import load_segmenter
    from brainseg.settings.config import load_settings, validate_settings

    summary = json.loads(Path("reports/tune.json").read_text())
    chosen = summary["postprocessing"]
    assert "refit" not in summary and summary["best_model_uri"] == chosen["model_uri"]
    assert chosen["trial_model_uri"] == summary["best_trial_model_uri"] != chosen["model_uri"]
    trial = load_segmenter(summary["best_trial_model_uri"])
    stored = load_segmenter(summary["best_model_uri"])
    ctx = DataContext.from_settings(validate_settings(load_settings()))
    rows = ctx.rows("val")
    best, table = select_postprocessing(trial, rows, load_full_images(rows), ctx.truths("val"))
    assert stored.settings == best == InferenceSettings.from_dict(chosen["inference"])
    for a, b in zip(stored.model.get_weights(), trial.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the same network, only the inference settings chosen
    run = mlflow.MlflowClient().get_run(chosen["run_id"])
    assert run.data.tags["inference_chosen_on"] == "val" and run.data.tags["trial_run_id"] == summary["best_run_id"]
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=chosen["run_id"],
                                                             artifact_path="val_postprocessing_candidates.csv"))
    assert len(logged) == len(table) and logged["patient_dice_mean"].max() == pytest.approx(
        table["patient_dice_mean"].max())


def test_the_test_report_says_the_masks_are_unavailable_and_the_stage_succeeds(project):
    skipped = invoke("evaluate", "--tune", "reports/tune.json", "--subset", "test", "--skip-unlabelled",
                     "--out", "reports/test")
    assert skipped.exit_code == 0, skipped.output
    assert f"test masks unavailable: {project} of {project} mask files missing" in skipped.output
    assert json.loads(Path("reports/test/metrics.json").read_text()) == {"test_masks_available": False}
    assert Path("reports/test/per_patient.csv").read_text().startswith("patient,volume_dice")
    strict = invoke("evaluate", "--tune", "reports/tune.json", "--subset", "test", "--out", "reports/test2")
    assert strict.exit_code == 2 and "test masks unavailable" in strict.output


def test_evaluate_defaults_to_validation_and_names_metrics_by_split(project):
    result = invoke("evaluate", "--tune", "reports/tune.json", "--out", "reports/val")
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("reports/val/metrics.json").read_text())
    assert "val_patient_dice_mean" in metrics and not any(k.startswith("test_") for k in metrics)
    run_id = result.output.split("run ")[-1].split(";")[0].strip()
    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert "val_patient_dice_mean" in logged and "patient_dice_mean" not in logged
