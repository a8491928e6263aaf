"""Training: Keras fit with per-patient validation Dice, early stopping, LR schedule, best restore.

Pure compute: MLflow and Optuna hook in through the ``callbacks`` argument.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401

import dataclasses
import math
import time

import numpy as np
import tf_keras as keras

from brainseg.data.arrays import Arrays
from brainseg.data.pipeline import area_weights, train_dataset
from brainseg.models.factory import SM_ARCHS, build_model, set_encoder_trainable
from brainseg.models.losses import make_loss, make_metrics
from brainseg.settings.config import Train
from brainseg.training.budget import BudgetPlan, Phase
from brainseg.training.checkpoint import Checkpoint, CheckpointError
from brainseg.training.train_callbacks import (
    MONITOR,
    BestWeights,
    BudgetStop,
    EpochCheckpoint,
    PatientDice,
    PlannedSchedule,
    RestoreCounters,
)


@dataclasses.dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int  # 0-based
    best_value: float  # best val_patient_dice
    epochs_run: int
    budget: dict = dataclasses.field(default_factory=dict)  # budget.* figures of a budgeted run


def learning_rate(cfg: Train, steps: int, lr: float | None = None):
    """The optimizer's learning rate: a constant (``plateau``: ReduceLROnPlateau adjusts it) or a
    :class:`PlannedSchedule` (``cosine`` / ``linear``) over ``epochs`` x ``steps`` (re-planned by a budget)."""
    lr = cfg.lr if lr is None else lr
    if cfg.lr_schedule == "plateau":
        return lr
    warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)) * steps
    return PlannedSchedule(lr, cfg.epochs * steps, warmup, cfg.lr_schedule)


def _compile(model: keras.Model, cfg: Train, lr) -> None:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=make_loss(cfg.loss, cfg.tversky_alpha, cfg.tversky_beta),
                  metrics=make_metrics(cfg.threshold))


def phases(cfg: Train, steps: int) -> list[Phase]:
    """The run's resolutions: ``progressive_size`` for ``progressive_share`` of the time (or of the
    epochs without a budget), then ``size``. A low-size epoch has ``size / progressive_size`` times
    the steps: a step there costs about a third to a half (measured at 64 against 128 px), so its
    epochs cost about the same and the budget keeps a fine grain."""
    if cfg.progressive_size is None:
        return [Phase(int(cfg.size), 1.0, steps)]
    low = int(cfg.progressive_size)
    low_steps = max(1, round(steps * cfg.size / low))
    share = float(cfg.progressive_share)
    return [Phase(low, share, low_steps), Phase(int(cfg.size), 1.0 - share, steps)]


def _epoch_phases(cfg: Train, plan: list[Phase]) -> list[int]:
    """Epochs per phase without a budget: ``progressive_share`` of ``epochs`` at the low size."""
    if len(plan) == 1:
        return [cfg.epochs]
    low = min(max(round(cfg.epochs * cfg.progressive_share), 1), max(cfg.epochs - 1, 1))
    return [low, max(cfg.epochs - low, 0)]


def _segments(cfg: Train, plan_phases: list[Phase], steps: int, frozen: int) -> list[tuple]:
    """The ``fit`` calls of a run without a budget: (size, first epoch, end epoch, steps per epoch,
    after the frozen-encoder epochs), so that a resumed run finds where it was."""
    segments, e = ([(cfg.size, 0, frozen, steps, False)], frozen) if frozen else ([], 0)
    for p, n in zip(plan_phases, _epoch_phases(cfg, plan_phases)):
        if n <= 0 or e >= cfg.epochs:
            continue
        end = cfg.epochs if p is plan_phases[-1] else e + n
        segments.append((p.size, e, end, p.steps, True))
        e = end
    return segments


def train(cfg: Train, train_arrays: Arrays, val_arrays: Arrays, *, callbacks: list | None = None,
          verbose: int = 1, clock=time.monotonic, checkpoint: Checkpoint | None = None,
          resume: dict | None = None) -> TrainResult:
    """Fit a model from ``cfg`` on ``train_arrays``; select and restore the best epoch on ``val_arrays``
    (``choose_epoch: last``: keep the last epoch; ``val_arrays`` are then only watched, never used to choose).

    ``callbacks`` (tracking, pruning) see the per-epoch logs, ``val_patient_dice`` included. With
    ``budget_minutes`` the run plans its epochs from measured throughput (:class:`BudgetStop`) and
    ends within the budget (``epochs`` is then not used). With ``progressive_size`` the first
    phase trains at that size (the network is fully convolutional; the returned model has the
    fixed input size of ``size``, with the same weights). With ``checkpoint`` every epoch is saved
    there before ``callbacks`` report it; ``resume`` (a checkpoint's state) continues that run after
    its last saved epoch with the same weights, optimizer, schedule, budget spent and counters (the
    data order from there differs from an uninterrupted run's).
    """
    state = resume or {}
    t0 = clock() - float(state.get("elapsed_s", 0.0))  # a resumed run's budget counts its saved epochs
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    n = len(train_arrays.X)
    if n == 0 or len(val_arrays.X) == 0:
        raise ValueError("train: the training and validation subsets must both have slices")
    steps = cfg.steps_per_epoch or max(1, math.ceil(n / cfg.batch_size))
    plan_phases = phases(cfg, steps)
    model = build_model(cfg, variable_size=len(plan_phases) > 1)
    schedule = learning_rate(cfg, steps)
    if isinstance(schedule, PlannedSchedule) and len(plan_phases) > 1 and cfg.budget_minutes is None:
        epochs = _epoch_phases(cfg, plan_phases)
        schedule.set_total(sum(e * p.steps for e, p in zip(epochs, plan_phases)))
    _compile(model, cfg, schedule)
    frozen = min(cfg.freeze_encoder_epochs, cfg.epochs) if cfg.arch in SM_ARCHS and not cfg.budget_minutes else 0
    status = {"unfrozen": not frozen}

    def unfreeze():  # unfreeze and recompile (keeps weights; a new optimizer, as the run always did)
        set_encoder_trainable(model, True)
        lr_now = float(keras.backend.get_value(model.optimizer.learning_rate)) \
            if cfg.lr_schedule == "plateau" else learning_rate(cfg, steps)
        _compile(model, cfg, lr_now)
        status["unfrozen"] = True

    weights = None
    if cfg.sampling == "area":
        weights = area_weights(np.asarray(train_arrays.Y).reshape(n, -1).sum(axis=1), cfg.uniform_share)
    epoch = int(state.get("epoch", 0))
    datasets = {p.size: train_dataset(train_arrays.X, train_arrays.Y, batch_size=min(cfg.batch_size, n),
                                      tumor_fraction=cfg.tumor_fraction, augment=cfg.augment, seed=cfg.seed + epoch,
                                      weights=weights, out_size=None if p.size == cfg.size else p.size)
                for p in plan_phases}
    best = BestWeights()
    early = keras.callbacks.EarlyStopping(MONITOR, mode="max", patience=cfg.patience)
    plan = BudgetPlan(cfg.budget_minutes * 60, plan_phases) if cfg.budget_minutes else None
    budget = BudgetStop(plan, schedule, t0, clock) if plan else None
    # choose_epoch "last" (a cross-validation fold model): the validation patients steer nothing, so no
    # early stop and no plateau LR (a plateau schedule then keeps its LR constant); they are only watched
    last = cfg.choose_epoch == "last"
    plateau = keras.callbacks.ReduceLROnPlateau(MONITOR, mode="max", factor=0.5, patience=cfg.lr_patience,
                                                min_lr=cfg.lr / 64) if cfg.lr_schedule == "plateau" and not last \
        else None
    counted = {"early": (None if budget or last else early, ("wait", "best", "stopped_epoch")),
               "plateau": (plateau, ("wait", "best", "cooldown_counter"))}
    history: dict[str, list[float]] = {k: list(v) for k, v in state.get("history", {}).items()}
    if state:
        if state.get("unfrozen") and not status["unfrozen"]:
            unfreeze()
        restore_state(model, best, plan, schedule, checkpoint, state)
        if budget:
            budget.phase = int(state.get("phase") or 0)
    # a budget is the stopping rule: its schedule decays to the planned last step, so no early stop
    stop = [budget] if budget else [] if last else [early]
    cbs = [PatientDice(val_arrays, cfg.threshold, 32, model.loss), best, *stop]
    cbs += [plateau] if plateau else []
    cbs += [RestoreCounters(counted, state.get("counters", {}))] if state else []
    if checkpoint is not None:
        def save(done: int, hist: dict) -> None:
            checkpoint.save({"epoch": done, "history": hist, "elapsed_s": clock() - t0,
                             "phase": budget.phase if budget else None, "unfrozen": status["unfrozen"],
                             "counters": {k: {a: getattr(cb, a) for a in attrs} for k, (cb, attrs) in counted.items()
                                          if cb is not None},
                             **optimizer_state(model, schedule, best, plan)}, epoch_arrays(model, best))
        cbs.append(EpochCheckpoint(save, history))
    cbs += list(callbacks or [])

    def fit(ds, start: int, end: int, steps_per_epoch: int) -> int:
        h = model.fit(ds, steps_per_epoch=steps_per_epoch, epochs=end, initial_epoch=start, callbacks=cbs,
                      verbose=verbose)
        if checkpoint is None:  # else EpochCheckpoint keeps the history, epoch by epoch
            for k, v in h.history.items():
                history.setdefault(k, []).extend(float(x) for x in v)
        return start + len(h.history.get("loss", []))

    if plan is not None:
        first = int(state.get("phase") or 0)
        for i, p in enumerate(plan_phases):
            if i < first or (state and i == first and plan.phase_done(i)):
                continue  # done before the resume
            # a later phase starts while time is left, even when the guess of its cost (the pixel
            # ratio) says no epoch fits: its own first steps decide (BudgetStop's probe)
            if (i > 0 or state) and clock() - t0 >= plan.budget_s:
                break
            budget.phase, budget.last_end, plan.current = i, None, i
            epoch = fit(datasets[p.size], epoch, epoch + 1_000_000, p.steps)
    else:
        for size, start, end, n_steps, after_freeze in _segments(cfg, plan_phases, steps, frozen):
            if early.stopped_epoch > 0 or epoch >= end:
                continue
            if after_freeze and not status["unfrozen"]:
                unfreeze()
            epoch = fit(datasets[size], max(epoch, start), end, n_steps)
    if last:  # the last epoch is the model: record it as the chosen one
        n_done = len(history.get("loss", []))
        best.best_epoch = n_done - 1
        best.best = float(history.get(MONITOR, [math.nan])[-1]) if history.get(MONITOR) else math.nan
    else:
        best.restore(model)
    if len(plan_phases) > 1:  # the served network: fixed input size, the trained weights
        fixed = build_model(cfg)
        fixed.set_weights(model.get_weights())
        fixed.compile(loss=model.loss)
        model = fixed
    epochs_run = len(history.get("loss", []))
    return TrainResult(model, history, best.best_epoch, best.best, epochs_run,
                       budget_figures(cfg, plan, plan_phases, history, clock() - t0))


def epoch_arrays(model: keras.Model, best: BestWeights) -> dict[str, list[np.ndarray]]:
    """What a checkpoint stores as arrays: the weights, the optimizer's variables, the best epoch's weights."""
    return {"weights": model.get_weights(), "optimizer": [v.numpy() for v in model.optimizer.variables],
            "best": list(best.weights) if best.weights is not None else []}


def optimizer_state(model: keras.Model, schedule, best: BestWeights, plan: BudgetPlan | None) -> dict:
    """The JSON part of a checkpoint that the arrays do not hold: schedule, best epoch, budget plan."""
    planned = isinstance(schedule, PlannedSchedule)
    return {"schedule_total": float(schedule.total.numpy()) if planned else None,
            "lr": None if planned else float(keras.backend.get_value(model.optimizer.learning_rate)),
            "best": {"value": best.best, "epoch": best.best_epoch},
            "plan": dataclasses.asdict(plan) if plan is not None else None}


def restore_state(model: keras.Model, best: BestWeights, plan: BudgetPlan | None, schedule,
                  checkpoint: Checkpoint, state: dict) -> None:
    """Put a checkpoint's weights, optimizer variables, schedule, best epoch and plan back."""
    model.set_weights(checkpoint.arrays("weights", state))
    opt = model.optimizer
    opt.build(model.trainable_variables)
    saved = checkpoint.arrays("optimizer", state)
    if len(saved) != len(opt.variables):
        raise CheckpointError(f"{checkpoint.folder}: the optimizer state has {len(saved)} variables, "
                              f"this network's optimizer {len(opt.variables)} (another architecture?)")
    for variable, value in zip(opt.variables, saved):
        variable.assign(value)
    if state.get("schedule_total") is not None and isinstance(schedule, PlannedSchedule):
        schedule.set_total(int(state["schedule_total"]))
    if state.get("lr") is not None:
        opt.learning_rate.assign(state["lr"])
    best.best, best.best_epoch = float(state["best"]["value"]), int(state["best"]["epoch"])
    best.weights = checkpoint.arrays("best", state) or None
    if plan is not None and state.get("plan"):
        saved_plan = dict(state["plan"])
        saved_plan["phases"] = [Phase(**p) for p in saved_plan["phases"]]
        for key, value in saved_plan.items():
            setattr(plan, key, value)


def save_trained(checkpoint: Checkpoint, result: TrainResult) -> None:
    """The finished training (the restored network and its records) as the run's checkpoint, so
    that what comes after (choosing inference settings, logging) can be redone without training."""
    checkpoint.save({"epoch": result.epochs_run, "history": result.history, "trained": True,
                     "best": {"value": result.best_value, "epoch": result.best_epoch},
                     "budget_figures": result.budget}, {"trained": result.model.get_weights()})


def trained_result(cfg: Train, checkpoint: Checkpoint, state: dict) -> TrainResult:
    """The :class:`TrainResult` a checkpoint of a finished training holds (:func:`save_trained`)."""
    keras.backend.clear_session()
    model = build_model(cfg)
    model.set_weights(checkpoint.arrays("trained", state))
    model.compile(loss=make_loss(cfg.loss, cfg.tversky_alpha, cfg.tversky_beta))
    history = {k: list(v) for k, v in state["history"].items()}
    return TrainResult(model, history, int(state["best"]["epoch"]), float(state["best"]["value"]),
                       len(history.get("loss", [])), dict(state.get("budget_figures") or {}))


def budget_figures(cfg: Train, plan: BudgetPlan | None, plan_phases: list[Phase], history: dict,
                   seconds: float) -> dict:
    """What a run logs about its compute: steps and slices seen, slices/s, the plan (budgeted runs)."""
    epochs_run = len(history.get("loss", []))
    if plan is not None:
        actual_steps = plan.steps_done
    else:
        per_phase = [(min(e, max(epochs_run - sum(_epoch_phases(cfg, plan_phases)[:i]), 0)), p.steps)
                     for i, (p, e) in enumerate(zip(plan_phases, _epoch_phases(cfg, plan_phases)))]
        actual_steps = sum(e * s for e, s in per_phase)
    out = {"actual_steps": actual_steps, "slices_seen": actual_steps * cfg.batch_size,
           "train_minutes": seconds / 60, "slices_per_s": actual_steps * cfg.batch_size / max(seconds, 1e-9)}
    if plan is not None:
        out.update({k.replace(".", "_"): v for k, v in plan.summary().items()})
    return out
