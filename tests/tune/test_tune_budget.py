"""A study on a wall-clock budget: the plan from a measured throughput, the hand-set trial first at
the same fidelity as every other, the search stopping in time for the refit, the refit registered
and linked to its study."""

from __future__ import annotations

import json
import time

import mlflow
import optuna
import pytest

from brainseg.training.budget import BudgetError
from brainseg.tune.clock import Clock, session_clock
from brainseg.tune.plan import Fidelity
from brainseg.tune.study_budget import StudyBudget, expected_fraction, plan_trials, promoted, refit_minutes
from conftest import Tracking, prepared_project
from helpers import invoke


# ------------------------------------------------------------------------------ the plan (pure)
@pytest.mark.parametrize("epoch_s", [2.0, 15.0, 40.0])
def test_the_plan_fits_the_refit_and_the_rungs_into_the_budget(epoch_s):
    budget = StudyBudget(budget_s=100 * 60, refit_s=45 * 60, reserve_s=6 * 60, target_trials=12, rungs=3,
                         reduction_factor=3)
    plan = plan_trials(budget, elapsed_s=90, epoch_s=epoch_s, overhead_s=40)
    assert plan.search_s + budget.refit_s + budget.reserve_s == pytest.approx(budget.budget_s)
    assert plan.rungs_s[-1] == pytest.approx(plan.trial_s)
    assert [b / a for a, b in zip(plan.rungs_s, plan.rungs_s[1:])] == pytest.approx([3, 3])
    assert plan.rungs_s[0] >= epoch_s  # the first rung holds at least one epoch
    # the expected cost of the target trials is what the search has after the probe
    per_trial = plan.trial_s * plan.expected_fraction + plan.overhead_s
    assert 12 * per_trial == pytest.approx(plan.search_s - 90)
    assert plan.last_start_s == pytest.approx(plan.search_s - plan.rungs_s[0] - 40)
    clock = session_clock(budget, plan, started=1000.0)
    assert clock.study_end == 1000.0 + budget.budget_s and clock.search_end == 1000.0 + plan.search_s
    assert clock.last_start < clock.search_end < clock.study_end


def test_a_slower_machine_gets_the_same_trial_budget_but_fewer_epochs():
    """Fidelity is seconds of training: the plan does not depend on the CPU, only what fits in it."""
    budget = StudyBudget(6000, 2700, 360, 12, 3, 3)
    fast, slow = (plan_trials(budget, elapsed_s=60, epoch_s=e, overhead_s=40) for e in (10.0, 30.0))
    assert fast.trial_s == slow.trial_s and fast.rungs_s == slow.rungs_s
    assert fast.epochs_at(fast.trial_s) == pytest.approx(3 * slow.epochs_at(slow.trial_s))


def test_a_budget_too_small_for_one_epoch_at_the_first_rung_is_refused_naming_the_setting():
    budget = StudyBudget(budget_s=60 * 60, refit_s=45 * 60, reserve_s=6 * 60, target_trials=40, rungs=4,
                         reduction_factor=3)
    with pytest.raises(BudgetError, match="tune.budget_minutes.*one trial epoch"):
        plan_trials(budget, elapsed_s=60, epoch_s=30, overhead_s=40)
    with pytest.raises(BudgetError, match="no time for the search"):
        plan_trials(StudyBudget(40 * 60, 45 * 60, 0, 12, 3, 3), elapsed_s=0, epoch_s=1, overhead_s=0)


def test_the_successive_halving_cost_follows_optunas_rule():
    assert promoted(0.9, [0.1, 0.5, 0.9], 3) and not promoted(0.5, [0.1, 0.5, 0.9], 3)
    assert expected_fraction(1, 3, 3) == 1.0 and expected_fraction(50, 1, 3) == 1.0
    many = expected_fraction(50, 3, 3)
    assert 1 / 9 < many < expected_fraction(6, 3, 3) < 1.0  # more trials: more of them stop at rung 0


