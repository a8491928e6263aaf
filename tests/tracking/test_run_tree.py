"""Under `mlflow run . -e main` the pipeline's runs are one tree in the `brainseg` experiment: the
launcher run (which `mlflow run` puts in Default) moves there as the pipeline's run, the stages'
runs in `brainseg` are its children, and runs of another experiment (survival) are not split
across experiments by a parent elsewhere."""

from __future__ import annotations

import os

import mlflow

from brainseg.pipeline import run_pipeline
from brainseg.tracking import mlflow_runs, run_context
from conftest import Tracking


def test_the_pipeline_under_mlflow_run_is_one_tree_in_brainseg(tmp_path, monkeypatch):
    with Tracking(tmp_path / "mlflow.db"):
        c = mlflow.MlflowClient()
        launcher = c.create_run("0", run_name="mlflow-run-launcher")  # what `mlflow run` makes in Default
        monkeypatch.setenv(run_context.PROJECT_ENV, launcher.info.run_id)
        monkeypatch.delenv(run_context.PIPELINE_ENV, raising=False)
        run_id, moved = run_pipeline.claim_launcher("abc123", "smoke")
        assert moved and os.environ[run_context.PROJECT_ENV] == run_id
        pipeline = c.get_run(run_id)
        assert c.get_experiment(pipeline.info.experiment_id).name == "brainseg"
        assert pipeline.data.tags["brainseg.pipeline_run"] == "abc123" and pipeline.data.params["profile"] == "smoke"
        assert c.get_run(launcher.info.run_id).data.tags["brainseg.moved_to_run"] == run_id
        mlflow_runs.set_experiment("brainseg")
        with mlflow_runs.run("evaluate-val", {}) as stage:
            pass
        mlflow_runs.set_experiment("brainseg-survival")
        with mlflow_runs.run("survival", {}) as survival:
            pass
        parent = mlflow_runs.create_parent_run("brainseg-survival", "survival-parent", {}, {})
        assert c.get_run(stage.info.run_id).data.tags["mlflow.parentRunId"] == run_id
        for other in (survival.info.run_id, parent):  # the root of its own experiment's tree
            assert "mlflow.parentRunId" not in c.get_run(other).data.tags
        assert [r.info.run_id for r in c.search_runs(["0"])] == [launcher.info.run_id]  # only mlflow run's own


def test_without_mlflow_run_nothing_is_claimed(monkeypatch):
    monkeypatch.delenv(run_context.PROJECT_ENV, raising=False)
    assert run_pipeline.claim_launcher("abc", "smoke") == (None, False)
    monkeypatch.setenv(run_context.PROJECT_ENV, "r1")
    monkeypatch.setenv(run_context.PIPELINE_ENV, "p1")  # a stage inside a pipeline: its launcher claims
    assert run_pipeline.claim_launcher("abc", "smoke") == (None, False)


def test_the_private_name_conftest_restores_is_still_mlflows(tmp_path):
    # conftest puts MLflow's active experiment back after each test through
    # mlflow.tracking.fluent._active_experiment_id (MLflow has no public reset); renamed, that restore
    # would silently do nothing and tests would leak experiments into each other: this fails instead
    import mlflow.tracking.fluent as fluent

    with Tracking(tmp_path / "mlflow.db"):
        exp = mlflow.set_experiment("private-name-check")
        assert fluent._active_experiment_id == exp.experiment_id
