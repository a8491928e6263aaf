"""The training loop's Keras callbacks: validation Dice per patient, the best epoch's weights, the
learning-rate schedule a budget re-plans, the budget's stop, and the per-epoch checkpoint.

Pure compute (TensorFlow); :mod:`brainseg.training.train` puts them together, :mod:`brainseg.training.checkpoint`
stores what :class:`EpochCheckpoint` hands it.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401

import math
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from brainseg.data.arrays import Arrays
from brainseg.evaluation.metrics import slice_table, summarize
from brainseg.inference.segmenter import predict_probs
from brainseg.training.budget import BudgetError, BudgetPlan

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


class BudgetStop(keras.callbacks.Callback):
    """Feeds a :class:`~brainseg.training.budget.BudgetPlan` with measured step and validation times, keeps the
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


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: the epoch's logs join ``history`` and ``save(epochs done, history)`` writes the
    checkpoint. Put it after the callbacks that decide on an epoch (best weights, budget, early stop)
    and before those that report it, so that what is reported was saved first."""

    def __init__(self, save, history: dict):
        super().__init__()
        self.save, self.history = save, history

    def on_epoch_end(self, epoch, logs=None):
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(float(v))
        self.save(epoch + 1, self.history)


class RestoreCounters(keras.callbacks.Callback):
    """A resumed run's early-stopping and plateau counters: put back once, after those callbacks'
    ``on_train_begin`` (which resets them), so patience counts across the interruption."""

    def __init__(self, callbacks: dict, counters: dict):
        super().__init__()
        self.pending = {name: (cb, counters.get(name, {})) for name, (cb, _) in callbacks.items() if cb is not None}

    def on_train_begin(self, logs=None):
        for cb, values in self.pending.values():
            for attr, value in values.items():
                setattr(cb, attr, value)
        self.pending = {}
