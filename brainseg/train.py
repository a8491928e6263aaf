"""Training: Keras fit with per-patient validation Dice, early stopping, LR schedule, best restore.

Pure compute: MLflow and Optuna hook in through the ``callbacks`` argument.
"""

from __future__ import annotations

import dataclasses
import math
import time

import brainseg.keras_env  # noqa: F401
import numpy as np
import tensorflow as tf
import tf_keras as keras

from brainseg.budget import BudgetError, BudgetPlan, Phase
from brainseg.config import TrainConfig
from brainseg.data.arrays import Arrays
from brainseg.data.pipeline import area_weights, train_dataset
from brainseg.inference import predict_probs
from brainseg.metrics import summarize, slice_table
from brainseg.models.factory import SM_ARCHS, build_model, set_encoder_trainable
from brainseg.models.losses import make_loss, make_metrics

MONITOR = "val_patient_dice"


class PatientDice(keras.callbacks.Callback):
    """Validation in one prediction pass per epoch.

    Adds ``val_loss`` (the training loss on the validation slices), ``val_dice`` / ``val_iou``
    (pixel-level over all validation slices) and ``val_patient_dice`` / ``val_patient_iou``
    (mean per-patient volume scores at network size, the model-selection objective).
    """

    def __init__(self, val: Arrays, threshold: float, batch_size: int, loss_fn):
        super().__init__()
        self.val, self.threshold, self.batch_size, self.loss_fn = val, threshold, batch_size, loss_fn
        self.truths = np.asarray(val.Y)[..., 0] > 0

    def on_epoch_end(self, epoch, logs=None):
        probs = predict_probs(self.model, self.val.X, self.batch_size)
        losses = [float(self.loss_fn(tf.constant(self.truths[i:i + 64, ..., None], tf.float32),
                                     tf.constant(probs[i:i + 64, ..., None])))
                  * len(probs[i:i + 64]) for i in range(0, len(probs), 64)]
        preds = probs > self.threshold
        s = summarize(slice_table(self.val.patients, list(preds), list(self.truths)))
        if logs is not None:
            logs["val_loss"] = sum(losses) / max(len(probs), 1)
            logs["val_dice"] = s["global_dice"]
            logs["val_iou"] = s["global_iou"]
            logs[MONITOR] = s["patient_dice_mean"]
            logs["val_patient_iou"] = s["patient_iou_mean"]
            logs["val_empty_slice_fp_rate"] = s["empty_slice_fp_rate"]


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the best epoch by ``monitor``; :meth:`restore` puts them back.

    Restoring is the caller's step after the last phase (a run in several ``fit`` calls, as with
    a frozen encoder or progressive resizing, must not jump back at the end of each).
    """

    def __init__(self, monitor: str = MONITOR):
        super().__init__()
        self.monitor, self.best, self.best_epoch, self.weights = monitor, -math.inf, -1, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and not math.isnan(value) and value > self.best:
            self.best, self.best_epoch, self.weights = float(value), epoch, self.model.get_weights()

    def restore(self, model: keras.Model) -> None:
        if self.weights is not None:
            model.set_weights(self.weights)


@dataclasses.dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int  # 0-based
    best_value: float  # best val_patient_dice
    epochs_run: int
    budget: dict = dataclasses.field(default_factory=dict)  # budget.* figures of a budgeted run


class PlannedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from lr/10, then cosine decay to lr/100 or linear decay to 0 at ``total_steps``.

    ``total_steps`` is a variable: a budgeted run re-plans it from the measured throughput, so the
    decay ends at the last planned step whatever the machine (:meth:`set_total`).
    """

    def __init__(self, lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "cosine"):
        super().__init__()
        self.lr, self.warmup, self.kind = float(lr), int(warmup_steps), kind
        self.final = self.lr / 100 if kind == "cosine" else 0.0
        self.total = tf.Variable(float(max(total_steps, 1)), trainable=False, dtype=tf.float32)

    def set_total(self, steps: int) -> None:
        self.total.assign(float(max(steps, self.warmup + 1, 1)))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = float(max(self.warmup, 1))
        warmup_lr = self.lr / 10 + (self.lr - self.lr / 10) * step / warm
        t = tf.clip_by_value((step - self.warmup) / tf.maximum(self.total - self.warmup, 1.0), 0.0, 1.0)
        if self.kind == "cosine":
            decayed = self.final + (self.lr - self.final) * 0.5 * (1.0 + tf.cos(math.pi * t))
        else:
            decayed = self.lr + (self.final - self.lr) * t
        return tf.where(step < self.warmup, warmup_lr, decayed)

    def get_config(self):
        return {"lr": self.lr, "total_steps": int(self.total.numpy()), "warmup_steps": self.warmup, "kind": self.kind}


