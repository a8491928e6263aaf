"""Training: Keras fit with per-patient validation Dice, early stopping, LR schedule, best restore.

Pure compute: MLflow and Optuna hook in through the ``callbacks`` argument.
"""

from __future__ import annotations

import dataclasses
import math

import brainseg.keras_env  # noqa: F401
import numpy as np
import tensorflow as tf
import tf_keras as keras

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
    """Keeps the weights of the best epoch by ``monitor`` and restores them when training ends."""

    def __init__(self, monitor: str = MONITOR):
        super().__init__()
        self.monitor, self.best, self.best_epoch, self.weights = monitor, -math.inf, -1, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and not math.isnan(value) and value > self.best:
            self.best, self.best_epoch, self.weights = float(value), epoch, self.model.get_weights()

    def on_train_end(self, logs=None):
        if self.weights is not None:
            self.model.set_weights(self.weights)


@dataclasses.dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int  # 0-based
    best_value: float  # best val_patient_dice
    epochs_run: int


def learning_rate(cfg: TrainConfig, steps: int, lr: float | None = None):
    """The optimizer's learning rate: a constant (``plateau``: ReduceLROnPlateau adjusts it) or a
    linear warm-up over ``warmup_epochs`` then cosine decay to lr/100 at the last epoch."""
    lr = cfg.lr if lr is None else lr
    if cfg.lr_schedule != "cosine":
        return lr
    warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)) * steps
    decay = max(cfg.epochs * steps - warmup, 1)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(lr / 10, decay, alpha=0.01, warmup_target=lr,
                                                      warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(lr, decay, alpha=0.01)


def _compile(model: keras.Model, cfg: TrainConfig, lr) -> None:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=make_loss(cfg.loss, cfg.tversky_alpha, cfg.tversky_beta),
                  metrics=make_metrics(cfg.threshold))


def train(cfg: TrainConfig, train_arrays: Arrays, val_arrays: Arrays, *, callbacks: list | None = None,
          verbose: int = 1) -> TrainResult:
    """Fit a model from ``cfg`` on ``train_arrays``; select and restore the best epoch on ``val_arrays``.

    ``callbacks`` (tracking, pruning) see the per-epoch logs, ``val_patient_dice`` included.
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    n = len(train_arrays.X)
    if n == 0 or len(val_arrays.X) == 0:
        raise ValueError("train: the training and validation subsets must both have slices")
    steps = cfg.steps_per_epoch or max(1, math.ceil(n / cfg.batch_size))
    model = build_model(cfg)
    _compile(model, cfg, learning_rate(cfg, steps))
    weights = None
    if cfg.sampling == "area":
        weights = area_weights(np.asarray(train_arrays.Y).reshape(n, -1).sum(axis=1), cfg.uniform_share)
    ds = train_dataset(train_arrays.X, train_arrays.Y, batch_size=min(cfg.batch_size, n),
                       tumor_fraction=cfg.tumor_fraction, augment=cfg.augment, seed=cfg.seed,
                       weights=weights)
    best = BestWeights()
    cbs = [PatientDice(val_arrays, cfg.threshold, 32, model.loss), best,
           keras.callbacks.EarlyStopping(MONITOR, mode="max", patience=cfg.patience)]
    if cfg.lr_schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(MONITOR, mode="max", factor=0.5, patience=cfg.lr_patience,
                                                     min_lr=cfg.lr / 64))
    cbs += list(callbacks or [])
    history: dict[str, list[float]] = {}
    frozen = min(cfg.freeze_encoder_epochs, cfg.epochs) if cfg.arch in SM_ARCHS else 0
    phases = [(0, frozen), (frozen, cfg.epochs)] if frozen else [(0, cfg.epochs)]
    stopped = False
    for start, end in phases:
        if start > 0:  # unfreeze the encoder and recompile (keeps weights)
            set_encoder_trainable(model, True)
            lr_now = float(keras.backend.get_value(model.optimizer.learning_rate)) \
                if cfg.lr_schedule == "plateau" else learning_rate(cfg, steps)
            _compile(model, cfg, lr_now)
        if end <= start or stopped:
            continue
        h = model.fit(ds, steps_per_epoch=steps, epochs=end, initial_epoch=start, callbacks=cbs, verbose=verbose)
        for k, v in h.history.items():
            history.setdefault(k, []).extend(float(x) for x in v)
        stopped = bool(model.stop_training)
    epochs_run = len(history.get("loss", []))
    return TrainResult(model, history, best.best_epoch, best.best, epochs_run)
