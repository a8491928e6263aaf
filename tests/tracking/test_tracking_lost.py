"""The tracking server going away mid-run (issue 27): a real `mlflow server` on 127.0.0.1 is killed
after the first epoch; the training finishes, keeps its work locally and says which command logs
the rest; against the restarted server that command completes the same run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pytest

from conftest import make_project
from helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _server(store, port: int) -> subprocess.Popen:
    """`mlflow server` on a SQLite store with proxied artifacts; its own process group (kill it whole)."""
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts"),
                             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("mlflow server did not start within 120 s")
            time.sleep(0.5)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def test_a_lost_tracking_server_costs_no_training_and_one_command_logs_the_rest(tmp_path):
    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    store, port = tmp_path / "store", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    # MLflow's own retry settings: no retries, a short timeout (the defaults retry for minutes)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "PYTHONUNBUFFERED": "1"}
    server = _server(store, port)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "brainseg", "train", "--profile", "smoke", "--progress", "lines",
                                 "--no-test-report"], cwd=project, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch 1/"):
                _kill(server)  # after the first epoch was logged
                break
        rest, _ = proc.communicate(timeout=300)
        output = "".join(seen) + rest
        assert proc.returncode == 75, output
        assert "Traceback" not in output and "tracking server not answering at epoch 2" in output
        assert "the tracking server stopped answering" in output and "training finished (4 epochs)" in output
        command = re.search(r"log the rest \(epochs, evaluation, model\) with: (brainseg train --resume --run \w+)",
                            output).group(1)
        run_id = command.split()[-1]
        state = (project / "checkpoints" / run_id / "state.json")
        assert state.is_file() and '"trained": true' in state.read_text()  # the trained network, kept locally
        local = project / "checkpoints" / run_id / "model"
        assert f"brainseg predict --model checkpoints/{run_id}/model" in output
        from brainseg.registry.model_registry import load_segmenter

        assert load_segmenter(str(local)).segment([np.zeros((32, 32, 3), np.uint8)]).masks[0].shape == (32, 32)

        server = _server(store, port)  # the server is back, on the same store
        done = subprocess.run([sys.executable, "-m", "brainseg", *command.split()[1:]], cwd=project, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "val_patient_dice_mean" in run.data.metrics
        for name in ("loss", "val_patient_dice"):  # epoch 1 logged live, 2-4 by the command
            assert sorted(m.step for m in client.get_metric_history(run_id, name) if m.step) == [1, 2, 3, 4]
        assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                           filter_string=f"source_run_id = '{run_id}'")
        assert not (project / "checkpoints").exists()
    finally:
        mlflow.set_tracking_uri(None)
        if server.poll() is None:
            _kill(server)
