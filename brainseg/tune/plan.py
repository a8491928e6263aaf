"""A study's plan: fidelity, pruner, storage, and every input checked before anything starts.

Multi-fidelity: trials train at the search fidelity (``tune.size`` px, ``tune.steps_per_epoch``
steps). Without a budget the resource is the epoch (at most ``tune.epochs``), reported to Optuna
after each epoch, so successive halving / Hyperband stop the weak trials at the rungs
``min_resource * reduction_factor**k``. On a budget (``tune.budget_minutes``,
:mod:`brainseg.tune.study_budget`) the resource is seconds of training of a time-budgeted trial. The
refit (:mod:`brainseg.tune.session`) trains the best configuration at full fidelity.
No MLflow here; the study's runs are :mod:`brainseg.tune.runs`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from brainseg.settings import quiet
from brainseg.settings.config import EPOCH_SIZED, Pruner, Settings, Train, Tune
from brainseg.settings.settings_io import ConfigError
from brainseg.tune.sampler import TrialSeededSampler
from brainseg.tune.space import Param, load_search_space, recipe_params
from brainseg.tune.study_budget import StudyBudget

PRUNERS = typing.get_args(Pruner)  # ("hyperband", "sha", "median", "none")
OBJECTIVE = "val_patient_dice"


# ------------------------------------------------------------------------------ fidelity
@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Search fidelity and the rung schedule (resource = epochs)."""

    size: int             # px of a trial's network input (low fidelity), e.g. 64
    steps_per_epoch: int | None
    min_resource: int     # epochs (seconds of training on a budget) before the first rung
    max_resource: int     # epochs of a trial that is never pruned (tune.epochs), or its budget in seconds
    reduction_factor: int
    unit: str = "epochs"  # "seconds": a trial trains on a time budget; the resource is seconds of training

    def rungs(self) -> list[int]:
        """Epochs at which successive halving compares trials.

        >>> Fidelity(64, 60, 2, 18, 3).rungs()
        [2, 6, 18]
        """
        out, r = [], self.min_resource
        while r <= self.max_resource:
            out.append(r)
            r *= self.reduction_factor
        return out

    def trial_settings(self, train: dict) -> dict:
        """``train`` settings at search fidelity. In epochs, the recipe's time budget and resolution
        schedule do not apply; in seconds, a trial is a budgeted run of ``max_resource`` seconds at
        one resolution (its learning-rate schedule spans that budget)."""
        if self.unit == "seconds":
            return {**train, "size": self.size, "steps_per_epoch": self.steps_per_epoch,
                    "budget_minutes": self.max_resource / 60, "progressive_size": None}
        return {**train, "size": self.size, "epochs": self.max_resource,
                "steps_per_epoch": self.steps_per_epoch, **EPOCH_SIZED}

    def on_budget(self, trial_s: float, first_rung_s: float) -> Fidelity:
        """This fidelity with the resource in seconds of training: trials of ``trial_s`` seconds,
        the first rung at ``first_rung_s`` (the planned rungs, :mod:`brainseg.tune.study_budget`).

        >>> Fidelity(64, 60, 2, 18, 3).on_budget(521.4, 57.9).rungs()
        [57, 171, 513]
        """
        return dataclasses.replace(self, min_resource=max(1, int(first_rung_s)), max_resource=int(trial_s),
                                   unit="seconds")


def fidelity_from(tune: Tune, train: Train) -> Fidelity:
    f = Fidelity(tune.size or train.size, tune.steps_per_epoch or train.steps_per_epoch,
                 tune.min_resource, tune.epochs, tune.reduction_factor)
    if f.max_resource < 1 or not 1 <= f.min_resource <= f.max_resource:
        raise ConfigError(f"tune.min_resource ({f.min_resource}) must be in 1..tune.epochs ({f.max_resource})")
    if f.reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor: {f.reduction_factor} must be >= 2")
    return f


def make_pruner(name: str, fid: Fidelity) -> optuna.pruners.BasePruner:
    """Pruner on the epoch resource. ``sha``: one successive-halving bracket; ``hyperband``:
    several brackets with different first rungs (more robust to ``min_resource``, costs more)."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=fid.min_resource, max_resource=fid.max_resource,
                                              reduction_factor=fid.reduction_factor)
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=fid.min_resource,
                                                      reduction_factor=fid.reduction_factor)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=fid.min_resource)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune.pruner: {name!r} is not one of {', '.join(PRUNERS)}")


def quiet_optuna() -> None:
    """Optuna's own INFO lines (study created, each trial's value and parameters) off unless
    ``--verbose``: the study's progress lines say the same. Optuna sets its logger to INFO when it
    loads, after :mod:`brainseg.settings.quiet` set the level."""
    if not quiet.verbose_requested():
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_storage(url: str, heartbeat: int = 60, on_stale=None):
    """An Optuna storage: SQLAlchemy URL (SQLite, PostgreSQL) or ``journal:PATH`` (journal file).

    Heartbeats let a restarted worker mark trials of a killed worker as FAIL.
    """
    if url.startswith("journal:"):
        return JournalStorage(JournalFileBackend(url.split(":", 1)[1]))
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    # pre-ping: a pooled connection that a database restart closed is replaced before use, so a
    # worker carries on after PostgreSQL comes back instead of failing its next query
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat,
                                      grace_period=2 * heartbeat, heartbeat_stale_trial_callback=on_stale)


def redact(url: str) -> str:
    """Storage URL without its password (for logs)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def resolve_storage(ref: str, environ: typing.Mapping[str, str] = os.environ) -> str:
    """The storage URL that ``ref`` names: ``env:VAR`` the value of environment variable VAR,
    ``file:PATH`` the first line of that file (not a comment), anything else itself. A URL holding
    a password then never sits on a command line (``ps`` shows those to every user) or in params.yaml.

    >>> resolve_storage("env:STUDY_DB", {"STUDY_DB": "postgresql://bob:pw@db/optuna"})
    'postgresql://bob:pw@db/optuna'
    >>> resolve_storage("sqlite:///optuna.db")
    'sqlite:///optuna.db'
    """
    kind, _, name = (ref or "").partition(":")
    if kind == "env":
        url = environ.get(name, "").strip()
        if not url:
            raise ConfigError(f"storage {ref}: the environment variable {name} is not set (or empty)")
        return url
    if kind == "file":
        path = Path(name).expanduser()
        try:
            lines = [ln.strip() for ln in path.read_text().splitlines()]
        except OSError as exc:
            raise ConfigError(f"storage {ref}: cannot read {path} ({exc.strerror or exc})") from exc
        url = next((ln for ln in lines if ln and not ln.startswith("#")), "")
        if not url:
            raise ConfigError(f"storage {ref}: {path} holds no storage URL")
        return url
    return ref


