"""A training stopped by SIGTERM (a scheduler, `kill`) ends its MLflow run KILLED and exits 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import mlflow

from conftest import Tracking, make_project


def test_sigterm_during_training_ends_the_run_killed_and_exits_143(tmp_path):
    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    command = [sys.executable, "-m", "brainseg", "train", "--profile", "smoke", "--set", "train.epochs=500",
               "--set", "train.patience=500", "--progress", "lines"]
    proc = subprocess.Popen(command,
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # training has started: an MLflow run is open
        seen.append(line)
        if line.startswith("epoch 2/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
    assert proc.returncode == 143, output
    assert "terminated (SIGTERM)" in output and "Traceback" not in output
    with Tracking(project / "mlflow.db"):
        runs = mlflow.search_runs(experiment_names=["brainseg"], output_format="list")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.tags["brainseg.stopped_by"] == "SIGTERM"