def test_the_refit_keeps_the_recipes_budget_unless_the_study_has_less_left():
    assert refit_minutes(45, left_s=60 * 60, reserve_s=360) == 45
    assert refit_minutes(45, left_s=40 * 60, reserve_s=360) == pytest.approx(34)
    with pytest.raises(BudgetError, match="no time left for the refit"):
        refit_minutes(45, left_s=300, reserve_s=360)


def test_a_budgeted_trial_is_a_time_budgeted_run_at_one_resolution():
    fid = Fidelity(64, 60, 2, 18, 3).on_budget(540.0, 60.0)
    assert fid.unit == "seconds" and fid.rungs() == [60, 180, 540]
    s = fid.trial_settings({"size": 128, "epochs": 70, "budget_minutes": 45, "progressive_size": 64})
    assert s["size"] == 64 and s["budget_minutes"] == 9 and s["progressive_size"] is None


# ---------------------------------------------------------------------- end to end on the smoke profile
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return prepared_project(tmp_path_factory.mktemp("tune-budget"))


BUDGET = ["--set", "tune.budget_minutes=2.5", "--set", "train.budget_minutes=0.3", "--set", "tune.reserve_minutes=0.2",
          "--set", "tune.target_trials=2", "--set", "tune.rungs=2", "--set", "tune.reduction_factor=2"]


def test_a_study_on_a_budget_ends_in_time_with_the_recipe_first_and_a_registered_refit(project, monkeypatch):
    monkeypatch.chdir(project)
    with Tracking(project / "mlflow.db"):
        t0 = time.time()
        result = invoke("tune", "--profile", "smoke", "--study-name", "budget", *BUDGET, "--refit", "--register",
                        "--out", "reports/budget.json")
        wall = time.time() - t0
        assert result.exit_code == 0, result.output
        summary = json.loads(open("reports/budget.json").read())
        study = optuna.load_study(study_name="budget", storage="sqlite:///optuna.db")
        plan, clock = study.user_attrs["trial_plan"], Clock(**study.user_attrs["session_clock"])
        assert "measured" in result.output and "slices/s" in result.output  # the probe's line
        assert wall <= 2.5 * 60 + 20  # the budget, and the process start-up the clock does not see
        trials = study.trials
        assert trials[0].user_attrs.get("recipe") == "hand-set" and trials[0].number == 0
        # every trial started before the last start, none trained past the end of the search
        for t in trials:
            assert t.datetime_start.timestamp() <= clock.last_start + 1
            assert t.datetime_complete is not None and t.datetime_complete.timestamp() <= clock.search_end + 15
            # seconds of training; an epoch ending in the second of the one before it is reported one step
            # later (every value reaches the pruner), so the steps may run ahead by one per report
            assert max(t.intermediate_values, default=0) <= plan["trial_s"] + 5 + len(t.intermediate_values)
        client = mlflow.MlflowClient()
        fidelities = {client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["fidelity"] for t in trials
                      if "mlflow_run_id" in t.user_attrs}
        assert len(fidelities) == 1 and "min budget" in fidelities.pop()  # the recipe at the same fidelity
        refit = summary["refit"]
        run = client.get_run(refit["run_id"])
        last_trial_end = max(t.datetime_complete.timestamp() for t in trials)
        assert run.info.start_time / 1000 >= last_trial_end - 1  # the refit runs after the search
        assert run.info.end_time / 1000 <= clock.study_end + 10  # and the study ends within its budget
        assert float(run.data.params["budget_minutes"]) == pytest.approx(refit["budget_minutes"])
        assert refit["budget_minutes"] <= 0.3
        assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
        version = client.get_model_version("brainseg-segmenter", refit["registered"]["version"])
        assert version.run_id == refit["run_id"] and version.tags["study_parent_run_id"] == summary["parent_run_id"]
        parent = client.get_run(summary["parent_run_id"])
        assert "study_minutes_left" in parent.data.metrics and "min of the study left" in parent.data.tags["progress"]
        assert float(parent.data.params["study.budget_minutes"]) == 2.5
        # the study's run records the fidelity that ran: seconds of training, the planned rungs
        assert parent.data.params["study.resource"] == "seconds"
        assert parent.data.params["study.max_resource"] == str(int(plan["trial_s"]))
        assert "refit of trial 0" in result.output or "refit of trial 1" in result.output
        assert "min of search left" in result.output  # one line per finished or pruned trial


