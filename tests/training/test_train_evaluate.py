"""`brainseg train` and `brainseg evaluate` as a user runs them, on tiny synthetic data."""

import json

import mlflow
import pandas as pd
import pytest

from brainseg.registry.modelcard import COMPUTE_METRICS
from helpers import invoke


def _run_of(output: str):
    run_id = output.split("run ", 1)[1].split(":", 1)[0].split(";", 1)[0].strip()
    return mlflow.MlflowClient().get_run(run_id)


def test_train_logs_a_complete_mlflow_run(in_project):
    result = invoke("train", "--profile", "smoke", "--verbose", "0")
    assert result.exit_code == 0, result.output
    run = _run_of(result.output)
    client = mlflow.MlflowClient()
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["arch"] == "plain_unet" and p["profile"] == "smoke" and float(p["loss_w_dice"]) == 1.0
    # the smoke profile sets train.encoder, which the plain U-Net does not have: no record names it
    assert run.info.run_name == "train-plain_unet" and not [k for k in p if "encoder" in k]
    epochs = int(run.data.metrics["epochs_run"])
    for name in ("loss", "val_loss", "dice", "val_dice", "iou", "val_iou", "val_patient_dice"):
        assert len(client.get_metric_history(run.info.run_id, name)) == epochs, name
    best = max(m.value for m in client.get_metric_history(run.info.run_id, "val_patient_dice"))
    assert run.data.metrics["best_val_patient_dice"] == pytest.approx(best)
    assert_names_do_not_mislead(client, run, epochs)
    assert f"best epoch {int(run.data.metrics['best_epoch'])}" in result.output  # the console counts alike
    assert run.data.tags["data_version"] and run.data.tags["git_commit"]
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning_curves.png", "val_overlays.png", "val_per_patient_metrics.csv"} <= artifacts
    per_patient = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="val_per_patient_metrics.csv"))
    split = pd.read_csv("data/processed/split.csv")
    assert sorted(per_patient["patient"]) == sorted(split.loc[split.subset == "val", "patient"])
    logged = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    assert len(logged) == 1 and logged[0].name == "model"


def assert_names_do_not_mislead(client, run, epochs: int) -> None:
    """Params and metrics never share a name; per-epoch histories keep their names at steps 1..epochs
    and each has its best-epoch value as ``best_<name>``; ``best_epoch`` is the step of the highest
    val_patient_dice; the headline ``best_val_patient_dice`` is the run's first metric, the one the
    UI's Compare view opens on (on SQLite, MLflow returns metrics in the order first logged)."""
    metrics, run_id = run.data.metrics, run.info.run_id
    assert not set(run.data.params) & set(metrics)
    assert "loss" in metrics and "loss" not in run.data.params
    assert next(iter(metrics)) == "best_val_patient_dice"
    histories = {k: client.get_metric_history(run_id, k) for k in metrics}
    per_epoch = {k: h for k, h in histories.items() if len(h) > 1 or (h and h[0].step > 0)}
    assert {"loss", "val_patient_dice", "val_empty_fp_rate", "learning_rate"} <= set(per_epoch)
    running_best = per_epoch.pop("best_val_patient_dice")  # per epoch, plus the run's summary at step 0
    assert sorted(m.step for m in running_best if m.step) == list(range(1, epochs + 1))
    for key, history in per_epoch.items():
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
    dice = sorted(per_epoch["val_patient_dice"], key=lambda m: m.step)
    top = max(m.value for m in dice)
    best_step = next(m.step for m in dice if m.value == top)
    assert metrics["best_epoch"] == best_step and metrics["best_val_patient_dice"] == pytest.approx(top)
    assert all(m.value == pytest.approx(max(d.value for d in dice[:m.step])) for m in running_best if m.step)
    for key, history in per_epoch.items():
        at_best = next(m.value for m in history if m.step == best_step)
        assert metrics[f"best_{key}"] == pytest.approx(at_best), key
    summaries = set(metrics) - set(per_epoch)  # one value per run: best-epoch or evaluation, named so
    compute = set(COMPUTE_METRICS)  # what the run cost: steps, slices seen, slices/s, the plan
    assert all(k.startswith(("best_", "val_", "test_", "budget_")) or k in compute | {"epochs_run"}
               for k in summaries), summaries


