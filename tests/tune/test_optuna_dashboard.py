"""The docs' way to watch a study live: `optuna-dashboard` on the study's storage answers on
127.0.0.1 with the study in it. Skips where the optional extra (`pip install -e ".[dashboard]"`)
is not installed, except in CI (`BRAINSEG_REQUIRE_DASHBOARD=1`), where that is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import optuna
import pytest

from helpers import free_port


@pytest.fixture
def dashboard_cmd():
    cmd = shutil.which("optuna-dashboard")
    if cmd is None:
        if os.environ.get("BRAINSEG_REQUIRE_DASHBOARD"):
            raise RuntimeError("optuna-dashboard is required here (BRAINSEG_REQUIRE_DASHBOARD=1) but not installed")
        pytest.skip('optuna-dashboard is not installed (pip install -e ".[dashboard]")')
    return cmd


def test_the_dashboard_serves_a_study_from_its_storage(tmp_path, dashboard_cmd):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="watched", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2, log=True), n_trials=3)
    port = free_port()
    proc = subprocess.Popen([dashboard_cmd, storage, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        body, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, (f"no answer on 127.0.0.1:{port}: "
                                  f"{proc.stderr.read1().decode()[-500:] if proc.poll() is not None else ''}")
        studies = {s["study_name"]: s for s in body["study_summaries"]}
        assert "watched" in studies
    finally:
        proc.terminate()
        proc.wait(timeout=20)
