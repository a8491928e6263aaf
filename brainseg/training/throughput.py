"""What one training configuration costs on this machine: model build, a step, a validation pass.

A study on a wall-clock budget plans its trials from these (:mod:`brainseg.tune.study_budget`); they are
measured with the code that trains (the same model, compile step, input pipeline and validation
callback), on the real training and validation arrays, for a few steps.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401  (TF / Keras environment before TensorFlow loads)

import dataclasses
import time

import numpy as np
import tf_keras as keras

from brainseg.data.arrays import Arrays
from brainseg.data.pipeline import train_dataset
from brainseg.models.factory import build_model
from brainseg.settings.config import Train
from brainseg.training.train import PatientDice, _compile


@dataclasses.dataclass(frozen=True)
class Cost:
    build_s: float       # model build and compile
    step_s: float        # one training step (steady state)
    val_s: float         # one validation pass (the per-epoch PatientDice)
    steps_per_epoch: int

    @property
    def epoch_s(self) -> float:
        return self.step_s * self.steps_per_epoch + self.val_s

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "epoch_s": self.epoch_s}


def measure(cfg: Train, train_arrays: Arrays, val_arrays: Arrays, steps: int = 8,
            clock=time.perf_counter) -> Cost:
    """Train ``cfg`` for 2 + ``steps`` steps and validate once; the measured costs."""
    t0 = clock()
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg)
    _compile(model, cfg, cfg.lr)
    n = len(train_arrays.X)
    ds = train_dataset(train_arrays.X, train_arrays.Y, batch_size=min(cfg.batch_size, n),
                       tumor_fraction=cfg.tumor_fraction, augment=cfg.augment, seed=cfg.seed)
    build_s = clock() - t0
    model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)  # trace the step, start the pipeline

    ends: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(clock())

    model.fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[Clock()])
    step_s = (ends[-1] - ends[0]) / steps
    validation = PatientDice(val_arrays, cfg.threshold, 32, model.loss)
    validation.set_model(model)
    t1 = clock()
    validation.on_epoch_end(0, {})
    val_s = clock() - t1
    del model
    keras.backend.clear_session()
    return Cost(build_s, float(step_s), float(val_s),
                int(cfg.steps_per_epoch or max(1, int(np.ceil(n / cfg.batch_size)))))
