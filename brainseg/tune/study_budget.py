"""A study on a wall-clock budget: how long each trial trains, where its rungs are, when to stop.

Pure arithmetic (no Optuna, no TensorFlow). ``tune.budget_minutes`` is the whole study: the search,
then the refit (the best configuration trained with the recipe's own ``train.budget_minutes``) and
a reserve for the refit's evaluation and registration. What is left for the search is shared by
``tune.target_trials`` trials. A trial is a training run on a time budget of its own
(``trial_s``, the top rung); its fidelity is *seconds of training*, so a trial means the same on a
fast and on a slow CPU, and successive halving compares trials at the rungs
``trial_s / reduction_factor**k``. A trial's expected cost is the fraction of ``trial_s`` that
Optuna's asynchronous successive halving lets it run (simulated below) plus a fixed overhead
(model build, the full-size validation and model logging of a completed trial), both measured or
estimated from the throughput probe at the start.
"""

from __future__ import annotations

import dataclasses
import random

from brainseg.training.budget import BudgetError


def promoted(value: float, competing: list[float], reduction_factor: int) -> bool:
    """Optuna's ``SuccessiveHalvingPruner`` rule (maximize): the trial goes on to the next rung if its
    value is in the top 1/reduction_factor of the values seen at this rung (itself included); while
    fewer than ``reduction_factor`` trials reached the rung, only the best so far goes on.

    >>> promoted(0.5, [0.5], 3), promoted(0.4, [0.5, 0.4], 3), promoted(0.6, [0.5, 0.4, 0.6], 3)
    (True, False, True)
    """
    ranked = sorted(competing)
    keep = max(len(ranked) // reduction_factor - 1, 0)
    return value >= ranked[-(keep + 1)]


def expected_fraction(n_trials: int, rungs: int, reduction_factor: int, repeats: int = 64, seed: int = 0) -> float:
    """Mean fraction of the top rung that one of ``n_trials`` trials trains under asynchronous
    successive halving, trials finishing in order and each trial's rank the same at every rung
    (a random order, ``repeats`` times; deterministic).

    >>> expected_fraction(1, 3, 3)     # a lone trial is always promoted
    1.0
    >>> round(expected_fraction(12, 3, 3), 2) < 0.6 and expected_fraction(12, 1, 3) == 1.0
    True
    """
    if rungs <= 1:
        return 1.0
    fractions = [reduction_factor ** (k - rungs + 1) for k in range(rungs)]  # rung k as a share of the top
    rng, total = random.Random(seed), 0.0
    for _ in range(repeats):
        seen: list[list[float]] = [[] for _ in range(rungs)]
        for _trial in range(n_trials):
            value, reached = rng.random(), 0
            for k in range(rungs - 1):
                seen[k].append(value)
                if not promoted(value, seen[k], reduction_factor):
                    break
                reached = k + 1
            total += fractions[reached]
    return total / (repeats * n_trials)


@dataclasses.dataclass(frozen=True)
class StudyBudget:
    """What ``tune.*`` asks for, in seconds."""

    budget_s: float              # the whole study: search, refit, reserve
    refit_s: float               # the refit's training budget (the recipe's train.budget_minutes; 0: no refit)
    reserve_s: float             # after the refit's training: its evaluation, model logging, registration
    target_trials: int
    rungs: int
    reduction_factor: int
    workers: int = 1


@dataclasses.dataclass(frozen=True)
class TrialPlan:
    """The study's plan: each trial's budget and rungs (seconds of training), the search's clock."""

    trial_s: float               # a trial's training budget (the top rung)
    rungs_s: tuple[float, ...]   # seconds of training at which successive halving compares trials
    search_s: float              # from the start of the study to the end of the search
    last_start_s: float          # no trial starts after this (its first rung would not fit)
    overhead_s: float            # per trial, beside its training (estimate)
    epoch_s: float               # one trial epoch at the probe's configuration (training + validation)
    expected_fraction: float
    elapsed_at_plan: float = 0.0  # study time spent before the plan (start-up, the probe)

    @property
    def expected_trials(self) -> float:
        per_trial = self.trial_s * self.expected_fraction + self.overhead_s
        return (self.search_s - self.elapsed_at_plan) / per_trial if per_trial > 0 else 0.0

    def epochs_at(self, seconds: float) -> float:
        return seconds / self.epoch_s if self.epoch_s > 0 else float("inf")

    def describe(self) -> str:
        rungs = ", ".join(f"{r / 60:.1f}" for r in self.rungs_s)
        return (f"search {self.search_s / 60:.1f} min: trials of {self.trial_s / 60:.1f} min of training "
                f"(rungs at {rungs} min; a trial epoch ~{self.epoch_s:.0f} s, so "
                f"~{self.epochs_at(self.rungs_s[0]):.1f} epochs at the first rung), ~{self.expected_trials:.0f} "
                f"trials expected, none started after minute {self.last_start_s / 60:.1f}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rungs_s": list(self.rungs_s)}

    @classmethod
    def from_dict(cls, d: dict) -> TrialPlan:
        return cls(**{**d, "rungs_s": tuple(d["rungs_s"])})


def plan_trials(budget: StudyBudget, *, elapsed_s: float, epoch_s: float, overhead_s: float) -> TrialPlan:
    """Each trial's budget and rungs so that ``target_trials`` fit what the search has.

    ``elapsed_s``: study time already spent (start-up, the throughput probe); ``epoch_s``: one trial
    epoch as measured; ``overhead_s``: a trial's cost beside its training. Raises
    :class:`BudgetError` when the first rung cannot hold one epoch (the study would compare trials
    on noise) or the refit leaves no search time.

    >>> b = StudyBudget(budget_s=6000, refit_s=2700, reserve_s=360, target_trials=12, rungs=3, reduction_factor=3)
    >>> p = plan_trials(b, elapsed_s=60, epoch_s=15, overhead_s=40)
    >>> round(p.search_s), round(p.trial_s), [round(r) for r in p.rungs_s], round(p.expected_trials)
    (2940, 521, [58, 174, 521], 12)
    """
    search_s = budget.budget_s - budget.refit_s - budget.reserve_s
    left = search_s - elapsed_s
    if left <= 0:
        raise BudgetError(f"tune.budget_minutes: {budget.budget_s / 60:g} min leaves no time for the search after the "
                          f"refit's {budget.refit_s / 60:g} min and the {budget.reserve_s / 60:g}-min reserve")
    fraction = expected_fraction(budget.target_trials, budget.rungs, budget.reduction_factor)
    per_trial = left * budget.workers / budget.target_trials
    trial_s = (per_trial - overhead_s) / fraction
    rungs_s = tuple(trial_s / budget.reduction_factor ** (budget.rungs - 1 - k) for k in range(budget.rungs))
    if rungs_s[0] < epoch_s:
        raise BudgetError(
            f"tune.budget_minutes: {budget.budget_s / 60:g} min gives {budget.target_trials} trials "
            f"{max(trial_s, 0) / 60:.1f} min each, a first rung of {max(rungs_s[0], 0):.0f} s, shorter than one "
            f"trial epoch on this machine ({epoch_s:.0f} s); give a larger tune.budget_minutes, fewer "
            "tune.target_trials, fewer tune.rungs or fewer tune.steps_per_epoch")
    last_start = search_s - rungs_s[0] - overhead_s
    return TrialPlan(trial_s, rungs_s, search_s, last_start, overhead_s, epoch_s, fraction, elapsed_s)


def refit_minutes(recipe_minutes: float | None, left_s: float, reserve_s: float) -> float | None:
    """The refit's training budget: the recipe's, or what the study still has if that is less.

    >>> refit_minutes(45, 3300, 360), refit_minutes(45, 2000, 360), refit_minutes(None, 99, 0)
    (45, 27.333333333333332, None)
    """
    if recipe_minutes is None:
        return None
    usable = (left_s - reserve_s) / 60
    if usable <= 0:
        raise BudgetError(f"tune.budget_minutes: no time left for the refit ({left_s / 60:.1f} min left, "
                          f"{reserve_s / 60:g}-min reserve)")
    return recipe_minutes if usable >= recipe_minutes else usable
