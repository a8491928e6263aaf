"""Optuna tuning: search space, recipe first, rungs, seeds, nested MLflow runs, resume, bad input."""

import io
import json
import re

import mlflow
import optuna
import pytest

from brainseg.settings.settings_io import ConfigError
from brainseg.tune.plan import Fidelity, make_pruner, redact, refit_epochs
from brainseg.tune.runs import Progress
from brainseg.tune.sampler import TrialSeededSampler, derive_seed
from brainseg.tune.space import apply_params, load_search_space, recipe_params, trial_config
from conftest import MAX_LINE
from helpers import invoke

TrialState = optuna.trial.TrialState

BASE = {"arch": "unet", "encoder": "resnet18", "size": 64, "loss": {"bce": 0.5, "dice": 1.0}}
SMOKE = "experiments/search_space_smoke.yaml"


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
    assert cfg.loss == {"bce": 0.5, "dice": 1.0, "focal": 1.0}  # one weight set, the recipe's others kept
    assert "encoder" not in trial.params


@pytest.mark.parametrize("params,loss,lr", [
    ({}, {"bce": 0.5, "dice": 1.0}, 0.001),
    ({"loss.bce": 0.0}, {"bce": 0.0, "dice": 1.0}, 0.001),
    ({"loss.tversky": 0.3, "lr": 0.01}, {"bce": 0.5, "dice": 1.0, "tversky": 0.3}, 0.01),
])
def test_apply_params_sets_single_loss_weights(params, loss, lr):
    out = apply_params({"lr": 0.001, "loss": {"bce": 0.5, "dice": 1.0}}, params)
    assert out["loss"] == loss and out["lr"] == lr


SPACE = """
arch: {type: categorical, choices: [plain_unet, unet]}
encoder: {type: categorical, choices: [resnet18, resnet34], when: {arch: [unet]}}
loss.focal: {type: float, low: 0.0, high: 1.0}
lr: {type: float, low: 0.0005, high: 0.005, log: true}
"""


@pytest.mark.parametrize("recipe,expected", [
    ({"arch": "unet", "encoder": "resnet34", "lr": 0.001, "loss": {"dice": 1.0}},
     {"arch": "unet", "encoder": "resnet34", "loss.focal": 0.0, "lr": 0.001}),
    ({"arch": "plain_unet", "encoder": "resnet50", "lr": 0.005, "loss": {"focal": 0.25}},  # encoder not used
     {"arch": "plain_unet", "loss.focal": 0.25, "lr": 0.005}),
])
def test_the_hand_set_recipe_becomes_trial_params(tmp_path, recipe, expected):
    assert recipe_params(recipe, _space(tmp_path, SPACE)) == expected


@pytest.mark.parametrize("recipe,name", [
    ({"arch": "fpn", "lr": 0.001, "loss": {}}, "arch"),
    ({"arch": "unet", "encoder": "resnet50", "lr": 0.001, "loss": {}}, "encoder"),
    ({"arch": "unet", "encoder": "resnet18", "lr": 0.1, "loss": {}}, "lr"),
    ({"arch": "unet", "encoder": "resnet18", "lr": 0.001, "loss": {"focal": 2.0}}, "loss.focal"),
])
def test_a_recipe_outside_the_space_is_refused_naming_the_parameter(tmp_path, recipe, name):
    with pytest.raises(ConfigError, match=f"recipe's {name}=") as err:
        recipe_params(recipe, _space(tmp_path, SPACE), tmp_path / "space.yaml")
    assert "space.yaml" in str(err.value)


@pytest.mark.parametrize("fid,rungs", [
    (Fidelity(64, 60, 2, 18, 3), [2, 6, 18]),
    (Fidelity(64, 10, 1, 4, 2), [1, 2, 4]),
    (Fidelity(64, None, 4, 40, 3), [4, 12, 36]),
    (Fidelity(64, None, 5, 5, 3), [5]),
])
def test_rung_schedule(fid, rungs):
    assert fid.rungs() == rungs


