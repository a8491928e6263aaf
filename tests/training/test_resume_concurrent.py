"""Two hands on one run, and a damaged checkpoint (issue 37), as a user meets them: real `brainseg
train` processes on one project. A run in training holds its checkpoint's lock; a second `brainseg
train --resume` of it is refused at once in one line naming the holder, and logs nothing; the lock
of a SIGKILLed process does not outlive it. A truncated array file, a state.json of another network
or an epoch beyond the plan are refused before the MLflow run is reopened, which stays as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter

import mlflow
import pytest

from conftest import Tracking, make_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PER_EPOCH = ("loss", "val_loss", "val_patient_dice", "learning_rate")
LONG = ("--set", "train.epochs=500", "--set", "train.patience=500")  # a run that lasts until stopped


def _env(project) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}


def _start(project, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "brainseg", "train", "--progress", "lines", *args], cwd=project,
                            env=_env(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _until_an_epoch(proc) -> str:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch "):
            return "".join(seen)
    raise AssertionError("no epoch was trained:\n" + "".join(seen))


def _brainseg(project, *args) -> subprocess.CompletedProcess:
    # before issue 37 a second resume trained on beside the first: the timeout fails the test then
    return subprocess.run([sys.executable, "-m", "brainseg", *args], cwd=project, env=_env(project),
                          capture_output=True, text=True, timeout=240, check=False)


def _refused(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and not any(line.startswith("epoch ") for line in output.splitlines()), output
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    return line


def _run(project):
    with Tracking(project / "mlflow.db"):
        [run] = mlflow.search_runs(experiment_names=["brainseg"], output_format="list")
        steps = {name: Counter(m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, name))
                 for name in PER_EPOCH}
    return run, steps


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A project whose 500-epoch smoke run was SIGKILLed after its second epoch: (project, run id)."""
    project = make_project(tmp_path_factory.mktemp("concurrent") / "p", patients=6, slices=4, size=32)
    first = _start(project, "--profile", "smoke", "--no-test-report", *LONG)
    try:
        seen = _until_an_epoch(first)
        while "epoch 2/" not in seen:
            seen += _until_an_epoch(first)
        run, _ = _run(project)
        # a fresh training holds its own checkpoint: a resume of it is refused, naming the training
        line = _refused(_brainseg(project, "train", "--resume", "--run", run.info.run_id))
        assert f"run {run.info.run_id} is being trained by pid {first.pid} on {socket.gethostname()} since " in line
        assert "brainseg train --progress lines --profile smoke" in line and "one process per run" in line
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up of any kind: the run stays RUNNING, the lock goes
        first.wait(60)
    return project, run.info.run_id


def test_a_damaged_or_tampered_checkpoint_is_refused_before_the_run_is_reopened(killed):
    project, run_id = killed
    folder = project / "checkpoints" / run_id
    state = json.loads((folder / "state.json").read_text())
    arrays = folder / state["arrays"]
    _, steps_before = _run(project)

    def tampered(**fields):
        (folder / "state.json").write_text(json.dumps({**state, **fields}))

    def other_network():
        meta = json.loads(json.dumps(state["meta"]))
        meta["settings"]["train"]["base_filters"] = 16  # the smoke network has 8
        tampered(meta=meta)

    cases = [
        (lambda: (arrays / "weights.npz").write_bytes((arrays / "weights.npz").read_bytes()[:5000]),
         f"{arrays.name}/weights.npz: unreadable checkpoint arrays"),
        (lambda: (arrays / "optimizer.npz").unlink(), f"{arrays.name}/optimizer.npz: missing"),
        (other_network, "weights.npz: 100 arrays that do not fit plain_unet that state.json describes (100 weights; "
                        "first misfit (0, (3, 3, 1, 8), (3, 3, 1, 16)))"),
        (lambda: tampered(epoch=600, history={k: (v * 600)[:600] for k, v in state["history"].items()}),
         "state.json: epoch 600 is past the run's plan of 500 epochs"),
    ]
    keep = project / "kept"
    shutil.copytree(folder, keep)
    try:
        for damage, words in cases:
            damage()
            line = _refused(_brainseg(project, "train", "--resume", "--run", run_id))
            assert line.startswith("error: --resume: ") and words in line, line
            run, steps = _run(project)
            assert run.info.status == "RUNNING" and steps == steps_before  # untouched: not FAILED, nothing logged
            shutil.rmtree(folder)
            shutil.copytree(keep, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(keep, folder)
        shutil.rmtree(keep)


def test_two_resumes_of_one_run_one_trains_the_other_is_refused_naming_it(killed):
    project, run_id = killed
    listed = _brainseg(project, "checkpoints").stdout
    assert f"{run_id}: saved" in listed and "stopped by a kill" in listed  # the dead holder's lock is gone
    second = _start(project, "--resume")
    try:
        seen = _until_an_epoch(second)  # it reopened the run and trains on
        line = _refused(_brainseg(project, "train", "--resume"))  # the newest checkpoint: the same run
        assert f"run {run_id} is being trained by pid {second.pid} on {socket.gethostname()} since " in line
        assert "brainseg train --progress lines --resume" in line
        listed = _brainseg(project, "checkpoints").stdout
        assert f"{run_id}: being trained now by pid {second.pid}" in listed
        assert listed.startswith("0 interrupted run(s) and 1 being trained now in checkpoints/"), listed
        seen += _until_an_epoch(second)
    finally:
        second.send_signal(signal.SIGTERM)
        rest, _ = second.communicate(timeout=180)
    assert second.returncode == 143, seen + rest
    run, steps = _run(project)
    assert run.info.status == "KILLED"  # the SIGTERM, not a refusal, ended it
    for name, counts in steps.items():  # every epoch logged once: the refused resume logged nothing
        per_epoch = {step: n for step, n in counts.items() if step}
        assert per_epoch and set(per_epoch.values()) == {1}, (name, counts)
        assert sorted(per_epoch) == list(range(1, max(per_epoch) + 1)), (name, counts)
    state = json.loads((project / "checkpoints" / run_id / "state.json").read_text())
    assert state["stopped_by"] == "SIGTERM" and state["epoch"] >= 4
