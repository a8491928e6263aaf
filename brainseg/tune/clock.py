"""The clock of a study on a budget: the throughput probe, the plan kept with the study, deadlines.

The launcher measures what a trial epoch costs (the hand-set recipe at the search fidelity, on the
real arrays: :func:`brainseg.training.throughput.measure`), plans the trials
(:func:`brainseg.tune.study_budget.plan_trials`) and keeps the plan in the study (user attribute ``trial_plan``), so
that every worker and every
resumed session trains its trials at the same fidelity. Each session has its own deadlines (the
study's budget counts from the session's start): they are study user attributes too, read by the
workers.
"""

from __future__ import annotations

import dataclasses
import time

import optuna

from brainseg.settings.config import Train
from brainseg.tune.plan import StudyPlan, make_pruner, study_budget
from brainseg.tune.study_budget import StudyBudget, TrialPlan, plan_trials

PLAN_ATTR, CLOCK_ATTR = "trial_plan", "session_clock"


@dataclasses.dataclass(frozen=True)
class Clock:
    """One session's deadlines (Unix seconds)."""

    started: float
    last_start: float    # no trial starts after this
    search_end: float    # a running trial is stopped (pruned) here
    study_end: float     # the whole study, refit and registration included

    def left(self, until: float | None = None, now: float | None = None) -> float:
        return (self.study_end if until is None else until) - (time.time() if now is None else now)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def overhead_estimate(build_s: float, val_s: float) -> float:
    """A trial's cost beside its training: the model build, the completed trial's validation at the
    original size (about 4 network-size passes: 256 px and the test-time flips) and ~20 s of model
    logging and MLflow records (measured on the 88 patients: 25-45 s on 2 cores)."""
    return build_s + 4 * val_s + 20.0


def start_clock(plan: StudyPlan, ctx, study: optuna.Study, refit: bool, started: float, echo=print) -> Clock | None:
    """Plan the study's trials (once per study) and this session's deadlines; None without a budget.

    Sets ``plan.fidelity`` to seconds of training and the study's pruner to those rungs.
    """
    budget = study_budget(plan, refit)
    if budget is None:
        return None
    stored = study.user_attrs.get(PLAN_ATTR)
    if stored:
        trial_plan = TrialPlan.from_dict(stored)
        echo(f"study on a budget of {budget.budget_s / 60:g} min: trials keep the study's fidelity "
             f"({trial_plan.trial_s / 60:.1f} min of training each)")
    else:
        trial_plan = probe_and_plan(plan, ctx, budget, started, echo)
        study.set_user_attr(PLAN_ATTR, trial_plan.to_dict())
    clock = session_clock(budget, trial_plan, started)
    study.set_user_attr(CLOCK_ATTR, clock.to_dict())
    use_plan(plan, study, trial_plan)
    return clock


def probe_and_plan(plan: StudyPlan, ctx, budget: StudyBudget, started: float, echo=print) -> TrialPlan:
    from brainseg.training.throughput import measure

    cfg = Train.from_dict(plan.fidelity.trial_settings(plan.settings.train.model_dump()))
    cost = measure(cfg, ctx.arrays("train", cfg), ctx.arrays("val", cfg))
    trial_plan = plan_trials(budget, elapsed_s=time.time() - started, epoch_s=cost.epoch_s,
                             overhead_s=overhead_estimate(cost.build_s, cost.val_s))
    echo(f"study on a budget of {budget.budget_s / 60:g} min (refit {budget.refit_s / 60:g} + reserve "
         f"{budget.reserve_s / 60:g}): measured {cfg.batch_size / cost.step_s:.0f} slices/s at {cfg.size} px; "
         + trial_plan.describe())
    return trial_plan


def session_clock(budget: StudyBudget, trial_plan: TrialPlan, started: float) -> Clock:
    """This session's deadlines: the search ends where the refit's time begins; no trial starts
    when its first rung (and its overhead) would not fit before that."""
    search_end = started + budget.budget_s - budget.refit_s - budget.reserve_s
    last_start = search_end - trial_plan.rungs_s[0] - trial_plan.overhead_s
    return Clock(started, last_start, search_end, started + budget.budget_s)


def use_plan(plan: StudyPlan, study: optuna.Study, trial_plan: TrialPlan) -> None:
    plan.fidelity = plan.fidelity.on_budget(trial_plan.trial_s, trial_plan.rungs_s[0])
    study.pruner = make_pruner(plan.tune.pruner, plan.fidelity)


def worker_clock(plan: StudyPlan, study: optuna.Study) -> Clock | None:
    """A worker's view: the plan and the launcher's deadlines, as stored in the study."""
    stored, clock = study.user_attrs.get(PLAN_ATTR), study.user_attrs.get(CLOCK_ATTR)
    if not stored or not clock or plan.tune.budget_minutes is None:
        return None
    use_plan(plan, study, TrialPlan.from_dict(stored))
    return Clock(**clock)
