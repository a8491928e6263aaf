"""Several tuning workers on one PostgreSQL study and one MLflow tracking server; kill and resume.

Needs PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`); skipped with the reason where it
is not running, except in CI (`BRAINSEG_REQUIRE_POSTGRES=1`), where that is a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import optuna
import pytest

from conftest import make_project
from helpers import free_port

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
        raise RuntimeError("PostgreSQL on 127.0.0.1:5432 is required here (BRAINSEG_REQUIRE_POSTGRES=1) "
                           "but unreachable")
    pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (trust auth, database test)", allow_module_level=True)


def _create_database() -> str:
    import psycopg

    name = f"brainseg_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A project, a PostgreSQL database for Optuna and an MLflow server on another PostgreSQL database."""
    root = make_project(tmp_path_factory.mktemp("pg-project"), patients=8, slices=6, size=64)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for args in (["data", "manifest"], ["data", "split"]):
        subprocess.run([sys.executable, "-m", "brainseg", *args], cwd=root, env=env, check=True,
                       capture_output=True)
    port = free_port()
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


# ------------------------------------------------------------------ the database restarts mid-study
def _pg_bin() -> str | None:
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[-3]))
    return os.path.dirname(found[-1]) if found else None


@pytest.fixture
def private_postgres():
    """A PostgreSQL cluster of this test's own on a free port (the shared one on 5432 is never
    restarted): its URL and functions that stop and start it."""
    import pwd
    import shutil
    import tempfile

    bindir = _pg_bin()
    if bindir is None:
        if os.environ.get("BRAINSEG_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL binaries (initdb, pg_ctl) are required here but not under /usr/lib/postgresql")
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin")
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
    top = tempfile.mkdtemp(prefix="pg-")  # short: the socket's path must stay under 107 bytes
    if as_user:
        os.chown(top, pwd.getpwnam("postgres").pw_uid, -1)
    port, data = free_port(), os.path.join(top, "data")

    def pg_ctl(*args):
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, *args], check=True, capture_output=True, timeout=60)

    subprocess.run([*as_user, f"{bindir}/initdb", "-D", data, "--auth=trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    start = ["-o", f"-p {port} -k {top} -c fsync=off", "-l", os.path.join(top, "log"), "start", "-w"]
    pg_ctl(*start)

    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", lambda: pg_ctl("stop", "-m", "fast", "-w"), \
            lambda: pg_ctl(*start)
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "stop", "-m", "immediate"],
                       check=False, capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


UNREACHABLE = "study database unreachable"  # a worker's warning while it waits for the database


def _running_with_run(url: str) -> tuple[list[int], int]:
    """Numbers of the RUNNING trials that started training (have an MLflow run), and how many trials
    are finished; ([], 0) while the study's tables do not exist yet."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            running = [n for (n,) in conn.execute(
                "SELECT t.number FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id'")]
            (done,) = conn.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()
            return running, done
    except psycopg.Error:
        return [], 0


def _plant_dead_trial(url: str, study_name: str, params: dict) -> int:
    """A new study whose first trial (``params``) a worker claimed and left silent: its heartbeat is
    an hour old, as a worker killed long ago leaves it. Returns the trial's number."""
    import psycopg

    study = optuna.create_study(study_name=study_name, storage=url.replace("postgresql://", "postgresql+psycopg://"),
                                direction="maximize")
    study.enqueue_trial(params)
    dead = study.ask()
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO trial_heartbeats (trial_id, heartbeat) VALUES (%s, now() - interval '1 hour')",
                     (dead._trial_id,))
    return dead.number


def test_a_database_restart_mid_study_loses_no_trial(cluster, private_postgres, tmp_path):
    """Two workers; PostgreSQL stops for 3 s while their trials train, then comes back. The workers
    wait for it (heartbeats, reports and tells included): every completed trial is in the study, none
    is left RUNNING. A trial whose worker died before (its heartbeat silent) is marked FAIL and
    retried once with the same parameters, its retry's MLflow run naming it."""
    root, env, uri = cluster
    url, stop, start = private_postgres
    sa_url = url.replace("postgresql://", "postgresql+psycopg://")
    args = [sys.executable, "-m", "brainseg", "tune", "--profile", "smoke", "--study-name", "restart", "--storage", url,
            "--set", "tune.workers=2", "--set", "tune.threads=1", "--set", "tune.epochs=2", "--set", "tune.heartbeat=5",
            "--set", "evaluate.select_postprocessing=false", "--no-refit", "--out", "reports/restart.json"]
    params = {"arch": "plain_unet", "base_filters": 8, "loss.bce": 0.25, "loss.dice": 1.25, "lr": 0.004}
    dead = _plant_dead_trial(url, "restart", params)
    log = tmp_path / "tune.log"
    with log.open("w") as out:  # a file, not a pipe: two workers' output must never block them
        tune = subprocess.Popen([*args, "--n-trials", "2"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        started = deadline = time.time()
        deadline += 240
        while True:  # both workers' trials are training, or one is and another has finished
            running, done = _running_with_run(url)
            if len(running) > 1 or (running and done):
                break
            assert tune.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        restart_at = time.time() - started
        stop()  # down until a worker felt it, at most 3.5 s: a live trial's heartbeat never gets older than the grace
        down = time.time()
        while time.time() < down + 1 or (time.time() < down + 3.5 and UNREACHABLE not in log.read_text()):
            time.sleep(0.2)
        start()
        assert tune.wait(300) == 0, log.read_text()[-3000:]
        print(f"restart after {restart_at:.0f} s, study done after {time.time() - started:.0f} s")
    text = log.read_text()
    assert "worker exit codes" not in text, text[-3000:]
    study = optuna.load_study(study_name="restart", storage=sa_url)
    trials = {t.number: t for t in study.trials}
    assert not [n for n, t in trials.items() if t.state.name in ("RUNNING", "WAITING")], text[-3000:]
    assert all(trials[n].state.is_finished() for n in running)  # the trials training through the restart
    import re

    printed = {int(n) for n in re.findall(r"\(#(\d+)\) complete:", text)}
    complete = {n for n, t in trials.items() if t.state.name == "COMPLETE"}
    assert printed and printed == complete  # every trial a worker saw complete is in the study
    failed = [n for n, t in trials.items() if t.state.name == "FAIL"]
    assert failed == [dead], text[-3000:]  # the dead trial only: the restart failed none
    (retry,) = [t for t in trials.values() if t.user_attrs.get("retry_of_trial") == dead]
    assert retry.system_attrs["failed_trial"] == dead and retry.state.is_finished()
    assert retry.params == params  # the dead trial's parameters, run again
    runs = {int(c.data.tags["optuna.trial"]): c for c in _children(uri, study.user_attrs["mlflow_parent_run_id"])}
    assert runs[retry.number].data.tags["retry_of_trial"] == str(dead)
    assert {n for n, c in runs.items() if c.info.status == "FINISHED" and c.data.tags.get("state") == "COMPLETE"} \
        == complete
    assert not [n for n, c in runs.items() if c.info.status == "RUNNING"]
    print(f"restart while trial(s) {running} trained; states "
          f"{ {n: t.state.name for n, t in sorted(trials.items())} }; waits logged: "
          f"{text.count(UNREACHABLE)}")
