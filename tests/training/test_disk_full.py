"""A full disk while a model is logged or registered (issue 37), on a real small filesystem: a tmpfs
mounted where the MLflow store keeps models (or a run's artifacts), as root; skipped where mounting
is not permitted (the in-process cases with a faked ENOSPC still run). Before, a traceback, a cut
model.h5 in the store and a checkpoint "stopped by a kill"; a READY version without its model card.
Now one line, nothing partial in the store, the checkpoint kept and described, the registry holding a
complete version or nothing; a version a killed registration left half-done is finished on retry.

The same while a training saves an epoch (a tmpfs as the checkpoint folder, or a faked ENOSPC): before,
a traceback, the half-written epoch left beside the last whole one and a checkpoint "stopped by a
kill"; now one line, the last whole epoch kept and described, and `brainseg train --resume` finishes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from brainseg.registry import model_registry, modelcard
from brainseg.registry.registration import COMPLETE, INCOMPLETE, TAG
from brainseg.training.full_disk import DISK_FULL
from conftest import Tracking, make_project
from helpers import invoke

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
NAME = "brainseg-segmenter"


def _mount_small_disk(path: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``path``; None, or why it cannot be done here."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True, check=False)
    return None if done.returncode == 0 else f"cannot mount a small tmpfs here: {done.stderr.strip()[:200]}"


def _unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False, capture_output=True)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _brainseg(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", "brainseg", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def _error_line(done: subprocess.CompletedProcess, code: int) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == code and "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    return line


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project whose MLflow experiment keeps its artifacts in ``store/`` (models in ``store/models``)."""
    project = make_project(tmp_path_factory.mktemp("full") / "p", patients=6, slices=4, size=32)
    with Tracking(project / "mlflow.db"):
        mlflow.MlflowClient().create_experiment("brainseg", artifact_location=str(project / "store"))
    return project


@pytest.fixture(scope="module")
def trained(project) -> dict:
    """A smoke training whose model met a full disk (where a tmpfs can be mounted; else a plain
    training), then ``brainseg train --resume`` with space again: what each step printed and left."""
    models = project / "store" / "models"
    cannot = _mount_small_disk(models, "256k")  # the code, the environment and model.h5 do not fit
    try:
        done = _brainseg(project, "train", "--profile", "smoke", "--set", "train.epochs=1", "--set",
                         "train.steps_per_epoch=2", "--progress", "none", "--no-test-report")
        left = _files(models)
    finally:
        if cannot is None:
            _unmount(models)
    seen = {"done": done, "left": left, "cannot": cannot}
    if cannot is None:
        with Tracking(project / "mlflow.db"):
            [run] = mlflow.search_runs(experiment_names=["brainseg"], output_format="list")
            seen["run_id"] = run_id = run.info.run_id
            seen["logged"] = _logged(run_id)
        seen["state"] = json.loads((project / "checkpoints" / run_id / "state.json").read_text())
        seen["listed"] = _brainseg(project, "checkpoints").stdout
        seen["resumed"] = _brainseg(project, "train", "--resume", "--progress", "none")  # space again
    return seen


def test_a_full_disk_while_logging_the_model_keeps_the_checkpoint_and_leaves_nothing_partial(project, trained):
    if trained["cannot"]:
        pytest.skip(trained["cannot"])
    line, run_id = _error_line(trained["done"], 75), trained["run_id"]
    assert line.startswith(f"error: {DISK_FULL} at {project / 'store' / 'models'}/"), line
    assert line.endswith(f"free some space, then brainseg train --resume --run {run_id}"), line
    assert trained["left"] == []  # nothing of the model stayed on the full disk (no cut model.h5)
    assert trained["logged"] == []  # nor in the tracking store: the half-logged model went
    assert trained["state"]["stopped_by"] == DISK_FULL and trained["state"]["trained"]
    assert f"stopped by {DISK_FULL}" in trained["listed"] and "a kill" not in trained["listed"]

    resumed = trained["resumed"]  # space again: the rest is logged
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    with Tracking(project / "mlflow.db"):
        [run] = mlflow.search_runs(experiment_names=["brainseg"], output_format="list")
        [logged] = _logged(run_id)
        assert run.info.status == "FINISHED" and logged.status.name == "READY"
        assert model_registry.load_segmenter(f"models:/{logged.model_id}").cfg.arch == "plain_unet"
    assert not (project / "checkpoints").exists()


def _logged(run_id: str) -> list:
    """The models run ``run_id`` logged (deleted ones are not found)."""
    experiment = mlflow.get_experiment_by_name("brainseg").experiment_id
    return mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'",
                                       output_format="list")