@pytest.mark.parametrize("epochs,trial_steps,refit_steps,expected", [
    (18, 60, 60, 18), (18, 30, 60, 9), (5, 10, 3, 17), (6, None, None, 6), (6, 10, None, 6)])
def test_refit_sees_as_many_batches_as_the_best_trial(epochs, trial_steps, refit_steps, expected):
    assert refit_epochs(epochs, trial_steps, refit_steps) == expected


def test_successive_halving_prunes_only_at_rungs_on_the_epoch_resource():
    """Rungs 1, 2, 4 (min_resource 1, reduction 2): a trial is judged only after 1, 2 and 4 epochs,
    against the trials that reached the same rung; the first one at a rung always goes on."""
    study = optuna.create_study(direction="maximize", pruner=make_pruner("sha", Fidelity(32, 10, 1, 4, 2)))

    def run(values):  # values after epochs 1, 2, ... ; returns the epoch it was pruned after, or None
        trial = study.ask()
        for epoch, v in enumerate(values, start=1):
            trial.report(v, epoch)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                return epoch
        study.tell(trial, values[-1])
        return None

    assert run([0.5, 0.6, 0.62, 0.7]) is None   # first at every rung: promoted, completes
    assert run([0.1, 0.9, 0.9, 0.9]) == 1        # worse at rung 1 (epoch 1): stopped there
    assert run([0.6, 0.3, 0.95, 0.95]) == 2      # better at rung 1, worse at rung 2 (epoch 2)
    assert run([0.7, 0.7, 0.2, 0.8]) is None     # epoch 3 is between rungs; best at rung 4 (0.8 > 0.7)
    spent = [len(t.intermediate_values) for t in study.trials]
    assert spent == [4, 1, 2, 4]


def test_sampler_seed_differs_per_resume_and_per_worker():
    seeds = {derive_seed(0, "study", n, w) for n in (0, 1, 2) for w in (0, 1)}
    assert len(seeds) == 6
    assert derive_seed(0, "study", 2, 1) == derive_seed(0, "study", 2, 1)


def _sample(*studies: optuna.Study) -> list[float]:
    """One trial of each study, asked together (as processes running at once), then told."""
    trials = [study.ask() for study in studies]
    points = [t.suggest_float("x", 0.0, 1.0) for t in trials]
    for study, t, x in zip(studies, trials, points):
        study.tell(t, x)
    return points


def _sessions(sessions: int, per_session: int) -> list[float]:
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    points = []
    for _ in range(sessions):
        study = optuna.load_study(study_name="s", storage=storage, sampler=TrialSeededSampler(7, "s"))
        points += [x for _ in range(per_session) for x in _sample(study)]
    return points


def test_a_resumed_study_samples_new_points_reproducibly():
    straight = _sessions(1, 6)  # past TPE's 4 random start-up trials
    assert len(set(straight)) == 6
    assert _sessions(6, 1) == straight  # resumed 5 times: the same points as one session, none repeated


def test_two_sessions_started_together_without_worker_ids_sample_different_points():
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    first, second = (optuna.load_study(study_name="s", storage=storage, sampler=TrialSeededSampler(7, "s"))
                     for _ in range(2))
    points = [x for _ in range(3) for x in _sample(first, second)]
    assert len(set(points)) == 6


def _finish(study: optuna.Study, state, value=None, epochs=None) -> optuna.trial.FrozenTrial:
    study.add_trial(optuna.trial.create_trial(state=state, value=value, intermediate_values=epochs or {}))
    return study.trials[-1]


FINISHED = [(TrialState.PRUNED, None, {1: 0.21}), (TrialState.COMPLETE, 0.55, {1: 0.5, 2: 0.55}),
            (TrialState.FAIL, None, None)]


