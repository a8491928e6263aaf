"""Tuning end to end: the refit registered and linked to its study, worker processes on one study,
a dead predecessor's trials failed at start-up, and `mlflow run . -e tune` nesting."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import mlflow
import optuna
import pytest

from brainseg.tune.runs import process_started, reap_dead_predecessors
from conftest import MAX_LINE, Tracking, make_project, noise, prepared_project
from helpers import PROJECT_ROOT, invoke

# MLflow's store, alembic and Optuna log lines (not in conftest.NOISE; `mlflow.projects` lines may stay)
LIBRARY_INFO = re.compile(r"INFO\s+(\[alembic|mlflow\.(?!projects))|^\[[IW] \d{4}-\d\d-\d\d ")
EPOCH_LINE = re.compile(r"(trial #\d+|refit)  epoch \d+/\d+  ")
TRIAL_LINE = re.compile(r"trial \d+ of \d+ \(#\d+\) ")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project with manifest and split, its own MLflow database."""
    return prepared_project(tmp_path_factory.mktemp("tune-refit"))


@pytest.fixture
def in_refit_project(project, monkeypatch):
    monkeypatch.chdir(project)
    with Tracking(project / "mlflow.db") as t:
        yield t


def test_refit_trains_the_best_at_full_fidelity_and_registers_it_linked_to_the_study(in_refit_project):
    result = invoke("tune", "--profile", "smoke", "--study-name", "refit", "--n-trials", "2",
                    "--set", "tune.size=32", "--set", "tune.epochs=2", "--refit", "--register",
                    "--out", "reports/refit.json")
    assert result.exit_code == 0, result.output
    assert "refit of trial" in result.output and "registered version" in result.output
    summary = json.loads(open("reports/refit.json").read())
    refit, parent_id = summary["refit"], summary["parent_run_id"]
    client = mlflow.MlflowClient()
    study = optuna.load_study(study_name="refit", storage="sqlite:///optuna.db")
    best = study.best_trial
    assert refit["trial"] == best.number and refit["size"] == 64  # train.size, not the search's 32 px
    assert refit["epochs"] == max(best.intermediate_values)  # same steps per epoch: same epochs
    trial_run = client.get_run(best.user_attrs["mlflow_run_id"])
    assert trial_run.data.params["size"] == "32"  # trials at the low fidelity
    run = client.get_run(refit["run_id"])
    assert run.data.params["size"] == "64" and run.data.params["epochs"] == str(refit["epochs"])
    assert run.data.tags["brainseg.study_parent_run_id"] == parent_id
    assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.tags["brainseg.role"] == "refit"
    assert "val_patient_dice_mean" in run.data.metrics
    assert "test_patient_dice_mean" in run.data.metrics  # the report's test figure, logged once
    version = client.get_model_version("brainseg-segmenter", refit["registered"]["version"])
    assert version.run_id == refit["run_id"]
    assert version.tags["study_parent_run_id"] == parent_id and version.tags["refit_of_trial"] == str(best.number)
    parent = client.get_run(parent_id)
    assert parent.data.tags["refit_run_id"] == refit["run_id"]
    assert parent.data.tags["refit_model_version"] == refit["registered"]["version"]
    assert parent.info.status == "FINISHED"
    assert "champion" not in client.get_registered_model("brainseg-segmenter").aliases  # the gate's job


