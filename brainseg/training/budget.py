"""Training on a wall-clock budget: plan the steps from measured throughput, re-plan as it drifts.

Pure arithmetic (no TensorFlow): :class:`BudgetPlan` turns a budget in seconds, the time already
spent and the measured cost of a step and of a validation pass into a number of epochs per phase
(a phase is a training resolution: progressive resizing trains most steps at a low size, the last
ones at the network size). The Keras side (``brainseg.training.train``) feeds it measurements after every
epoch and stops each phase when its planned epochs are done; the learning-rate schedule spans the
planned total, so warm-up and decay fit whatever machine the run lands on (as Ultralytics' ``time=``
overrides ``epochs``).
"""

from __future__ import annotations

import dataclasses
import math
import re

_UNITS = {"s": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0}


class BudgetError(ValueError):
    """A budget that cannot be met on this machine (or cannot be read)."""


def parse_budget(text: str | float | int | None) -> float | None:
    """``"45m"``, ``"1.5h"``, ``"90s"`` or a number of minutes -> minutes (None stays None).

    >>> parse_budget("45m"), parse_budget("1.5h"), parse_budget("90s"), parse_budget(12)
    (45.0, 90.0, 1.5, 12.0)
    """
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        minutes = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
        if not match:
            raise BudgetError(f"budget: {text!r} is not a duration such as 45m, 1.5h or 90s")
        minutes = float(match.group(1)) * _UNITS[match.group(2) or "m"]
    if not minutes > 0 or math.isinf(minutes):
        raise BudgetError(f"budget: {text!r} must be a positive duration")
    return minutes


def _cautious(old: float | None, new: float) -> float:
    return new if old is None or new >= old else 0.5 * old + 0.5 * new


@dataclasses.dataclass
class Phase:
    """One resolution of a budgeted run: its share of the training time and what was measured."""

    size: int
    share: float  # fraction of the budget's training time spent at this size
    steps: int  # training steps per epoch at this size
    step_s: float | None = None  # measured seconds per training step (median of recent epochs)
    val_s: float | None = None  # measured seconds per validation pass
    epochs_done: int = 0
    steps_done: int = 0  # training steps run (an epoch stopped at the budget counts its steps only)
    seconds_done: float = 0.0
    planned_epochs: int = 0