def test_trial_progress_lines_count_pruned_trials_and_the_best_so_far():
    study = optuna.create_study(direction="maximize")
    _finish(study, TrialState.COMPLETE, 0.4, {1: 0.4})  # an earlier session's trial
    lines = []
    progress = Progress(None, 3, start_count=1, echo=lines.append)
    for state, value, epochs in FINISHED:
        progress(study, _finish(study, state, value, epochs))
    assert lines == ["trial 1 of 3 (#1) pruned: 0.2100 after epoch 1 | best 0.4000 (#0) | pruned 1",
                     "trial 2 of 3 (#2) complete: 0.5500 | best 0.5500 (#2) | pruned 1",
                     "trial 3 of 3 (#3) fail: - | best 0.5500 (#2) | pruned 1"]


def test_trial_progress_on_a_terminal_is_a_rich_display_with_the_current_trials_epochs():
    from rich.console import Console

    screen = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=200)
    study, lines = optuna.create_study(direction="maximize"), []
    progress = Progress(None, 2, start_count=0, echo=lines.append, mode="bar", console=screen)
    epochs = progress.epochs(0, 2)
    epochs.on_train_begin()
    epochs.on_epoch_begin(0)
    epochs.on_epoch_end(0, {"val_patient_dice": 0.21})
    assert [t.description for t in progress.bar.tasks] == ["trials", "trial #0", "  steps"]
    progress(study, _finish(study, *FINISHED[0]))
    progress(study, _finish(study, *FINISHED[1]))
    progress.close()
    (trials,) = progress.bar.tasks  # the finished trials' epoch rows are gone
    assert (trials.completed, trials.total, trials.fields["last"]) == (2, 2, "best 0.5500 (#1) | pruned 1")
    assert lines == [] and "trial 1 of 2 (#0) pruned: 0.2100 after epoch 1" in screen.file.getvalue()


def test_a_new_study_starts_with_the_recipe_once(in_project, tmp_path):
    from brainseg.settings.config import load_settings, validate_settings
    from brainseg.tune.plan import open_plan_study, plan_from_settings

    settings = validate_settings(load_settings("smoke"))
    plan = plan_from_settings(settings, "recipe-once", f"sqlite:///{tmp_path}/o.db", 1, 60)
    study = open_plan_study(plan, worker=0)
    trial = study.ask()
    assert trial.params == {} and trial.user_attrs["recipe"] == "hand-set"
    assert trial_config(trial, plan.fidelity.trial_settings(plan.settings.train.model_dump()), plan.space).lr == \
        plan.settings.train.lr
    assert trial.params == plan.recipe
    study.tell(trial, 0.5)
    again = open_plan_study(plan, worker=0)  # resuming: no second recipe
    assert [t.state.name for t in again.trials] == ["COMPLETE"]
    assert again.ask().user_attrs.get("recipe") is None