def _finished_run(project: Path) -> str:
    with Tracking(project / "mlflow.db"):
        runs = mlflow.search_runs(experiment_names=["brainseg"], output_format="list",
                                  filter_string="attributes.status = 'FINISHED'")
    [run] = [r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("train")]
    return run.info.run_id


def test_a_full_disk_while_registering_leaves_a_complete_version_or_nothing(project, trained):
    run_id = _finished_run(project)
    artifacts = project / "store" / run_id / "artifacts"
    kept = project / "artifacts-kept"
    shutil.copytree(artifacts, kept)
    size = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file())
    cannot = _mount_small_disk(artifacts, str(size + 1024 * 1024))
    if cannot:
        shutil.rmtree(kept)
        pytest.skip(cannot)
    try:
        shutil.copytree(kept, artifacts, dirs_exist_ok=True)
        try:  # the disk fills up to its last byte
            with open(artifacts / "filler", "wb") as fh:
                while True:
                    fh.write(bytes(4096))
                    fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        done = _brainseg(project, "register", "--run", run_id)
        after = _files(artifacts)
    finally:
        _unmount(artifacts)
        shutil.rmtree(kept)
    line = _error_line(done, 2)
    assert line == (f"error: registration of {NAME} v1 from run {run_id} failed half-way (No space left on device); "
                    f"undone (v1 and the registered model {NAME} it had created deleted): nothing of it is left in "
                    "the registry"), line
    assert modelcard.CARD_FILE not in after  # no cut card left in the run
    with Tracking(project / "mlflow.db"):
        assert mlflow.MlflowClient().search_registered_models(f"name = '{NAME}'") == []

    done = _brainseg(project, "register", "--run", run_id)  # space again: registered whole
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    with Tracking(project / "mlflow.db"):
        [version] = mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")
        assert version.tags[TAG] == COMPLETE and "card.data_version" in version.tags
        assert "val_patient_dice_mean" in version.tags and modelcard.CARD_HEADING in version.description


def test_a_registration_killed_half_way_is_finished_by_the_next(project, trained):
    """A version a killed `brainseg register` left (READY, tagged incomplete, no card) is finished, not
    duplicated: same version, its card and scores, marked complete."""
    run_id = _finished_run(project)
    name = "brainseg-segmenter-killed"
    with Tracking(project / "mlflow.db"):
        [logged] = _logged(run_id)
        mv, _ = model_registry.register(name, f"models:/{logged.model_id}", run_id, {TAG: INCOMPLETE}, "killed")
    done = _brainseg(project, "register", "--run", run_id, "--set", f"register.segmenter_name={name}")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    with Tracking(project / "mlflow.db"):
        [version] = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    assert version.version == mv.version and version.tags[TAG] == COMPLETE
    assert "card.data_version" in version.tags and "val_patient_dice_mean" in version.tags


def test_a_registration_failing_half_way_undoes_itself_faked_enospc(project, trained, monkeypatch):
    """Where no tmpfs can be mounted: the card's write fails with ENOSPC in-process."""
    run_id = _finished_run(project)
    name = "brainseg-segmenter-faked"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "model_card.md")

    monkeypatch.chdir(project)
    monkeypatch.setattr(model_registry, "log_model_card", no_space)
    with Tracking(project / "mlflow.db"):
        done = invoke("register", "--run", run_id, "--set", f"register.segmenter_name={name}")
        assert done.exit_code == 2 and "Traceback" not in done.output
        assert f"registration of {name} v1 from run {run_id} failed half-way (No space left on device); undone" \
            in " ".join(done.output.split())
        assert mlflow.MlflowClient().search_registered_models(f"name = '{name}'") == []


# ------------------------------------------------------------------ a full disk while an epoch is saved
# The smoke network's checkpoint (its weights, Adam's two moments, the best epoch's weights: ~7.6 MB)
# fits once on this disk, not twice: epoch 1's save fits, epoch 2's (written before epoch 1's goes) does not.
CHECKPOINT_DISK = "10m"
PER_EPOCH = ("loss", "val_loss", "val_patient_dice", "best_val_patient_dice", "learning_rate")
KEPT = [".lock", "epoch-0001", "epoch-0001/best.npz", "epoch-0001/optimizer.npz", "epoch-0001/weights.npz",
        "state.json"]


