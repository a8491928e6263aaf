"""Shared fixtures: tiny synthetic datasets, and the real LGG sample where the project sits beside
shared/."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from brainseg.data.synth import generate
from helpers import PROJECT_ROOT, brainseg_run_on_a_fresh_clone, invoke, project_files

# MLflow writes its settings into os.environ "so that subprocesses inherit them" (set_tracking_uri,
# set_registry_uri, set_experiment) and never takes MLFLOW_REGISTRY_URI or MLFLOW_EXPERIMENT_ID out
# again; brainseg adds its run-lineage variables. Left over from one test they send a later test's
# subprocesses (`mlflow run`, `brainseg tune`) to another test's store or experiment. So pytest starts
# without them (nothing from the user's shell), and every module and every test leaves them, and the
# active experiment, as it found them.
PROCESS_TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
                        "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "BRAINSEG_PROJECT_RUN",
                        "BRAINSEG_PIPELINE_RUN")
for _key in PROCESS_TRACKING_ENV:
    os.environ.pop(_key, None)

# pytest-xdist runs the tests in several processes (pyproject.toml): TensorFlow then gets its share of
# the cores per process (and its subprocesses, which inherit it), so that two trainings do not fight
# over the cores with oversubscribed, spinning thread pools. Code that sets its own threads
# (tune.threads) still does.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# The longest files, measured (`--durations`), start first, so that no process is left with one of
# them at the end while the other idles (`--dist loadfile` keeps a file in one process, so that its
# module fixtures are built once).
LONGEST_FIRST = ("test_pipeline.py", "test_pipeline_corrupted.py", "test_import_volumes.py", "test_cv.py",
                 "test_tune_postgres.py",
                 "test_tune_refit.py",
                 "test_tune_budget.py", "test_budget.py", "test_auth_server.py", "test_tracking_lost.py",
                 "test_resume_cli.py", "test_tune.py", "test_resume.py", "test_console.py",
                 "test_commands_chain.py", "test_bench.py", "test_survival.py", "test_selection.py", "test_oof.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _tracking_state() -> tuple[dict, str | None]:
    fluent = sys.modules.get("mlflow.tracking.fluent")
    return ({k: os.environ.get(k) for k in PROCESS_TRACKING_ENV},
            getattr(fluent, "_active_experiment_id", None))


def _restore_tracking_state(state: tuple[dict, str | None]) -> None:
    env, experiment = state
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is not None:  # set by mlflow.set_experiment; MLflow has no public reset
        fluent._active_experiment_id = experiment


@pytest.fixture(autouse=True, scope="module")
def module_tracking_env():
    state = _tracking_state()
    yield
    _restore_tracking_state(state)


@pytest.fixture(autouse=True)
def test_tracking_env():
    state = _tracking_state()
    yield
    _restore_tracking_state(state)


# Lines of console output that are library noise, never the project's own (tests of the console).
NOISE = re.compile(r"tensorflow|absl|cuInit|cuda|oneDNN|^[IWEF]\d{4} |Segmentation Models|"
                   r"warning|Downloading artifacts|\x08|dataset source|"
                   r"^\[[IWE] \d{4}-\d\d-\d\d |INFO\s+\[alembic|Registered model|Created version", re.IGNORECASE)
MAX_LINE = 300


def noise(lines: list[str]) -> list[str]:
    return [line for line in lines if NOISE.search(line)]


REAL_SKIP = ("real LGG sample not available: ../shared/data/lgg/unpack.sh missing "
             "(the tests use it where the project sits beside shared/)")


def shared_lgg_dir() -> Path | None:
    """The folder holding ``unpack.sh``: ``$BRAINSEG_SHARED_DATA`` (the lgg folder or a parent of
    it), else ``../shared/data/lgg`` beside the project. None when neither has ``unpack.sh``."""
    candidates = []
    env = os.environ.get("BRAINSEG_SHARED_DATA")
    if env:
        candidates += [Path(env), Path(env) / "lgg", Path(env) / "data" / "lgg"]
    candidates.append(PROJECT_ROOT.parent / "shared" / "data" / "lgg")
    for c in candidates:
        if (c / "unpack.sh").is_file():
            return c
    return None


def unpack_real(dest: Path, which: str = "sample") -> Path:
    """Run ``unpack.sh DEST which`` and return ``DEST/kaggle_3m``."""
    lgg = shared_lgg_dir()
    if lgg is None:
        raise FileNotFoundError(REAL_SKIP)
    done = subprocess.run(["bash", str(lgg / "unpack.sh"), str(dest), which],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{lgg / 'unpack.sh'} {dest} {which} failed: {done.stderr.strip()}")
    return Path(dest) / "kaggle_3m"


@pytest.fixture(scope="session")
def real_sample(tmp_path_factory) -> Path:
    """The real 6-patient, 176-slice sample as a kaggle_3m folder (read-only: do not modify it)."""
    if shared_lgg_dir() is None:
        pytest.skip(REAL_SKIP)
    return unpack_real(tmp_path_factory.mktemp("lgg-real"), "sample")


@pytest.fixture
def make_synth(tmp_path_factory):
    """Factory: ``make_synth(patients=3, slices=4, size=32, seed=0)`` -> a new kaggle_3m folder."""
    def make(patients: int = 3, slices: int = 4, size: int = 32, seed: int = 0) -> Path:
        out = tmp_path_factory.mktemp("synth") / "kaggle_3m"
        return generate(out, patients=patients, slices=slices, size=size, seed=seed)

    return make


@pytest.fixture
def synth_root(tmp_path) -> Path:
    """3 synthetic patients x 4 slices of 32x32 in ``tmp_path/kaggle_3m``, free to damage."""
    return generate(tmp_path / "kaggle_3m", patients=3, slices=4, size=32, seed=0)


# ------------------------------------------------------------------ a tiny project to run commands in
def make_project(path: Path, patients: int = 10, slices: int = 8, size: int = 64) -> Path:
    """A project folder: params.yaml, experiments/ and synthetic data (manifest and split: see
    :func:`prepared_project`)."""
    project_files(path)
    generate(path / "data/raw/kaggle_3m", patients=patients, slices=slices, size=size, seed=1)
    return path


class Tracking:
    """Points MLflow (tracking and registry) at a SQLite file for the duration of a test."""

    def __init__(self, db: Path):
        self.uri = f"sqlite:///{db}"

    def __enter__(self):
        import mlflow

        self._env = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = self.uri
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        return self

    def __exit__(self, *exc):
        import mlflow

        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri(None) leaves it behind
        if self._env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._env


@pytest.fixture(scope="session")
def tuned_project(tmp_path_factory):
    """A project that went through manifest, split and a 2-trial smoke study (shared, read-only)."""
    path = make_project(tmp_path_factory.mktemp("project"))
    old = os.getcwd()
    os.chdir(path)
    try:
        with Tracking(path / "mlflow.db"):
            for args in (("data", "manifest"), ("data", "split"), ("tune", "--profile", "smoke")):
                result = invoke(*args)
                assert result.exit_code == 0, result.output
    finally:
        os.chdir(old)
    return path


@pytest.fixture
def in_project(tuned_project, monkeypatch):
    """Run the test inside the tuned project, with its MLflow database."""
    monkeypatch.chdir(tuned_project)
    with Tracking(tuned_project / "mlflow.db") as t:
        yield t


def prepared_project(path: Path, patients: int = 10, slices: int = 6, size: int = 64) -> Path:
    """:func:`make_project` with its manifest and split built by the CLI, in its own MLflow database."""
    path = make_project(path, patients=patients, slices=slices, size=size)
    old = os.getcwd()
    os.chdir(path)
    try:
        with Tracking(path / "mlflow.db"):
            for args in (("data", "manifest"), ("data", "split")):
                assert invoke(*args).exit_code == 0
    finally:
        os.chdir(old)
    return path


# ------------------------------------------------------------------ built once for every test process
def built_once(tmp_path_factory, name: str, build) -> dict:
    """``build(folder)`` -> a JSON-able dict, run once per test session however many pytest-xdist
    processes ask: the first builds it in the session's shared temporary folder under a file lock,
    the others wait for it and read its result (or its failure, which fails them too). In one
    process (``-n 0``) it is an ordinary session fixture's value."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / name  # the workers' temporary folders sit in it
    shared.mkdir(exist_ok=True)
    done, failed = shared / "result.json", shared / "failed.txt"
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        if done.exists():
            return json.loads(done.read_text())
        if failed.exists():
            pytest.fail(f"{name}, built by another test process, failed: {failed.read_text()}")
        try:
            result = build(shared / "work")
        except BaseException as exc:
            failed.write_text(f"{type(exc).__name__}: {exc}"[-5000:])
            raise
        (shared / "result.tmp").write_text(json.dumps(result))
        os.replace(shared / "result.tmp", done)
        return result


@pytest.fixture(scope="session")
def fresh_run(tmp_path_factory) -> dict:
    """`brainseg run` once on a fresh clone for the whole session: test_pipeline.py runs it again in
    its clone (nothing to redo) and copies the clone for the DVC tests; the corrupted-masks test
    (another file, so another process) compares its reports. ``clone`` is the clone's path; the
    rest as :func:`helpers.run_reports`."""
    result = built_once(tmp_path_factory, "fresh-brainseg-run", brainseg_run_on_a_fresh_clone)
    return {**result, "clone": Path(result["clone"])}