def test_invalid_search_spaces_name_the_file_and_parameter(tmp_path):
    for text, match in [
        ("arch: {type: categorical, choices: [segformer]}", "unknown name"),
        ("encoder: {type: categorical, choices: [resnet999]}", "unknown name"),
        ("loss.hinge: {type: float, low: 0, high: 1}", "unknown name"),
        ("lr: {type: float, low: 0.1, high: 0.01}", "low <= high"),
        ("colour: {type: categorical, choices: [red]}", "not a train setting"),
        ("lr: {type: gaussian}", "needs type"),
        ("- just a list", "expected a mapping"),
        ("arch: [unclosed", "not valid YAML"),
    ]:
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
    assert client.get_experiment(parent.info.experiment_id).name == "brainseg"
    assert parent.data.params["study.name"] == summary["study"]
    assert parent.data.params["study.pruner"] == "sha" and parent.data.params["study.sampler"].startswith("TPESampler")
    assert parent.data.params["study.rungs"] == "[1, 2, 4]"
    assert parent.data.tags["best_run_id"] == summary["best_run_id"]
    assert parent.data.metrics["best_val_patient_dice"] == pytest.approx(summary["best_value"])
    assert parent.data.metrics["trials_finished"] == 2  # progress, logged after each trial
    history = client.get_metric_history(parent.info.run_id, "trials_finished")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "intermediate_values.png", "optuna_study.html"} <= artifacts
    html = open(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                    artifact_path="optuna_study.html")).read()
    assert html.count("<section>") >= 3 and "Plotly.newPlot" in html
    assert 'src="http' not in html and len(html) > 1_000_000  # plotly.js inlined: renders offline
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                  "and tags.`brainseg.role` = 'trial'")
    assert len(children) == summary["trials"] == 2
    states = {c.info.run_id: c.data.tags["state"] for c in children}
    assert set(states.values()) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states.values()
    study = optuna.load_study(study_name=summary["study"], storage="sqlite:///optuna.db")
    by_state = {t.user_attrs["mlflow_run_id"]: t.state.name for t in study.trials}
    assert by_state == states
    first = study.trials[0]
    assert first.user_attrs["recipe"] == "hand-set" and summary["recipe_trial"] == 0
    assert first.params == {"arch": "plain_unet", "base_filters": 8, "loss.bce": 0.5, "loss.dice": 1.0, "lr": 0.003}
    complete = [c for c in children if states[c.info.run_id] == "COMPLETE"]
    objective = {c.info.run_id: c.data.metrics["best_val_patient_dice"] for c in complete}
    assert objective[summary["best_run_id"]] == pytest.approx(summary["best_value"])
    assert summary["best_value"] == pytest.approx(max(objective.values()))
    for child in children:  # the trial's pruner steps are epochs trained: one report per epoch logged
        t = next(t for t in study.trials if t.user_attrs["mlflow_run_id"] == child.info.run_id)
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1))
        assert len(client.get_metric_history(child.info.run_id, "val_patient_dice")) == len(t.intermediate_values)


def test_resuming_a_study_twice_never_repeats_a_trial(in_project, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = ("tune", "--profile", "smoke", "--study-name", "resume-me", "--storage", storage,
            "--set", "tune.epochs=1", "--set", "tune.min_resource=1", "--out", str(tmp_path / "t.json"))
    for session in range(3):
        result = invoke(*args, "--n-trials", "1")
        assert result.exit_code == 0, result.output
        assert "trial 1 of 1 (#" in result.output and "| best " in result.output and "| pruned " in result.output
        # not a terminal: one line per epoch, naming the trial; no Keras bar of backspaces
        assert re.search(rf"^trial #{session}  epoch 1/1  loss \S+ .* s$", result.output, re.MULTILINE), result.output
        assert "\x08" not in result.output and max(map(len, result.output.splitlines())) <= MAX_LINE
    study = optuna.load_study(study_name="resume-me", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2]
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == 3, params  # each resumed session sampled new points
    assert study.trials[0].user_attrs["recipe"] == "hand-set"
    summary = json.loads((tmp_path / "t.json").read_text())
    children = mlflow.search_runs(experiment_names=["brainseg"],
                                  filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == 3  # every session's trials under the one parent run


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
    (("--set", "train.lr=0.5"), "recipe's lr=0.5"),
    (("--set", "tune.min_resource=9"), "tune.min_resource"),
    (("--set", "tune.reduction_factor=1"), "tune.reduction_factor"),
])
def test_bad_tuning_input_fails_before_any_trial(in_project, tmp_path, args, match):
    runs_before = len(mlflow.search_runs(experiment_names=["brainseg"]))
    result = invoke("tune", "--profile", "smoke", "--study-name", "never", "--storage",
                    f"sqlite:///{tmp_path}/o.db", *args)
    assert result.exit_code == 2, result.output
    assert match in result.output
    assert len(mlflow.search_runs(experiment_names=["brainseg"])) == runs_before