def test_a_budgeted_refit_needs_the_recipes_budget(project, monkeypatch):
    monkeypatch.chdir(project)
    with Tracking(project / "mlflow.db"):
        result = invoke("tune", "--profile", "smoke", "--study-name", "no-recipe-budget",
                        "--set", "tune.budget_minutes=3", "--refit")
    assert result.exit_code == 2 and "train.budget_minutes" in result.output
    assert "Traceback" not in result.output


def test_a_worker_trains_at_the_launchers_fidelity_and_stops_at_its_deadlines(tmp_path, monkeypatch):
    """The plan and the session's deadlines are kept in the study, so a worker process (or a resumed
    session) uses the same rungs in seconds and the same last start as the launcher planned."""
    from brainseg.settings.config import load_settings, validate_settings
    from brainseg.tune.clock import CLOCK_ATTR, PLAN_ATTR, worker_clock
    from brainseg.tune.plan import open_plan_study, plan_from_settings
    from brainseg.tune.study_budget import TrialPlan
    from helpers import PROJECT_ROOT

    monkeypatch.chdir(PROJECT_ROOT)
    settings = validate_settings(load_settings("smoke", ["tune.budget_minutes=10"]))
    storage = f"sqlite:///{tmp_path}/o.db"
    launcher = plan_from_settings(settings, "shared", storage, 1, 60)
    study = open_plan_study(launcher, worker=0)
    trial_plan = TrialPlan(trial_s=120.0, rungs_s=(60.0, 120.0), search_s=500, last_start_s=400, overhead_s=20,
                           epoch_s=5, expected_fraction=0.8)
    clock = Clock(started=1000.0, last_start=1400.0, search_end=1500.0, study_end=1600.0)
    study.set_user_attr(PLAN_ATTR, trial_plan.to_dict())
    study.set_user_attr(CLOCK_ATTR, clock.to_dict())
    worker_plan = plan_from_settings(settings, "shared", storage, 1, 60)
    worker_study = open_plan_study(worker_plan, worker=1)
    assert worker_clock(worker_plan, worker_study) == clock
    fid = worker_plan.fidelity
    assert fid.unit == "seconds" and fid.rungs() == [60, 120] and fid.max_resource == 120
    assert isinstance(worker_study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    assert worker_study.pruner._min_resource == 60
    cfg = fid.trial_settings(settings.train.model_dump())
    assert cfg["budget_minutes"] == 2 and cfg["progressive_size"] is None
    # without a budget in its settings a worker keeps the epoch fidelity
    plain = plan_from_settings(validate_settings(load_settings("smoke")), "shared", storage, 1, 60)
    assert worker_clock(plain, open_plan_study(plain, worker=2)) is None and plain.fidelity.unit == "epochs"


def test_a_study_budget_too_short_for_this_machine_exits_2_before_any_trial(project, monkeypatch):
    monkeypatch.chdir(project)
    with Tracking(project / "mlflow.db"):
        result = invoke("tune", "--profile", "smoke", "--study-name", "too-short", "--no-refit",
                        "--set", "tune.budget_minutes=0.2", "--set", "tune.target_trials=40", "--set", "tune.rungs=4")
        assert result.exit_code == 2, result.output
        assert "tune.budget_minutes" in result.output and "Traceback" not in result.output
        study = optuna.load_study(study_name="too-short", storage="sqlite:///optuna.db")
        assert [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING] == []
