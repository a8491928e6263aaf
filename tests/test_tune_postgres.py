"""Several tuning workers on one PostgreSQL study and one MLflow tracking server; kill and resume.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`); skipped with the reason where it
is not running, except in CI (`BRAINSEG_REQUIRE_POSTGRES=1`), where that is a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import mlflow
import optuna
import pytest

from conftest import make_project

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(900)]


def _postgres_up() -> bool:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001
        return False


if not _postgres_up():
    if os.environ.get("BRAINSEG_REQUIRE_POSTGRES"):
        raise RuntimeError("PostgreSQL on 127.0.0.1:5432 is required here (BRAINSEG_REQUIRE_POSTGRES=1) but unreachable")
    pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (trust auth, database test)", allow_module_level=True)


def _create_database() -> str:
    import psycopg

    name = f"brainseg_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A project, a PostgreSQL database for Optuna and an MLflow server on another PostgreSQL database."""
    root = make_project(tmp_path_factory.mktemp("pg-project"), patients=8, slices=6, size=64)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for args in (["data", "manifest"], ["data", "split"]):
        subprocess.run([sys.executable, "-m", "brainseg", *args], cwd=root, env=env, check=True,
                       capture_output=True)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{PG}/{_create_database()}",
         "--artifacts-destination", str(root / "mlartifacts"), "-h", "127.0.0.1", "-p", str(port),
         "--workers", "2"], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("mlflow server did not start within 120 s")
            time.sleep(1)
    env["MLFLOW_TRACKING_URI"] = uri
    yield root, env, uri
    server.terminate()
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()


def _tune(root, env, storage, study, *extra, wait=True):
    cmd = [sys.executable, "-m", "brainseg", "tune", "--profile", "smoke", "--study-name", study,
           "--storage", storage, "--set", "tune.epochs=2", "--set", "tune.heartbeat=2",
           "--out", f"reports/{study}-{uuid.uuid4().hex[:6]}.json", *extra]
    if wait:
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _children(uri: str, parent: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)


def test_two_workers_share_one_study_and_one_tracking_server(cluster):
    root, env, uri = cluster
    storage = f"postgresql://postgres@127.0.0.1:5432/{_create_database()}"
    created = _tune(root, env, storage, "shared", "--create-only")
    assert created.returncode == 0, created.stderr[-2000:]
    workers = [_tune(root, env, storage, "shared", "--n-trials", "2", wait=False) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage.replace("postgresql://", "postgresql+psycopg://"))
    assert len(study.trials) == 4
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.is_finished() for t in study.trials)
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = _children(uri, parent)
    assert len(children) == 4
    by_trial = {c.data.tags["optuna.trial"]: c for c in children}
    assert sorted(by_trial) == ["0", "1", "2", "3"]  # exactly one child run per trial
    for t in study.trials:
        assert t.user_attrs["mlflow_run_id"] == by_trial[str(t.number)].info.run_id
        assert by_trial[str(t.number)].info.status == "FINISHED"


def test_a_killed_worker_loses_nothing_and_the_study_resumes(cluster):
    root, env, uri = cluster
    storage = f"postgresql://postgres@127.0.0.1:5432/{_create_database()}"
    sa_storage = storage.replace("postgresql://", "postgresql+psycopg://")
    assert _tune(root, env, storage, "killme", "--n-trials", "1").returncode == 0  # trial 0 completes
    worker = _tune(root, env, storage, "killme", "--n-trials", "1", "--set", "tune.epochs=30", wait=False)
    deadline = time.time() + 300
    while True:  # wait until trial 1 runs and has its MLflow run, then kill the worker hard
        trials = optuna.load_study(study_name="killme", storage=sa_storage).trials
        running = [t for t in trials if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs]
        if running:
            break
        assert time.time() < deadline and worker.poll() is None, "the worker never started trial 1"
        time.sleep(1)
    time.sleep(3)
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    killed_run = running[0].user_attrs["mlflow_run_id"]
    time.sleep(5)  # longer than 2 x heartbeat: the trial is now stale
    resumed = _tune(root, env, storage, "killme", "--n-trials", "1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study = optuna.load_study(study_name="killme", storage=sa_storage)
    states = [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"] or states[:2] == ["COMPLETE", "FAIL"]
    assert study.trials[0].value is not None  # the completed trial was not lost
    client = mlflow.MlflowClient(tracking_uri=uri)
    killed = client.get_run(killed_run)
    assert killed.info.status == "FAILED"  # not RUNNING forever
    assert killed.data.tags["state"] == "FAIL"