def test_two_worker_processes_share_one_study(in_refit_project):
    result = invoke("tune", "--profile", "smoke", "--study-name", "two-workers", "--n-trials", "3",
                    "--set", "tune.workers=2", "--set", "tune.threads=1", "--set", "tune.epochs=1",
                    "--no-refit", "--out", "reports/workers.json")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="two-workers", storage="sqlite:///optuna.db")
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    pids = {t.user_attrs["worker_pid"] for t in study.trials}
    assert len(pids) == 2 and os.getpid() not in pids  # both worker processes ran trials
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
    summary = json.loads(open("reports/workers.json").read())
    children = mlflow.search_runs(experiment_names=["brainseg"],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert sorted(children["tags.optuna.trial"]) == ["0", "1", "2"]


def test_a_worker_fails_its_dead_predecessors_trials_at_once(tmp_path):
    """Trials of a killed process of this host become FAIL (and their runs FAILED) when a worker
    starts; a live process's trial, another host's and a reused pid are told apart."""
    with Tracking(tmp_path / "mlflow.db"):
        storage = f"sqlite:///{tmp_path}/optuna.db"
        study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
        exp = mlflow.set_experiment("brainseg")
        client = mlflow.MlflowClient()
        killed, alive = subprocess.Popen(["sleep", "120"]), subprocess.Popen(["sleep", "120"])
        here = socket.gethostname()
        cases = [("killed", here, killed.pid, process_started(killed.pid)),
                 ("alive", here, alive.pid, process_started(alive.pid)),
                 ("other host", "elsewhere", killed.pid, process_started(killed.pid)),
                 ("pid reused", here, alive.pid, "1")]
        runs = []
        for name, host, pid, started in cases:
            trial = study.ask()
            run = client.create_run(exp.experiment_id, run_name=name)
            for key, value in (("worker_host", host), ("worker_pid", pid), ("worker_started", started),
                               ("mlflow_run_id", run.info.run_id)):
                trial.set_user_attr(key, value)
            runs.append(run.info.run_id)
        killed.kill()
        killed.wait()
        try:
            assert reap_dead_predecessors(optuna.load_study(study_name="s", storage=storage)) == [0, 3]
        finally:
            alive.kill()
            alive.wait()
        states = [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials]
        assert states == ["FAIL", "RUNNING", "RUNNING", "FAIL"]
        statuses = [client.get_run(r).info.status for r in runs]
        assert statuses == ["FAILED", "RUNNING", "RUNNING", "FAILED"]
        assert client.get_run(runs[0]).data.tags["state"] == "FAIL"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_restarted_worker_fails_the_killed_workers_trial_without_waiting(project, tmp_path):
    """SIGKILL a `brainseg tune` worker mid-trial; the next worker (heartbeat grace 10 min) marks it FAIL."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cmd = [sys.executable, "-m", "brainseg", "tune", "--profile", "smoke", "--study-name", "killed",
           "--storage", storage, "--set", "tune.heartbeat=300", "--n-trials", "1", "--no-refit",
           "--out", str(tmp_path / "t.json")]
    worker = subprocess.Popen([*cmd, "--set", "tune.epochs=200", "--set", "train.patience=200"], cwd=project,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 300
    while True:
        try:
            trials = optuna.load_study(study_name="killed", storage=storage).trials
        except KeyError:
            trials = []
        running = [t for t in trials if t.state.name == "RUNNING" and "mlflow_run_id" in t.user_attrs]
        if running:
            break
        assert time.time() < deadline and worker.poll() is None, "the worker never started its trial"
        time.sleep(1)
    worker.kill()
    worker.wait()
    done = subprocess.run([*cmd, "--set", "tune.epochs=1"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "of a dead worker on this host marked FAIL" in done.stdout
    trials = optuna.load_study(study_name="killed", storage=storage).trials
    assert [t.state.name for t in trials][:1] == ["FAIL"] and trials[1].state.is_finished()
    run = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_run(running[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["state"] == "FAIL"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_run_tune_nests_the_study_in_brainseg_under_the_project_run(tmp_path):
    """`mlflow run . -e tune` (no --experiment-name): the launcher run in Default ends pointing at the
    study's parent in `brainseg` (described by its note), which carries the project run's tags and
    parents every trial and the refit; a new study per `mlflow run` (an older one is not resumed),
    the refit registered; the console: trial and epoch lines and a few others."""
    root = make_project(tmp_path / "proj", patients=8, slices=6, size=64)
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(PROJECT_ROOT / name, root / name)
    uri = f"sqlite:///{root}/mlflow.db"
    # no MLflow variable of this process (an experiment id left by another test would take the
    # launcher run out of Default): the user's shell, with only the tracking store set
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_TRACKING_URI": uri}
    brainseg = [sys.executable, "-m", "brainseg"]
    for args in (["data", "prepare", "--profile", "smoke"],
                 ["tune", "--profile", "smoke", "--n-trials", "1", "--set", "tune.epochs=1"]):  # an older study
        done = subprocess.run([*brainseg, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    older = json.loads((root / "reports/tune.json").read_text())
    done = subprocess.run([sys.executable, "-m", "mlflow", "run", ".", "-e", "tune", "--env-manager", "local",
                           "-P", "profile=smoke", "-P", "n_trials=2"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    lines = (done.stdout + done.stderr).splitlines()  # the console: quiet under `mlflow run` too
    assert noise(lines) == [] and max(len(line) for line in lines) <= MAX_LINE, noise(lines)
    assert [line for line in lines if LIBRARY_INFO.search(line)] == []
    epochs = [line for line in lines if EPOCH_LINE.match(line)]  # no terminal: one line per epoch
    assert {line.split("  ")[0] for line in epochs} >= {"trial #0", "trial #1", "refit"}, lines
    launcher_lines = [line for line in lines if " INFO mlflow.projects" in line]  # `mlflow run`'s own 3
    assert len(launcher_lines) <= 3, launcher_lines
    own = [line for line in lines if line not in epochs + launcher_lines and not TRIAL_LINE.match(line)]
    # data prepare (3); the refit's announcement; the summary (study, best, refit, and whether the top
    # two trials differ beyond the noise where both finished unpruned); MLflow's own prints on
    # registering ("Registered model ... already exists", "Created version") are silenced
    assert len(own) <= 3 + 1 + 4, "\n".join(own)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("brainseg")
    parents = client.search_runs([exp.experiment_id], "tags.`brainseg.role` = 'study'")
    assert len(parents) == 2
    parent = next(p for p in parents if p.info.run_id != older["parent_run_id"])
    assert parent.data.params["profile"] == "smoke"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.note.content"].startswith(f"Optuna study {parent.data.tags['optuna.study']}:")
    # mlflow's own launcher run (Default, as `mlflow run` has no --experiment-name here) is ended with
    # a note; the study's run in `brainseg` took its place, and every run of the study is its child
    (launcher,) = client.search_runs(["0"])
    assert parent.data.tags["brainseg.moved_from_run"] == launcher.info.run_id
    assert launcher.data.tags["brainseg.moved_to_run"] == parent.info.run_id
    assert parent.info.run_id in launcher.data.tags["mlflow.note.content"] and launcher.info.status == "FINISHED"
    study_runs = client.search_runs([exp.experiment_id], f"tags.`optuna.study` = '{parent.data.tags['optuna.study']}'")
    children = [r for r in study_runs if r.info.run_id != parent.info.run_id]
    assert sorted(r.data.tags["brainseg.role"] for r in children) == ["refit", "trial", "trial"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    old_children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{older['parent_run_id']}'")
    assert len(old_children) == 1  # the older study got no new trial
    refit = [r for r in children if r.data.tags["brainseg.role"] == "refit"]
    assert refit[0].data.tags["brainseg.study_parent_run_id"] == parent.info.run_id
    versions = client.search_model_versions(f"run_id = '{refit[0].info.run_id}'")
    assert len(versions) == 1
