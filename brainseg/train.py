"""Training: Keras fit with per-patient validation Dice, early stopping, LR schedule, best restore.

Pure compute: MLflow and Optuna hook in through the ``callbacks`` argument.
"""

from __future__ import annotations

import dataclasses
import json
import math
import weakref
from pathlib import Path

import brainseg.keras_env  # noqa: F401
import numpy as np
import pandas as pd
import tensorflow as tf
import tf_keras as keras

from brainseg.config import TrainConfig
from brainseg.data.arrays import load_arrays
from brainseg.data.pipeline import train_dataset
from brainseg.metrics import summarize, slice_table
from brainseg.models.factory import SM_ARCHS, build_model, set_encoder_trainable
from brainseg.models.losses import make_loss, make_metrics

MODEL_FILE = "model.h5"
SETTINGS_FILE = "brainseg.json"
MONITOR = "val_patient_dice"


@dataclasses.dataclass
class Arrays:
    """Network-size arrays of one subset with the patient of each slice."""

    X: np.ndarray
    Y: np.ndarray
    patients: list[str]

    @classmethod
    def load(cls, manifest: pd.DataFrame, cfg: TrainConfig, cache_dir: Path | None, version: str) -> "Arrays":
        X, Y = load_arrays(manifest, cfg.prep, cache_dir=cache_dir, version=version)
        return cls(X, Y, manifest["patient"].tolist())


_PREDICT_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_forward(model: keras.Model):
    """One traced ``tf.function`` per model (inference mode), reused across calls."""
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
        fn = _PREDICT_FNS[model] = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    return fn


def predict_probs(model: keras.Model, X: np.ndarray, batch_size: int = 32, tta: bool = False) -> np.ndarray:
    """(N, S, S, C) inputs -> (N, S, S) float32 probabilities (mean with the flipped input if ``tta``)."""
    fn = compiled_forward(model)
    out = []
    for i in range(0, len(X), batch_size):
        x = tf.convert_to_tensor(np.asarray(X[i:i + batch_size], np.float32))
        p = fn(x)
        if tta:
            p = (p + fn(x[:, :, ::-1])[:, :, ::-1]) / 2
        out.append(p.numpy()[..., 0])
    return np.concatenate(out) if out else np.zeros((0,) + tuple(X.shape[1:3]), np.float32)


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


def _compile(model: keras.Model, cfg: TrainConfig, lr: float) -> None:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=make_loss(cfg.loss, cfg.tversky_alpha, cfg.tversky_beta),
                  metrics=make_metrics(cfg.threshold))


def train(cfg: TrainConfig, train_arrays: Arrays, val_arrays: Arrays, *, callbacks: list | None = None,
          verbose: int = 1) -> TrainResult:
    """Fit a model from ``cfg`` on ``train_arrays``; select and restore the best epoch on ``val_arrays``.

    ``callbacks`` (tracking, pruning) see the per-epoch logs, ``val_patient_dice`` included.
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg)
    _compile(model, cfg, cfg.lr)
    n = len(train_arrays.X)
    if n == 0 or len(val_arrays.X) == 0:
        raise ValueError("train: the training and validation subsets must both have slices")
    steps = cfg.steps_per_epoch or max(1, math.ceil(n / cfg.batch_size))
    ds = train_dataset(train_arrays.X, train_arrays.Y, batch_size=min(cfg.batch_size, n),
                       tumor_fraction=cfg.tumor_fraction, augment=cfg.augment, seed=cfg.seed)
    best = BestWeights()
    cbs = [PatientDice(val_arrays, cfg.threshold, 32, model.loss), best,
           keras.callbacks.EarlyStopping(MONITOR, mode="max", patience=cfg.patience),
           keras.callbacks.ReduceLROnPlateau(MONITOR, mode="max", factor=0.5, patience=cfg.lr_patience,
                                             min_lr=cfg.lr / 64)] + list(callbacks or [])
    history: dict[str, list[float]] = {}
    frozen = min(cfg.freeze_encoder_epochs, cfg.epochs) if cfg.arch in SM_ARCHS else 0
    phases = [(0, frozen), (frozen, cfg.epochs)] if frozen else [(0, cfg.epochs)]
    stopped = False
    for start, end in phases:
        if start > 0:  # unfreeze the encoder and recompile (keeps weights)
            set_encoder_trainable(model, True)
            _compile(model, cfg, float(keras.backend.get_value(model.optimizer.learning_rate)))
        if end <= start or stopped:
            continue
        h = model.fit(ds, steps_per_epoch=steps, epochs=end, initial_epoch=start, callbacks=cbs, verbose=verbose)
        for k, v in h.history.items():
            history.setdefault(k, []).extend(float(x) for x in v)
        stopped = bool(model.stop_training)
    epochs_run = len(history.get("loss", []))
    return TrainResult(model, history, best.best_epoch, best.best, epochs_run)


def save_model(model: keras.Model, cfg: TrainConfig, out_dir: Path) -> Path:
    """Write ``model.h5`` (no optimizer state) and ``brainseg.json`` (settings) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / MODEL_FILE, include_optimizer=False, save_format="h5")
    (out_dir / SETTINGS_FILE).write_text(json.dumps({"train": cfg.to_dict()}, indent=2))
    return out_dir


def load_model_dir(model_dir: Path) -> tuple[keras.Model, TrainConfig]:
    """Load a folder holding ``model.h5`` and ``brainseg.json`` (searched recursively)."""
    model_dir = Path(model_dir)
    h5 = model_dir if model_dir.suffix == ".h5" else next(iter(sorted(model_dir.rglob(MODEL_FILE))), None)
    if h5 is None or not h5.is_file():
        raise FileNotFoundError(f"{model_dir}: no {MODEL_FILE} found")
    settings = h5.parent / SETTINGS_FILE
    if not settings.is_file():
        raise FileNotFoundError(f"{settings}: settings file missing beside {h5.name}")
    cfg = TrainConfig.from_dict(json.loads(settings.read_text())["train"])
    return keras.models.load_model(h5, compile=False), cfg
