"""Tracking glue: behaviour that only shows up when several workers share one tracking server."""
import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from brainseg.settings.config import Train
from brainseg.tracking import mlflow_runs, run_metrics, run_notes

ROWS = pd.DataFrame({"patient": ["TCGA_AA_0001"], "slice": [1], "tumor_px": [10]})


def test_dataset_input_retries_a_concurrent_insert_race(monkeypatch, tmp_path):
    calls = []

    def flaky(ds, context):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException('BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value '
                                  'violates unique constraint "dataset_pk"')

    monkeypatch.setattr(mlflow, "log_input", flaky)
    monkeypatch.setattr(mlflow_runs.time, "sleep", lambda s: None)
    mlflow_runs.log_dataset_input(ROWS, tmp_path, "files-abc", "train")
    assert calls == ["train", "train"]


def test_dataset_input_gives_up_on_a_persistent_race(monkeypatch, tmp_path):
    calls = []

    def always(ds, context):
        calls.append(context)
        raise MlflowException("unique constraint dataset_pk")

    monkeypatch.setattr(mlflow, "log_input", always)
    monkeypatch.setattr(mlflow_runs.time, "sleep", lambda s: None)
    with pytest.raises(MlflowException):
        mlflow_runs.log_dataset_input(ROWS, tmp_path, "files-abc", "train")
    assert len(calls) == 4


def test_dataset_input_does_not_retry_other_errors(monkeypatch, tmp_path):
    calls = []

    def broken(ds, context):
        calls.append(context)
        raise MlflowException("permission denied")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with pytest.raises(MlflowException, match="permission denied"):
        mlflow_runs.log_dataset_input(ROWS, tmp_path, "files-abc", "train")
    assert calls == ["train"]


def test_dataset_input_is_linked_to_the_run(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        # An explicit experiment: earlier tests may leave another store's experiment id active.
        experiment_id = mlflow.create_experiment("tracking-glue")
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow_runs.log_dataset_input(ROWS, tmp_path, "files-abc", "train")
            mlflow_runs.log_dataset_input(ROWS, tmp_path, "files-abc", "val")
        inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
        assert {i.dataset.name for i in inputs} == {"kaggle_3m@files-abc"}
        assert len(inputs) >= 1
    finally:
        mlflow.set_tracking_uri(None)


def test_experiments_are_tagged_for_training_and_the_link_opens_runs_not_traces(tmp_path):
    from conftest import Tracking

    with Tracking(tmp_path / "mlflow.db"):
        exp = mlflow_runs.set_experiment("kind-check")
        again = mlflow_runs.set_experiment("kind-check")  # once set, left alone
        stored = mlflow.MlflowClient().get_experiment(exp.experiment_id)
        assert again.experiment_id == exp.experiment_id
        assert stored.tags[mlflow_runs.KIND_TAG] == "custom_model_development"
        parent = mlflow_runs.create_parent_run("kind-parent", "study", {}, {})  # the study's experiment too
        parent_exp = mlflow.MlflowClient().get_run(parent).info.experiment_id
        assert mlflow.MlflowClient().get_experiment(parent_exp).tags[mlflow_runs.KIND_TAG] == mlflow_runs.KIND
    assert run_notes.ui_link(exp.experiment_id, "http://h:9/") == (
        f"http://h:9/#/experiments/{exp.experiment_id}?workflowType=machine_learning")


@pytest.mark.parametrize("arch, encoder_params", [
    ("plain_unet", {}), ("unetpp", {}),  # the project's own U-Nets have no encoder: none is recorded
    ("unet", {"encoder": "resnet18", "encoder_weights": None, "freeze_encoder_epochs": 0}),
])
def test_train_params_name_an_encoder_only_where_the_architecture_has_one(arch, encoder_params):
    params = run_metrics.train_config_params(Train(arch=arch, encoder="resnet18"))
    assert params["arch"] == arch and params["size"] == Train().size
    assert {k: v for k, v in params.items() if "encoder" in k} == encoder_params
