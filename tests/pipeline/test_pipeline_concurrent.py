"""Two `brainseg run` at once in a fresh project (issue 37), as a user starts them: real processes on
a fresh clone. Before, one died with a traceback on DVC's lock and the other finished with the
dataset never put under DVC, which no later run added. Now the second is refused at once in one line
naming the first (exit 2), the first puts its dataset under DVC before any stage, the lock of a
killed run does not outlive it, and a dataset left unversioned is versioned by the next run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from brainseg.data.importer import ensure_dataset
from brainseg.pipeline.run_pipeline import project_lock
from helpers import copy_checkout

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
DATA = "data/raw/kaggle_3m"


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


def _start_run(clone) -> subprocess.Popen:
    # its own process group: `dvc repro` and the stage it runs go with it at the end
    return subprocess.Popen([sys.executable, "-m", "brainseg", "run"], cwd=clone, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _until_the_stages(proc) -> str:
    """Its output up to the line that starts the stages (after the dataset step)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("pipeline run "):
            return "".join(seen)
    raise AssertionError("`brainseg run` ended before its stages:\n" + "".join(seen))


def _stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)


def test_a_second_brainseg_run_is_refused_at_once_naming_the_first(tmp_path):
    clone = copy_checkout(tmp_path / "clone")
    first = _start_run(clone)
    try:
        seen = _until_the_stages(first)
        assert "generated the synthetic default" in seen and f"tracked by DVC ({DATA}.dvc)" in seen
        # before issue 37 the second ran beside the first (the timeout fails the test then)
        second = subprocess.run([sys.executable, "-m", "brainseg", "run"], cwd=clone, env=_env(),
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None  # the first is still running
    finally:
        _stop(first)
    output = second.stdout + second.stderr
    assert second.returncode == 2 and "Traceback" not in output, output
    [line] = output.strip().splitlines()
    assert line.startswith(f"error: another `brainseg run` is running in this project: pid {first.pid} on "
                           f"{socket.gethostname()} since "), line
    assert "(brainseg run)" in line and ".dvc/tmp/brainseg-run.lock" in line
    assert (clone / f"{DATA}.dvc").is_file()  # the dataset is under DVC, whatever became of the run
    held = project_lock(clone)  # the killed run's lock went with it: the next run is not blocked
    held.close()


def test_a_dataset_left_unversioned_is_versioned_by_the_next_run(tmp_path):
    """The state the old race left: the synthetic dataset generated, no .dvc file."""
    clone = copy_checkout(tmp_path / "clone")
    ensure_dataset(clone / DATA, {"patients": 10, "slices": 6, "size": 64, "seed": 0}, use_dvc=False)
    assert (clone / DATA).is_dir() and not (clone / f"{DATA}.dvc").exists()
    run = _start_run(clone)
    try:
        seen = _until_the_stages(run)
    finally:
        _stop(run)
    assert "using the synthetic dataset already there; it was not under DVC yet" in seen, seen
    assert f"tracked by DVC ({DATA}.dvc)" in seen and (clone / f"{DATA}.dvc").is_file()
    status = subprocess.run(["dvc", "status", f"{DATA}.dvc"], cwd=clone, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr


def test_a_half_generated_dataset_is_never_taken_for_a_dataset(tmp_path, monkeypatch):
    """Generation is built beside the dataset and renamed in: killed half-way, nothing is at dest."""
    import brainseg.data.synth

    def dies(out, **kw):
        (out / "TCGA_CS_S000_20000101").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(brainseg.data.synth, "generate", dies)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(tmp_path / "raw" / "kaggle_3m", {"patients": 2}, use_dvc=False)
    assert not list(tmp_path.rglob("*kaggle_3m*"))  # no half dataset, no staging folder left