def learning_rate(cfg: TrainConfig, steps: int, lr: float | None = None):
    """The optimizer's learning rate: a constant (``plateau``: ReduceLROnPlateau adjusts it) or a
    :class:`PlannedSchedule` (``cosine`` / ``linear``) over ``epochs`` x ``steps`` (re-planned by a budget)."""
    lr = cfg.lr if lr is None else lr
    if cfg.lr_schedule == "plateau":
        return lr
    warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)) * steps
    return PlannedSchedule(lr, cfg.epochs * steps, warmup, cfg.lr_schedule)


def _compile(model: keras.Model, cfg: TrainConfig, lr) -> None:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=make_loss(cfg.loss, cfg.tversky_alpha, cfg.tversky_beta),
                  metrics=make_metrics(cfg.threshold))


class BudgetStop(keras.callbacks.Callback):
    """Feeds a :class:`~brainseg.budget.BudgetPlan` with measured step and validation times, keeps the
    learning-rate schedule's end at the planned last step and stops each phase when its epochs are done.

    The first ``probe`` steps of a phase give its first plan; every epoch re-plans; a run that
    would still overrun (a machine slowing down) stops at the budget mid-epoch. Put it after the
    validation callback, so an epoch's time includes its validation.
    """

    def __init__(self, plan: BudgetPlan, schedule, t0: float, clock=time.monotonic, probe: int = 5):
        super().__init__()
        self.plan, self.schedule, self.t0, self.clock, self.probe = plan, schedule, t0, clock, probe
        self.phase, self.last_end, self.ends = 0, None, []

    def _apply(self, logs=None):
        if isinstance(self.schedule, PlannedSchedule) and self.plan.total_steps:
            self.schedule.set_total(self.plan.total_steps)
        if logs is not None:
            logs.update({"plan_total_steps": float(self.plan.total_steps),
                         "plan_epochs": float(self.plan.planned_epochs),
                         "elapsed_min": self.plan.elapsed_s / 60})

    def _check(self):
        """An unreachable budget is an error before any epoch ends; after that the run keeps its work
        (a phase that no longer fits ends the run instead)."""
        if not any(q.epochs_done for q in self.plan.phases):
            self.plan.check_reachable()

    def on_epoch_begin(self, epoch, logs=None):
        self.ends = []
        if self.last_end is None:  # a phase's first epoch; later ones count from the previous end
            self.last_end = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        # this step began at the previous step's end (the epoch's start for its first step, at the
        # latest; no clock reading of its own)
        began = self.ends[-1] if self.ends else self.last_end
        self.plan.last_step_start_s = (began if began is not None else now) - self.t0
        self.ends.append(now)
        p = self.plan.phases[self.phase]
        if p.step_s is None and len(self.ends) == self.probe + 1:
            p.step_s = (self.ends[-1] - self.ends[0]) / self.probe
            self.plan.elapsed_s = now - self.t0
            self.plan.replan()
            self._check()
            self._apply()
            if p.planned_epochs < 1:  # a later phase that no longer fits: the run ends here
                self.model.stop_training = True
        if now - self.t0 >= self.plan.budget_s:
            if not any(q.epochs_done for q in self.plan.phases):  # not one epoch: nothing worth keeping
                raise BudgetError(
                    f"budget: {self.plan.budget_s / 60:.2f} min cannot hold one epoch at {p.size} px on this machine "
                    f"(it ran out after {len(self.ends)} of {p.steps} steps, model building included); "
                    "give a larger train.budget_minutes or fewer train.steps_per_epoch")
            self.plan.stopped_at_budget = len(self.ends) < p.steps
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        # the whole epoch, from the previous epoch's end (other callbacks' logging included): its
        # steps at the steady step time, and the rest (validation, the first step's warm-up) as fixed
        now, ends, steps = self.clock(), self.ends, len(self.ends)
        total = now - self.last_end
        train_s = (ends[-1] - ends[0]) * steps / (steps - 1) if steps > 1 else total
        self.last_end = now
        self.plan.observe(self.phase, train_s=min(train_s, total), val_s=max(total - train_s, 0.0),
                          steps=max(steps, 1), elapsed_s=now - self.t0)
        self._check()
        self._apply(logs)
        if self.plan.phase_done(self.phase) or now - self.t0 >= self.plan.budget_s:
            self.model.stop_training = True


def phases(cfg: TrainConfig, steps: int) -> list[Phase]:
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


