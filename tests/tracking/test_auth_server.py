"""Shared servers locked (issue 27): against a real `mlflow server --app-name basic-auth` on
127.0.0.1, `brainseg train` and a tuning worker without credentials are refused with one line naming
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (no traceback, no run, no training); with the
credentials of a plain (non-admin) account, `brainseg train` logs a run and `brainseg register`
registers its model. A read-only account's `brainseg register` of that run (issue 37) is refused
before anything is created: no registered model, no version, and the run's owner can still register
under that name."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import make_project
from helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
if importlib.util.find_spec("flask_wtf") is None:  # the CI installs it (the test extra)
    pytest.skip("MLflow's basic-auth app needs Flask-WTF: pip install -e '.[server]' (or mlflow[auth])",
                allow_module_level=True)

ADMIN, ADMIN_PASSWORD = "admin", "test-only-Adm1n-pw"
USER, USER_PASSWORD = "worker", "test-only-w0rker-pw"
READER, READER_PASSWORD = "reader", "test-only-r3ader-pw"  # the server's default permission: READ
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The auth server's URI; its admin created the account ``USER`` (default permission READ)."""
    root = tmp_path_factory.mktemp("auth-server")
    (root / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {ADMIN_PASSWORD}\n"
        "auth_cache_ttl_seconds = 300\n")  # without the cache every request pays a password hash (~0.3 s)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS} | {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-key"}
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                                 "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                 "--artifacts-destination", str(root / "artifacts"),
                                 "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            uri = _wait_for(proc, f"http://127.0.0.1:{port}", root / "server.log")
            # the admin creates the accounts: the REST call of get_app_client(...).create_user (docs/tuning.md)
            auth = base64.b64encode(f"{ADMIN}:{ADMIN_PASSWORD}".encode()).decode()
            for user, password in ((USER, USER_PASSWORD), (READER, READER_PASSWORD)):
                urllib.request.urlopen(urllib.request.Request(
                    f"{uri}/api/2.0/mlflow/users/create", method="POST",
                    data=json.dumps({"username": user, "password": password}).encode(),
                    headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"}), timeout=30)
            yield uri
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _wait_for(proc: subprocess.Popen, uri: str, log) -> str:
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return uri
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"mlflow server --app-name basic-auth did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)


class _as:
    """MLflow's client credentials of this test process, for a block."""

    def __init__(self, user: str, password: str):
        self.values = dict(zip(CREDENTIALS, (user, password)))

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in CREDENTIALS}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("auth") / "p", patients=6, slices=4, size=32)


def brainseg(project, uri: str, *args: str, login: tuple[str, str] | None = None):
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS} | {
        "MLFLOW_TRACKING_URI": uri, "BRAINSEG_TEST_STUDY_DB": f"sqlite:///{project / 'optuna.db'}"}
    env |= dict(zip(CREDENTIALS, login)) if login else {}
    return subprocess.run([sys.executable, "-m", "brainseg", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=400, check=False)


def _runs(uri: str) -> list:
    import mlflow

    with _as(ADMIN, ADMIN_PASSWORD):
        client = mlflow.MlflowClient(uri, uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(ids) if ids else []


def assert_refused(done, uri: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and "epoch 1/" not in output and "trial" not in output.lower(), output
    named = [line for line in output.splitlines() if "MLFLOW_TRACKING_USERNAME" in line]
    assert len(named) == 1, output
    assert named[0].startswith("error: the tracking server " + uri), named
    assert "MLFLOW_TRACKING_PASSWORD" in named[0] and "HTTP 401" in named[0]


def test_train_without_credentials_is_refused_before_training(server, project):
    assert_refused(brainseg(project, server, "train", "--profile", "smoke", "--progress", "lines"), server)
    assert _runs(server) == []


def test_a_tuning_worker_without_credentials_is_refused(server, project):
    done = brainseg(project, server, "tune", "--profile", "smoke", "--study-name", "shared",
                    "--storage", "env:BRAINSEG_TEST_STUDY_DB", "--worker", "0", "--n-trials", "1")
    assert_refused(done, server)
    assert _runs(server) == []


@pytest.fixture(scope="module")
def trained(server, project) -> str:
    """The id of a run the plain account ``USER`` trained (and owns)."""
    done = brainseg(project, server, "train", "--profile", "smoke", "--set", "train.epochs=1", "--set",
                    "train.steps_per_epoch=2", "--progress", "none", "--no-test-report", login=(USER, USER_PASSWORD))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return re.search(r"^run (\w+):", done.stdout, re.MULTILINE).group(1)


def test_with_credentials_train_logs_and_register_registers(server, project, trained):
    import mlflow

    login, run_id = (USER, USER_PASSWORD), trained
    done = brainseg(project, server, "register", "--run", run_id, login=login)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    with _as(USER, USER_PASSWORD):
        client = mlflow.MlflowClient(server, server)
        assert client.get_run(run_id).info.status == "FINISHED"
        versions = client.search_model_versions("name = 'brainseg-segmenter'")
    assert [v.run_id for v in versions] == [run_id]


def test_a_read_only_account_registers_nothing_and_the_owner_still_can(server, project, trained):
    """Before issue 37 the server had created the registered model (owned by the reader) and version 1
    READY when the 403 came, and the run's owner was locked out of the name."""
    import mlflow

    from brainseg.registry.model_registry import CHECK_TAG, REGISTRATION_TAG
    from brainseg.registry.modelcard import CARD_FILE

    name = "brainseg-segmenter-shared"
    args = ("register", "--run", trained, "--set", f"register.segmenter_name={name}")
    done = brainseg(project, server, *args, login=(READER, READER_PASSWORD))
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if "error:" in line]
    assert line == (f"error: registration of {name} from run {trained} refused before anything was created "
                    f"(HTTP 403, user '{READER}': cannot write to that run, where the version's model card goes): "
                    "nothing was registered"), line
    with _as(ADMIN, ADMIN_PASSWORD):
        client = mlflow.MlflowClient(server, server)
        assert client.search_registered_models(f"name = '{name}'") == []  # no model, no version: nothing half-made
        assert CHECK_TAG not in client.get_run(trained).data.tags

    done = brainseg(project, server, *args, login=(USER, USER_PASSWORD))  # the owner is not locked out
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    with _as(USER, USER_PASSWORD):
        client = mlflow.MlflowClient(server, server)
        [version] = client.search_model_versions(f"name = '{name}'")
        assert version.run_id == trained and version.tags[REGISTRATION_TAG] == "complete"
        assert "card.data_version" in version.tags and CARD_FILE in {a.path for a in client.list_artifacts(trained)}