def _entries(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (hidden ones too: a save's temporary folder)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _whole(folder: Path) -> bool:
    """Every array file of a saved epoch reads to its end."""
    for path in folder.glob("*.npz"):
        with np.load(path) as z:
            [z[k] for k in z.files]
    return True


def _epochs_logged(project: Path, run_id: str) -> dict[str, list[int]]:
    with Tracking(project / "mlflow.db"):
        client = mlflow.MlflowClient()
        return {name: sorted(m.step for m in client.get_metric_history(run_id, name) if m.step) for name in PER_EPOCH}


def _the_run(project: Path):
    with Tracking(project / "mlflow.db"):
        [run] = mlflow.search_runs(experiment_names=["brainseg"], output_format="list")
    return run


def _stopped_on_a_full_disk(line: str, folder: str, resume: str) -> None:
    """The one line: the disk is full, the folder, the epoch kept, the command that continues."""
    assert line.startswith(f"error: disk full while saving epoch 2 in {folder}/"), line
    assert "epoch 1 is kept" in line and line.endswith(f"free some space, then {resume}"), line


def test_a_full_disk_while_saving_an_epoch_keeps_the_last_one_and_resume_finishes(tmp_path):
    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    disk = project / "ckpt"
    cannot = _mount_small_disk(disk, CHECKPOINT_DISK)
    if cannot:
        pytest.skip(cannot)
    try:
        done = _brainseg(project, "train", "--profile", "smoke", "--progress", "none", "--no-test-report",
                         "--checkpoint-dir", "ckpt")
        [folder] = list(disk.iterdir())
        run_id = folder.name
        left, whole = _entries(folder), _whole(folder / "epoch-0001")
        state = json.loads((folder / "state.json").read_text())
        listed = _brainseg(project, "checkpoints", "--checkpoint-dir", "ckpt").stdout
        failed, logged = _the_run(project), _epochs_logged(project, run_id)
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space again
        resumed = _brainseg(project, "train", "--resume", "--run", run_id, "--checkpoint-dir", "ckpt",
                            "--progress", "none")
        after = _entries(disk)
    finally:
        _unmount(disk)
    _stopped_on_a_full_disk(_error_line(done, 75), f"ckpt/{run_id}",
                            f"brainseg train --resume --run {run_id} --checkpoint-dir ckpt")
    assert left == KEPT and whole  # epoch 1 whole; nothing of epoch 2 (no cut .npz, no temporary folder)
    assert state["epoch"] == 1 and "disk full while saving epoch 2" in state["stopped_by"]
    assert "after epoch 1; stopped by disk full while saving epoch 2" in listed and "a kill" not in listed, listed
    assert failed.info.status == "FAILED"  # as after a full disk while logging: ended, resumable
    assert logged == {name: [1] for name in PER_EPOCH}  # epoch 2 was not saved, so not logged

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    run = _the_run(project)  # the same run, reopened and finished
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["brainseg.resumed_from_epoch"] == "1"
    assert _epochs_logged(project, run_id) == {name: [1, 2, 3, 4] for name in PER_EPOCH}  # each once
    assert after == []  # the finished run's checkpoint is removed


def test_a_full_disk_while_saving_an_epoch_faked_enospc(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: epoch 2's optimizer.npz stops half-way with ENOSPC, in-process."""
    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    real_savez = np.savez

    def savez(file, *arrays):
        name = str(getattr(file, "name", file))
        if ".epoch-0002." in name and name.endswith("optimizer.npz"):
            real_savez(file, *arrays)
            file.truncate(file.tell() // 2)  # the disk filled half-way through the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(file, *arrays)

    monkeypatch.setattr(np, "savez", savez)
    done = invoke("train", "--profile", "smoke", "--progress", "none", "--no-test-report")
    monkeypatch.setattr(np, "savez", real_savez)  # space again
    [folder] = list((project / "checkpoints").iterdir())
    run_id = folder.name
    assert done.exit_code == 75 and "Traceback" not in done.output, done.output
    [line] = [line for line in done.output.splitlines() if line.startswith("error:")]
    _stopped_on_a_full_disk(line, f"checkpoints/{run_id}", f"brainseg train --resume --run {run_id}")
    assert _entries(folder) == KEPT and _whole(folder / "epoch-0001")
    listed = invoke("checkpoints").output
    assert "after epoch 1; stopped by disk full while saving epoch 2" in listed and "a kill" not in listed, listed
    assert _the_run(project).info.status == "FAILED"

    resumed = invoke("train", "--resume", "--run", run_id, "--progress", "none")
    assert resumed.exit_code == 0, resumed.output
    run = _the_run(project)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert _epochs_logged(project, run_id) == {name: [1, 2, 3, 4] for name in PER_EPOCH}
    assert not (project / "checkpoints").exists()
