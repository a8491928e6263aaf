"""`brainseg train` killed and resumed as a user would (issue 27): SIGKILL after the second of four
epochs, then `brainseg train --resume`; SIGTERM ends the run KILLED with the resume command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import mlflow
import numpy as np

from conftest import Tracking, make_project
from helpers import invoke

PER_EPOCH = ("loss", "val_loss", "val_patient_dice", "best_val_patient_dice", "val_dice", "learning_rate")


def _start(project, *args):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, "-m", "brainseg", "train", "--profile", "smoke", "--progress", "lines",
                             "--no-test-report", *args], cwd=project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _until_epoch(proc, n: int) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"epoch {n}/"):
            return "".join(seen)
    raise AssertionError("training ended before epoch %d:\n%s" % (n, "".join(seen)))


def _runs(project):
    with Tracking(project / "mlflow.db"):
        return mlflow.search_runs(experiment_names=["brainseg"], output_format="list")


def test_a_training_killed_after_two_of_four_epochs_resumes_in_the_same_run(tmp_path, monkeypatch):
    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    proc = _start(project)
    _until_epoch(proc, 2)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: the run stays RUNNING
    proc.wait(timeout=60)
    [run] = _runs(project)
    assert run.info.status == "RUNNING"
    run_id = run.info.run_id

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    listed = invoke("checkpoints")
    assert listed.exit_code == 0 and run_id in listed.output and "brainseg train --resume --run" in listed.output

    resumed = invoke("train", "--resume", "--progress", "none")
    assert resumed.exit_code == 0, resumed.output
    assert run_id in resumed.output and "Traceback" not in resumed.output
    [run] = _runs(project)  # the same run, reopened: no second run
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert int(run.data.tags["brainseg.resumed_from_epoch"]) >= 2
    with Tracking(project / "mlflow.db"):
        client = mlflow.MlflowClient()
        for name in PER_EPOCH:  # every per-epoch metric has steps 1-4, once each (step 0: the run's summary)
            assert sorted(m.step for m in client.get_metric_history(run_id, name) if m.step) == [1, 2, 3, 4], name
        dice = [m.value for m in sorted(client.get_metric_history(run_id, "val_patient_dice"), key=lambda m: m.step)]
        # the best epoch over all four (1-based) is the one restored and logged
        assert run.data.metrics["best_epoch"] == int(np.argmax(dice)) + 1
        [logged] = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")
        from brainseg.registry.model_registry import load_segmenter

        segmenter = load_segmenter(f"models:/{logged.model_id}")
    image = np.zeros((32, 32, 3), np.uint8)
    result = segmenter.segment([image])
    assert result.masks[0].shape == (32, 32)
    assert not (project / "checkpoints").exists()  # a finished run's checkpoint is cleaned up
    assert "no interrupted runs" in invoke("checkpoints").output


def test_sigterm_ends_the_run_killed_with_the_resume_command_in_its_description(tmp_path):
    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    proc = _start(project, "--set", "train.epochs=500", "--set", "train.patience=500")
    seen = _until_epoch(proc, 2)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    output = seen + rest
    assert proc.returncode == 143, output
    assert "Traceback" not in output
    [run] = _runs(project)
    assert run.info.status == "KILLED" and run.data.tags["brainseg.stopped_by"] == "SIGTERM"
    note = run.data.tags["mlflow.note.content"]
    command = f"brainseg train --resume --run {run.info.run_id}"
    assert "Stopped by SIGTERM after epoch" in note and command in note and command in output
    assert (project / "checkpoints" / run.info.run_id / "state.json").is_file()


def test_a_tuning_refit_killed_mid_way_is_finished_by_train_resume(tmp_path, monkeypatch):
    """The refit is a training run like the others: killed after its first epoch, `brainseg train
    --resume` continues it in the same run, then registers it and links it to its study as
    `brainseg tune` would have."""
    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "brainseg", "tune", "--profile", "smoke", "--study-name", "killed",
                             "--n-trials", "1", "--set", "tune.size=32", "--set", "tune.epochs=3",
                             "--set", "train.size=32", "--refit", "--register"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("refit  epoch 1/"):
            break
    else:
        raise AssertionError("the refit did not start:\n" + "".join(seen))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    [refit] = [r for r in _runs(project) if r.data.tags.get("brainseg.role") == "refit"]
    assert refit.info.status == "RUNNING"  # a SIGKILL ends nothing
    parent_id = refit.data.tags["brainseg.study_parent_run_id"]

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    listed = invoke("checkpoints")
    assert "the refit of trial 0 of study killed" in listed.output and refit.info.run_id in listed.output
    resumed = invoke("train", "--resume", "--progress", "none")
    assert resumed.exit_code == 0, resumed.output
    assert "refit of trial 0 of study killed finished" in resumed.output and "registered version 1" in resumed.output
    runs = _runs(project)
    [refit] = [r for r in runs if r.data.tags.get("brainseg.role") == "refit"]  # reopened, not a second one
    assert refit.info.status == "FINISHED" and "test_patient_dice_mean" in refit.data.metrics  # as the refit reports
    with Tracking(project / "mlflow.db"):
        client = mlflow.MlflowClient()
        epochs = int(refit.data.params["epochs"])
        steps = sorted(m.step for m in client.get_metric_history(refit.info.run_id, "val_patient_dice") if m.step)
        assert steps == list(range(1, epochs + 1)) and epochs >= 2
        parent = client.get_run(parent_id)
        assert parent.data.tags["refit_run_id"] == refit.info.run_id and parent.data.tags["refit_model_version"] == "1"
        version = client.get_model_version("brainseg-segmenter", "1")
        assert version.run_id == refit.info.run_id and version.tags["refit_of_trial"] == "0"
    assert not (project / "checkpoints").exists()