def test_train_refuses_unknown_architecture_before_training(in_project):
    result = invoke("train", "--profile", "smoke", "--set", "train.arch=segformer")
    assert result.exit_code == 2
    assert "unknown architecture 'segformer'" in result.output


def test_evaluate_reports_per_patient_dice_with_counts_and_baseline(in_project, tmp_path):
    result = invoke("evaluate", "--tune", "reports/tune.json", "--subset", "test", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    metrics = {k.removeprefix("test_"): v for k, v in json.loads((tmp_path / "metrics.json").read_text()).items()}
    manifest = pd.read_csv("data/processed/manifest.csv")
    split = pd.read_csv("data/processed/split.csv")
    test_rows = manifest[manifest.patient.isin(split.loc[split.subset == "test", "patient"])]
    assert metrics["n_slices"] == len(test_rows)
    assert metrics["n_tumor_slices"] == int((test_rows.tumor_px > 0).sum())
    assert metrics["n_empty_slices"] == int((test_rows.tumor_px == 0).sum())
    assert metrics["n_patients"] == test_rows.patient.nunique()
    assert metrics["baseline_empty_patient_dice_mean"] == 0.0
    assert metrics["baseline_empty_smoothed_slice_dice_all"] == pytest.approx(
        (test_rows.tumor_px == 0).mean(), abs=0.05)
    per_patient = pd.read_csv(tmp_path / "per_patient.csv")
    assert metrics["patient_dice_mean"] == pytest.approx(per_patient["volume_dice"].mean())
    assert "per-patient volume Dice, mean" in result.output and "all-empty baseline" in result.output


def _evaluate_runs(name: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.runName = '{name}'",
                              output_format="list")


def test_evaluate_on_a_folder_of_the_public_layout(in_project, make_synth, tmp_path):
    """The run is named and tagged after the folder it scored, never `evaluate-test` / `subset=test`."""
    folder = make_synth(patients=2, slices=4, size=48, seed=5)
    best = json.loads(open("reports/tune.json").read())["best_model_uri"]
    tests_before = len(_evaluate_runs("evaluate-test"))
    result = invoke("evaluate", "--model", best, "--folder", str(folder), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["folder_n_slices"] == 8 and not any(k.startswith("test_") for k in metrics)  # 48x48, resized
    run = _run_of(result.output)
    assert run.info.status == "FINISHED" and run.info.run_name == "evaluate-folder"
    assert run.data.tags["subset"] == run.data.params["subset"] == f"folder:{folder.resolve().name}"
    assert "folder_patient_dice_mean" in run.data.metrics and "folder outside the split" in \
        run.data.tags["mlflow.note.content"]
    assert len(_evaluate_runs("evaluate-test")) == tests_before


def test_evaluate_that_fails_before_scoring_leaves_no_run(in_project, tmp_path):
    empty = tmp_path / "no_slices" / "TCGA_XX_0000_20000101"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no slices here")
    best = json.loads(open("reports/tune.json").read())["best_model_uri"]
    before = {r.info.run_id for r in _evaluate_runs("evaluate-folder")}
    result = invoke("evaluate", "--model", best, "--folder", str(empty.parent), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert {r.info.run_id for r in _evaluate_runs("evaluate-folder")} == before


def test_evaluate_that_fails_writing_its_report_ends_its_run_failed(in_project, make_synth, tmp_path, monkeypatch):
    import errno

    folder = make_synth(patients=2, slices=4, size=48, seed=6)
    best = json.loads(open("reports/tune.json").read())["best_model_uri"]
    before = {r.info.run_id for r in _evaluate_runs("evaluate-folder")}

    def full_disk(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)  # per_patient.csv, after scoring and logging
    result = invoke("evaluate", "--model", best, "--folder", str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "cannot write into" in result.output, result.output
    new = [r for r in _evaluate_runs("evaluate-folder") if r.info.run_id not in before]
    assert [r.info.status for r in new] == ["FAILED"]  # not a run that looks like a finished evaluation


def test_evaluate_unknown_model_is_a_clear_error(in_project, tmp_path):
    result = invoke("evaluate", "--model", "models:/no-such-model@champion", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "no-such-model" in result.output
