"""`brainseg cv` (issue 34): out-of-fold evidence from models that never saw the patients, choices on
the pooled out-of-fold predictions, the fold ensemble as the model, resumable, and a gate that compares
like with like."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import tifffile

from brainseg.settings.config import validate_settings
from conftest import Tracking, prepared_project
from helpers import invoke

pytestmark = pytest.mark.slow

TINY = ["--set", "train.epochs=2", "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=4",
        "--set", "train.base_filters=4", "--set", "evaluate.batch_size=8", "--folds", "2"]


def runs(tracking_uri: str, **tags) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("brainseg")
    if exp is None:
        return []
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([exp.experiment_id], filter_string=where, max_results=100)


def oof_table(tracking_uri: str, parent_id: str) -> pd.DataFrame:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="cv_oof_patients.csv",
                                               tracking_uri=tracking_uri)
    return pd.read_csv(path)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """A CV killed (SIGKILL) right after its first fold finished, then `brainseg cv --resume`."""
    path = prepared_project(tmp_path_factory.mktemp("cv"), patients=12, slices=6)
    uri = f"sqlite:///{path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "BRAINSEG_VERBOSE": "0"}
    cmd = [sys.executable, "-m", "brainseg", "cv", "--progress", "none", *TINY]
    proc = subprocess.Popen(cmd, cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if [r for r in runs(uri, **{"brainseg.role": "cv-fold"}) if r.info.status == "FINISHED"]:
            break
        time.sleep(1)
    assert proc.poll() is None, "the CV ended before it could be killed:\n" + proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {r.data.tags["brainseg.cv_fold"]: r.info.run_id
             for r in runs(uri, **{"brainseg.role": "cv-fold"}) if r.info.status == "FINISHED"}
    resumed = subprocess.run([sys.executable, "-m", "brainseg", "cv", "--resume", "--progress", "none"], cwd=path,
                             env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return path, uri, first, resumed.stdout


def test_a_cv_killed_after_its_first_fold_resumes_and_trains_each_fold_once(killed_and_resumed):
    path, uri, first, output = killed_and_resumed
    assert len(first) == 1 and "done before" in output
    parents = runs(uri, **{"brainseg.role": "cv"})
    assert len(parents) == 1 and parents[0].data.tags["brainseg.cv_state"] == "assembled"
    folds = runs(uri, **{"brainseg.role": "cv-fold", "brainseg.cv_parent": parents[0].info.run_id})
    finished = [r for r in folds if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["brainseg.cv_fold"] for r in finished) == ["0", "1"]  # each fold once
    (k, run_id), = first.items()
    assert [r.info.run_id for r in finished if r.data.tags["brainseg.cv_fold"] == k] == [run_id]  # not retrained
    m = parents[0].data.metrics
    for key in ("cv_patient_dice_mean", "cv_patient_dice_median", "cv_patient_dice_ci_low", "cv_patient_dice_ci_high",
                "cv_tumor_slice_dice_mean", "cv_empty_slice_fp_rate", "cv_fold_dice_sd", "cv_n_patients",
                "test_patient_dice_mean"):
        assert key in m, key
    assert "register it with `brainseg register --run" in output


def test_every_non_test_patient_is_out_of_fold_once_from_a_model_that_never_saw_it(killed_and_resumed):
    path, uri, _, _ = killed_and_resumed
    split = pd.read_csv(path / "data/processed/split.csv")
    parent = runs(uri, **{"brainseg.role": "cv"})[0]
    table = oof_table(uri, parent.info.run_id)
    non_test = set(split.loc[split["subset"] != "test", "patient"])
    assert sorted(table["patient"]) == sorted(non_test)  # each exactly once, no test patient
    held = {int(r.data.tags["brainseg.cv_fold"]): set(r.data.tags["brainseg.cv_held_out"].split(","))
            for r in runs(uri, **{"brainseg.role": "cv-fold"}) if r.info.status == "FINISHED"}
    for row in table.itertuples():
        assert row.patient in held[row.fold]  # scored by the model of the fold that held it out
        assert all(row.patient not in h for k, h in held.items() if k != row.fold)  # trained on by the others
    assert int(parent.data.metrics["cv_n_patients"]) == int(table["volume_dice"].notna().sum())


def test_the_gate_compares_like_with_like(killed_and_resumed, monkeypatch):
    """A single-split champion and a CV challenger: the gate says they differ in kind and keeps the
    champion; --force decides. Two CVs on the same folds are compared by their out-of-fold score."""
    path, uri, _, _ = killed_and_resumed
    monkeypatch.chdir(path)
    parent = runs(uri, **{"brainseg.role": "cv"})[0].info.run_id
    with Tracking(path / "mlflow.db"):
        r = invoke("train", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--progress", "none",
                   "--no-test-report")
        assert r.exit_code == 0, r.output
        single = [x for x in runs(uri) if x.info.run_name.startswith("train-") and x.info.status == "FINISHED"]
        r = invoke("register", "--run", single[0].info.run_id, "--promote")
        assert r.exit_code == 0 and "-> champion" in " ".join(r.output.split()), r.output
        r = invoke("register", "--run", parent, "--promote")
        text = " ".join(r.output.split())
        assert r.exit_code == 0 and "evidence of different kinds" in text and "-> not promoted" in text, text
        assert "--force" in text
        r = invoke("promote", "brainseg-segmenter", "2", "--force")
        assert r.exit_code == 0 and "-> champion" in " ".join(r.output.split()), r.output


def test_a_registered_ensemble_served_by_mlflow_answers_the_masks_of_brainseg_predict(killed_and_resumed, tmp_path):
    """`mlflow models serve -m models:/brainseg-segmenter/N` of the CV ensemble, the documented request
    (base64 slices and their patient): the same masks as `brainseg predict` on the same slices."""
    import base64

    import mlflow
    import requests

    from brainseg.bench import serve_model
    from brainseg.data import imageio
    from brainseg.inference.ensemble import members_of
    from brainseg.pipeline.predict import collect_inputs
    from brainseg.registry import model_registry

    path, uri, _, _ = killed_and_resumed
    parent = runs(uri, **{"brainseg.role": "cv"})[0].info.run_id
    with Tracking(path / "mlflow.db"):
        versions = mlflow.MlflowClient().search_model_versions("name = 'brainseg-segmenter'")
        version = next((v.version for v in versions if v.run_id == parent), None)
        if version is None:
            r = invoke("register", "--run", parent)
            assert r.exit_code == 0, r.output
            version = next(v.version for v in mlflow.MlflowClient().search_model_versions(
                "name = 'brainseg-segmenter'") if v.run_id == parent)
        model_uri = f"models:/brainseg-segmenter/{version}"
        assert len(members_of(model_registry.load_segmenter(model_uri).model)) == 2  # the two folds' networks
        folder = next(p for p in (path / "data/raw/kaggle_3m").iterdir() if p.is_dir())
        files, _ = collect_inputs([folder])
        r = invoke("predict", folder, "--model", model_uri, "--out", tmp_path / "pred")
        assert r.exit_code == 0, r.output
        by_predict = {f.name: imageio.check_mask(imageio.decode_bytes(next((tmp_path / "pred").rglob(
            f"{f.stem}_pred.png")).read_bytes(), "p"), "p") for f in files}
        rows = [[base64.b64encode(f.read_bytes()).decode(), folder.name.rsplit("_", 1)[0]] for f in files]
        with serve_model(model_uri, mlflow.get_tracking_uri(), tmp_path / "serve", timeout_s=300) as server:
            answer = requests.post(f"{server.url}/invocations", timeout=120,
                                   json={"dataframe_split": {"columns": ["image", "patient"], "data": rows}})
    assert answer.status_code == 200, answer.text[:500]
    served = [imageio.check_mask(imageio.decode_bytes(base64.b64decode(row["mask_png"]), "a"), "a")
              for row in answer.json()["predictions"]]
    for f, mask in zip(files, served, strict=True):
        np.testing.assert_array_equal(mask, by_predict[f.name], err_msg=f.name)


def stored_cv(uri: str):
    """(the CV parent's run id, its stored settings checked, its data) in a project of ``killed_and_resumed``."""
    from brainseg.data.context import DataContext
    from brainseg.pipeline import cv

    parent = runs(uri, **{"brainseg.role": "cv"})[0].info.run_id
    settings = validate_settings(cv.stored_settings(parent))
    return parent, settings, DataContext.from_settings(settings)


def test_a_study_refit_by_cross_validation_registers_the_ensemble_with_its_evidence(killed_and_resumed,
                                                                                     monkeypatch):
    """`tune.refit: cv`: the best trial's configuration cross-validated, the ensemble registered with
    out-of-fold evidence (never scored on the validation patients it trained on)."""
    import mlflow

    from brainseg.pipeline import study_evidence
    from brainseg.tracking import mlflow_runs

    path, uri, _, _ = killed_and_resumed
    monkeypatch.chdir(path)
    with Tracking(path / "mlflow.db"):
        parent, settings, ctx = stored_cv(uri)
        mlflow_runs.set_experiment("brainseg")
        summary = {"best_trial": 0, "best_params": {"lr": 0.002}, "parent_run_id": None}
        out = study_evidence.refit_cv(settings, ctx, "brainseg", summary, register=True, echo=lambda _: None)
        assert out["kind"] == "cv" and out["run_id"] != parent and out["model_uri"]
        assert mlflow.MlflowClient().get_run(out["run_id"]).data.params["lr"] == "0.002"  # the best trial's
        version = mlflow.MlflowClient().get_model_version("brainseg-segmenter", out["registered"]["version"])
        assert version.tags["brainseg.evidence"] == "cv" and "cv_patient_dice_mean" in version.tags
        assert not any(k.startswith("val_patient_dice") for k in version.tags)  # not scored on val


@pytest.mark.parametrize("second, within, words", [
    ([0.50, 0.40, 0.55, 0.45, 0.52], False, "beyond the noise"),     # every patient lower: a real difference
    ([0.85, 0.65, 0.88, 0.62, 0.84], True, "cannot tell them apart"),  # up and down around the best: noise
])
def test_the_top_two_trials_are_said_to_be_within_the_noise_or_not(tmp_path, second, within, words):
    """The study's summary: the paired per-patient difference of its top two trials on the validation
    patients, and whether its bootstrap interval holds 0."""
    import pandas as pd

    from brainseg.pipeline.study_evidence import noise_line, top_two_noise
    from brainseg.tracking import mlflow_runs

    with Tracking(tmp_path / "mlflow.db"):
        mlflow_runs.set_experiment("noise", tmp_path / "artifacts")
        with mlflow_runs.run("study", {}) as study:
            parent = study.info.run_id
        for best, dice in ((0.80, [0.80, 0.70, 0.90, 0.60, 0.85]), (0.79, second)):
            with mlflow_runs.run(f"trial-{best}", {"mlflow.parentRunId": parent}):
                mlflow_runs.log_active_metrics({"best_val_patient_dice": best})
                mlflow_runs.log_table(pd.DataFrame({"patient": list("abcde"), "volume_dice": dice}),
                                      "val_per_patient_metrics.csv")
        noise = top_two_noise("noise", parent)
    assert noise["n_patients"] == 5 and noise["within_noise"] is within
    assert words in noise_line(noise)


def test_no_test_mask_is_read_before_the_report_and_corrupting_them_changes_only_the_report(
        killed_and_resumed, monkeypatch):
    """The choices (post-processing) and the out-of-fold figures come from the same fold models
    whatever the test masks hold; only the test report moves."""
    from brainseg.data import imageio
    from brainseg.pipeline import cv, cv_ensemble
    from brainseg.tracking import mlflow_runs

    path, uri, _, _ = killed_and_resumed
    monkeypatch.chdir(path)
    with Tracking(path / "mlflow.db"):
        parent, settings, ctx = stored_cv(uri)
        plan = cv.plan_cv(settings, ctx)
        done = cv.finished_folds("brainseg", parent)
        test_masks = set(ctx.rows("test")["mask_path"])
        read, reporting = [], {"on": False}
        real_read, real_report = imageio.read_mask, cv_ensemble.ensemble_test_report

        def spy(p, *a, **k):
            read.append((str(p), reporting["on"]))
            return real_read(p, *a, **k)

        def report(*a, **k):
            reporting["on"] = True
            return real_report(*a, **k)

        monkeypatch.setattr(imageio, "read_mask", spy)
        monkeypatch.setattr(cv_ensemble, "ensemble_test_report", report)
        mlflow_runs.set_experiment("brainseg")
        with mlflow_runs.run("cv-assemble-check", {}):
            before = cv_ensemble.assemble(plan, ctx, done, parent)
        assert not [p for p, during in read if p in test_masks and not during]
        assert [p for p, during in read if p in test_masks and during]  # the report did read them
        for p in test_masks:  # corrupt every test mask: all tumor
            tifffile.imwrite(p, np.full(tifffile.imread(p).shape, 255, np.uint8))
        with mlflow_runs.run("cv-assemble-check-corrupted", {}):
            after = cv_ensemble.assemble(plan, ctx, done, parent)
    assert before["inference"] == after["inference"]
    for key in ("cv_patient_dice_mean", "cv_patient_dice_median", "cv_empty_slice_fp_rate", "cv_fold_dice_sd"):
        assert before[key] == pytest.approx(after[key], nan_ok=True), key
    assert before["test_patient_dice_mean"] != pytest.approx(after["test_patient_dice_mean"])