# ---------------------------------------------------------------------------------- plan
def study_budget(plan: StudyPlan, refit: bool) -> StudyBudget | None:
    """``tune.budget_minutes`` as a :class:`~brainseg.tune.study_budget.StudyBudget` (None: no budget).

    The refit trains with the recipe's ``train.budget_minutes``, so a budgeted study that refits
    needs one."""
    t = plan.tune
    if t.budget_minutes is None:
        return None
    recipe = plan.settings.train.budget_minutes
    if refit and recipe is None:
        raise ConfigError("tune.budget_minutes: the refit trains with the recipe's train.budget_minutes, which is "
                          "null; set train.budget_minutes or use --no-refit")
    return StudyBudget(float(t.budget_minutes) * 60, float(recipe) * 60 if refit else 0.0,
                       float(t.reserve_minutes) * 60 if refit else 0.0, t.target_trials, t.rungs,
                       t.reduction_factor, plan.workers)


@dataclasses.dataclass
class StudyPlan:
    settings: Settings
    study_name: str
    storage_url: str
    n_trials: int
    timeout: float
    space: list[Param]
    space_path: Path
    fidelity: Fidelity = None
    recipe: dict = dataclasses.field(default_factory=dict)
    workers: int = 1
    threads: int = 0          # TensorFlow threads per worker (0: TensorFlow decides)
    storage_ref: str = ""     # env:VAR or file:PATH when storage_url came from one: what a worker's --storage gets

    @property
    def tune(self) -> Tune:
        return self.settings.tune


def plan_from_settings(settings: Settings, study_name: str | None, storage: str | None,
                       n_trials: int | None, timeout: float | None) -> StudyPlan:
    """Resolve and check every tuning input before anything is created (bad input fails here)."""
    t = settings.tune
    if t.pruner not in PRUNERS:
        raise ConfigError(f"tune.pruner: {t.pruner!r} is not one of {', '.join(PRUNERS)}")
    space_path = Path(t.search_space)
    space = load_search_space(space_path)
    fid = fidelity_from(t, settings.train)
    base = fid.trial_settings(settings.train.model_dump())
    Train.from_dict(base)
    from brainseg.models.factory import check_names

    check_names(base["arch"], base["encoder"])
    recipe = recipe_params(settings.train.model_dump(), space, space_path) if t.enqueue_recipe else {}
    # on a budget the clock decides how many trials run; tune.n_trials (--n-trials) only caps them
    ref = storage or t.storage
    url = resolve_storage(ref)
    return StudyPlan(settings, study_name or t.study_name, url,
                     int(n_trials or t.n_trials), float(timeout or t.timeout), space, space_path,
                     fid, recipe, t.workers, t.threads, storage_ref=ref if url != ref else "")


def open_plan_study(plan: StudyPlan, worker: int = 0, storage=None) -> optuna.Study:
    """Create or load the study; a new (empty) study gets the hand-set recipe as its first trial.

    The sampler is a :class:`TrialSeededSampler` (seed per trial: study, trial number, ``worker``).
    """
    storage = storage if storage is not None else make_storage(plan.storage_url, int(plan.tune.heartbeat))
    study = optuna.create_study(study_name=plan.study_name, storage=storage, direction="maximize",
                                pruner=make_pruner(plan.tune.pruner, plan.fidelity), load_if_exists=True)
    n = len(study.get_trials(deepcopy=False))
    if n == 0 and plan.recipe:
        study.enqueue_trial(plan.recipe, user_attrs={"recipe": "hand-set"}, skip_if_exists=True)
    study.sampler = TrialSeededSampler(plan.tune.sampler_seed, plan.study_name, worker,
                                       plan.tune.n_startup_trials)
    return study


def refit_epochs(trial_epochs: int, trial_steps: int | None, refit_steps: int | None) -> int:
    """Epochs of the refit that see as many batches as the best trial did.

    >>> refit_epochs(18, 30, 60), refit_epochs(6, None, None)
    (9, 6)
    """
    if trial_steps and refit_steps:
        return max(1, math.ceil(trial_epochs * trial_steps / refit_steps))
    return max(1, int(trial_epochs))
