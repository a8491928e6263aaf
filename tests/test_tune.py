"""Optuna tuning: search space from YAML, nested MLflow runs, resume, bad input before any trial."""

import json

import mlflow
import optuna
import pytest

from brainseg.config import ConfigError
from brainseg.tune import load_search_space, redact, trial_config
from conftest import invoke

BASE = {"arch": "unet", "encoder": "resnet18", "size": 64, "loss": {"bce": 0.5, "dice": 1.0}}


def _space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_search_space(path)


def test_trial_config_applies_conditional_parameters_and_loss_weights(tmp_path):
    space = _space(tmp_path, """
arch: {type: categorical, choices: [plain_unet]}
encoder: {type: categorical, choices: [resnet34], when: {arch: [unet]}}
base_filters: {type: categorical, choices: [8], when: {arch: [plain_unet]}}
loss.focal: {type: float, low: 1.0, high: 1.0}
lr: {type: float, low: 0.001, high: 0.001, log: true}
""")
    trial = optuna.create_study().ask()
    cfg = trial_config(trial, BASE, space)
    assert cfg.arch == "plain_unet" and cfg.base_filters == 8 and cfg.lr == pytest.approx(0.001)
    assert cfg.encoder == "resnet18"  # not suggested: the condition does not hold
    assert cfg.loss == {"focal": 1.0}  # suggested loss weights replace the base loss
    assert "encoder" not in trial.params


@pytest.mark.parametrize("text,match", [
    ("arch: {type: categorical, choices: [segformer]}", "unknown name"),
    ("encoder: {type: categorical, choices: [resnet999]}", "unknown name"),
    ("loss.hinge: {type: float, low: 0, high: 1}", "unknown name"),
    ("lr: {type: float, low: 0.1, high: 0.01}", "low <= high"),
    ("colour: {type: categorical, choices: [red]}", "not a train setting"),
    ("lr: {type: gaussian}", "needs type"),
    ("- just a list", "expected a mapping"),
    ("arch: [unclosed", "not valid YAML"),
])
def test_invalid_search_spaces_name_the_file_and_parameter(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as err:
        _space(tmp_path, text)
    assert "space.yaml" in str(err.value)


def test_storage_password_is_never_logged():
    assert redact("postgresql://bob:s3cret@db:5432/optuna") == "postgresql://bob:***@db:5432/optuna"
    assert redact("sqlite:///optuna.db") == "sqlite:///optuna.db"


def test_study_is_a_parent_run_with_one_child_per_trial(in_project):
    summary = json.loads(open("reports/tune.json").read())  # the fixture ran a 2-trial smoke study
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.params["study_name"] == summary["study"]
    assert parent.data.params["pruner"] == "hyperband" and parent.data.params["sampler"] == "TPESampler"
    assert parent.data.tags["best_run_id"] == summary["best_run_id"]
    assert parent.data.metrics["best_value"] == pytest.approx(summary["best_value"])
    assert {"optimization_history.png", "parallel_coordinate.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == summary["trials"] == 2
    states = {c.info.run_id: c.data.tags["state"] for c in children}
    assert set(states.values()) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states.values()
    study = optuna.load_study(study_name=summary["study"], storage="sqlite:///optuna.db")
    by_state = {t.user_attrs["mlflow_run_id"]: t.state.name for t in study.trials}
    assert by_state == states
    param_names = [set(c.data.params) for c in children]
    assert all(names == param_names[0] for names in param_names)  # same names: the UI lines them up
    complete = [c for c in children if states[c.info.run_id] == "COMPLETE"]
    assert all(set(c.data.metrics) == set(complete[0].data.metrics) for c in complete)
    for child in complete:
        assert {"val_per_patient_metrics.csv", "val_overlays.png", "learning_curves.png"} <= {
            a.path for a in client.list_artifacts(child.info.run_id)}
    for child in children:  # every trial, pruned or not, has the per-epoch curves under train's names
        assert {"loss", "val_loss", "val_patient_dice"} <= set(child.data.metrics)
    objective = {c.info.run_id: c.data.metrics["best_val_patient_dice"] for c in complete}
    assert objective[summary["best_run_id"]] == pytest.approx(summary["best_value"])
    assert summary["best_value"] == pytest.approx(max(objective.values()))


def test_rerunning_a_study_continues_it(in_project, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = ("tune", "--profile", "smoke", "--study-name", "resume-me", "--storage", storage,
            "--set", "tune.epochs=1", "--out", str(tmp_path / "t.json"))
    assert invoke(*args, "--n-trials", "1").exit_code == 0
    result = invoke(*args, "--n-trials", "1")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="resume-me", storage=storage)
    assert [t.number for t in study.trials] == [0, 1]
    summary = json.loads((tmp_path / "t.json").read_text())
    children = mlflow.search_runs(experiment_names=["brainseg"],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == 2  # both workers' trials under the one parent run


def test_journal_storage_is_accepted(in_project, tmp_path):
    result = invoke("tune", "--profile", "smoke", "--study-name", "journal", "--storage",
                    f"journal:{tmp_path}/journal.log", "--n-trials", "1", "--set", "tune.epochs=1",
                    "--out", str(tmp_path / "t.json"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "journal.log").stat().st_size > 0


@pytest.mark.parametrize("args,match", [
    (("--storage", "postgresql://nobody@127.0.0.1:1/none"), "cannot be opened"),
    (("--set", "tune.pruner=sometimes"), "tune.pruner"),
    (("--set", "tune.search_space=experiments/missing.yaml"), "search space file not found"),
    (("--set", "train.encoder=resnet999", "--set", "train.arch=unet"), "unknown encoder"),
])
def test_bad_tuning_input_fails_before_any_trial(in_project, tmp_path, args, match):
    runs_before = len(mlflow.search_runs(experiment_names=["brainseg"]))
    result = invoke("tune", "--profile", "smoke", "--study-name", "never", "--storage",
                    f"sqlite:///{tmp_path}/o.db", *args)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert len(mlflow.search_runs(experiment_names=["brainseg"])) == runs_before