@dataclasses.dataclass
class BudgetPlan:
    """Epochs per phase that fit ``budget_s`` seconds of training, re-planned from measurements.

    Validation runs after every epoch and counts against the budget. The plan of a phase not yet
    started assumes its step costs the measured step of the phase before scaled by the pixel ratio
    (a conservative guess for convolutional networks), replaced by its own measurement once it runs.

    >>> plan = BudgetPlan(budget_s=100, phases=[Phase(64, 0.5, 10), Phase(128, 0.5, 10)])
    >>> plan.observe(0, train_s=2.0, val_s=0.5, steps=10, elapsed_s=2.5)   # 0.2 s a step at 64 px
    >>> [p.planned_epochs for p in plan.phases], plan.total_steps   # 128 px guessed at 4 x 0.2 s a step
    ([20, 5], 250)
    """

    budget_s: float
    phases: list[Phase]
    elapsed_s: float = 0.0
    current: int = 0  # the phase running now (earlier phases are done)
    replans: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    last_step_start_s: float = 0.0  # when the run's last training step began (seconds from its start)
    stopped_at_budget: bool = False  # the budget ran out mid-epoch (a machine slower than planned)

    def __post_init__(self):
        total = sum(p.share for p in self.phases)
        if not self.phases or not math.isclose(total, 1.0, abs_tol=1e-6):
            raise BudgetError(f"budget: phase shares must sum to 1 (got {total:g})")

    def _step_s(self, i: int) -> float | None:
        if self.phases[i].step_s is not None:
            return self.phases[i].step_s
        for j in range(i - 1, -1, -1):  # scale the nearest measured phase by the pixel ratio
            if self.phases[j].step_s is not None:
                return self.phases[j].step_s * (self.phases[i].size / self.phases[j].size) ** 2
        return None

    def _val_s(self, i: int) -> float:
        known = [p.val_s for p in self.phases if p.val_s is not None]
        return known[-1] if known else 0.0

    def epoch_s(self, i: int) -> float | None:
        step = self._step_s(i)
        return None if step is None else step * self.phases[i].steps + self._val_s(i)

    def observe(self, phase: int, *, train_s: float, val_s: float, steps: int, elapsed_s: float) -> None:
        """Record one finished epoch of ``phase`` (its training and validation seconds) and re-plan."""
        self.current = phase
        p = self.phases[phase]
        p.epochs_done += 1
        p.steps_done += steps
        p.seconds_done += train_s + val_s
        step = train_s / max(steps, 1)
        # a cautious cost: it follows a slower epoch at once and a faster one halfway, so noise
        # makes the plan end a little early rather than overrun the budget
        p.step_s = _cautious(p.step_s, step)
        p.val_s = _cautious(p.val_s, val_s)
        self.elapsed_s = elapsed_s
        self.replan()
        self.history.append({"phase": phase, "epoch": sum(q.epochs_done for q in self.phases),
                             "step_s": step, "val_s": val_s, "elapsed_s": elapsed_s,
                             "planned_total_steps": self.total_steps})

    def replan(self) -> None:
        """Spread what is left of the budget over the phases by their shares; done phases keep their count."""
        before = self.total_steps
        left = max(self.budget_s - self.elapsed_s, 0.0)
        current = self.current
        # time each unfinished phase may still use: its share of the whole budget minus what it spent,
        # rescaled so the unfinished phases together use exactly what is left
        wants = [max(p.share * self.budget_s - p.seconds_done, 0.0) if i >= current else 0.0
                 for i, p in enumerate(self.phases)]
        scale = left / sum(wants) if sum(wants) > 0 else 0.0
        for i, p in enumerate(self.phases):
            if i < current:
                p.planned_epochs = p.epochs_done
                continue
            cost = self.epoch_s(i)
            if cost is None:
                continue
            more = int(wants[i] * scale // cost)
            p.planned_epochs = p.epochs_done + more
        if before and self.total_steps != before:
            self.replans += 1

    def phase_done(self, phase: int) -> bool:
        p = self.phases[phase]
        return p.step_s is not None and p.epochs_done >= p.planned_epochs

    @property
    def planned_epochs(self) -> int:
        return sum(p.planned_epochs for p in self.phases)

    @property
    def steps_done(self) -> int:
        return sum(p.steps_done for p in self.phases)

    @property
    def total_steps(self) -> int:
        return sum(p.planned_epochs * p.steps for p in self.phases)

    def check_reachable(self) -> None:
        """Raise :class:`BudgetError` when not one epoch of each phase fits the budget."""
        short = [p for p in self.phases if p.step_s is not None and p.planned_epochs < 1]
        if short:
            p = short[0]
            raise BudgetError(
                f"budget: {self.budget_s / 60:.2f} min cannot hold one epoch at {p.size} px on this machine "
                f"({p.steps} steps x {p.step_s:.2f} s + {p.val_s or 0:.1f} s validation); "
                "give a larger train.budget_minutes or fewer train.steps_per_epoch")

    def summary(self) -> dict:
        """What MLflow logs about the plan (``budget.*``)."""
        out = {"budget.planned_epochs": self.planned_epochs,
               "budget.planned_steps": self.total_steps, "budget.replans": self.replans,
               "budget.stopped_at_budget": int(self.stopped_at_budget),
               "budget.last_step_start_s": self.last_step_start_s}
        for p in self.phases:
            out[f"budget.epochs_at_{p.size}px"] = p.epochs_done
            out[f"budget.steps_per_epoch_at_{p.size}px"] = p.steps
            if p.step_s is not None:
                out[f"budget.step_s_at_{p.size}px"] = p.step_s
        return out