def _epoch_phases(cfg: TrainConfig, plan: list[Phase]) -> list[int]:
    """Epochs per phase without a budget: ``progressive_share`` of ``epochs`` at the low size."""
    if len(plan) == 1:
        return [cfg.epochs]
    low = min(max(round(cfg.epochs * cfg.progressive_share), 1), max(cfg.epochs - 1, 1))
    return [low, max(cfg.epochs - low, 0)]


def train(cfg: TrainConfig, train_arrays: Arrays, val_arrays: Arrays, *, callbacks: list | None = None,
          verbose: int = 1, clock=time.monotonic) -> TrainResult:
    """Fit a model from ``cfg`` on ``train_arrays``; select and restore the best epoch on ``val_arrays``.

    ``callbacks`` (tracking, pruning) see the per-epoch logs, ``val_patient_dice`` included. With
    ``budget_minutes`` the run plans its epochs from measured throughput (:class:`BudgetStop`) and
    ends within the budget (``epochs`` is then not used). With ``progressive_size`` the first
    phase trains at that size (the network is fully convolutional; the returned model has the
    fixed input size of ``size``, with the same weights).
    """
    t0 = clock()
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
    weights = None
    if cfg.sampling == "area":
        weights = area_weights(np.asarray(train_arrays.Y).reshape(n, -1).sum(axis=1), cfg.uniform_share)
    datasets = {p.size: train_dataset(train_arrays.X, train_arrays.Y, batch_size=min(cfg.batch_size, n),
                                      tumor_fraction=cfg.tumor_fraction, augment=cfg.augment, seed=cfg.seed,
                                      weights=weights, out_size=None if p.size == cfg.size else p.size)
                for p in plan_phases}
    best = BestWeights()
    early = keras.callbacks.EarlyStopping(MONITOR, mode="max", patience=cfg.patience)
    plan = BudgetPlan(cfg.budget_minutes * 60, plan_phases) if cfg.budget_minutes else None
    budget = BudgetStop(plan, schedule, t0, clock) if plan else None
    # a budget is the stopping rule: its schedule decays to the planned last step, so no early stop
    cbs = [PatientDice(val_arrays, cfg.threshold, 32, model.loss), best, budget if budget else early]
    if cfg.lr_schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(MONITOR, mode="max", factor=0.5, patience=cfg.lr_patience,
                                                     min_lr=cfg.lr / 64))
    cbs += list(callbacks or [])
    history: dict[str, list[float]] = {}

    def fit(ds, start: int, end: int, steps_per_epoch: int) -> int:
        h = model.fit(ds, steps_per_epoch=steps_per_epoch, epochs=end, initial_epoch=start, callbacks=cbs,
                      verbose=verbose)
        for k, v in h.history.items():
            history.setdefault(k, []).extend(float(x) for x in v)
        return start + len(h.history.get("loss", []))

    epoch = 0
    if plan is not None:
        for i, p in enumerate(plan_phases):
            # a later phase starts while time is left, even when the guess of its cost (the pixel
            # ratio) says no epoch fits: its own first steps decide (BudgetStop's probe)
            if i > 0 and clock() - t0 >= plan.budget_s:
                break
            budget.phase, budget.last_end, plan.current = i, None, i
            epoch = fit(datasets[p.size], epoch, epoch + 1_000_000, p.steps)
    else:
        frozen = min(cfg.freeze_encoder_epochs, cfg.epochs) if cfg.arch in SM_ARCHS else 0
        if frozen:
            epoch = fit(datasets[cfg.size], 0, frozen, steps)
            set_encoder_trainable(model, True)  # unfreeze and recompile (keeps weights)
            lr_now = float(keras.backend.get_value(model.optimizer.learning_rate)) \
                if cfg.lr_schedule == "plateau" else learning_rate(cfg, steps)
            _compile(model, cfg, lr_now)
        for p, n_epochs in zip(plan_phases, _epoch_phases(cfg, plan_phases)):
            if early.stopped_epoch > 0 or n_epochs <= 0 or epoch >= cfg.epochs:
                continue
            end = cfg.epochs if p is plan_phases[-1] else epoch + n_epochs
            epoch = fit(datasets[p.size], epoch, end, p.steps)
    best.restore(model)
    if len(plan_phases) > 1:  # the served network: fixed input size, the trained weights
        fixed = build_model(cfg)
        fixed.set_weights(model.get_weights())
        fixed.compile(loss=model.loss)
        model = fixed
    epochs_run = len(history.get("loss", []))
    return TrainResult(model, history, best.best_epoch, best.best, epochs_run,
                       budget_figures(cfg, plan, plan_phases, history, clock() - t0))


def budget_figures(cfg: TrainConfig, plan: BudgetPlan | None, plan_phases: list[Phase], history: dict,
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
