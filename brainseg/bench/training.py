"""Training throughput: ``fit`` fed by the real input pipeline vs one fixed in-memory batch.

Runs in a child process (``python -m brainseg.bench train-worker``) so its peak RSS is the
training memory and TensorFlow's state does not leak into the serving measurements.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data.arrays import load_arrays
from brainseg.settings.config import Train

PIPELINE_TARGET = 0.95


def train_throughput(spec: dict) -> dict:
    """Slices/s of ``fit`` fed by the real pipeline vs a fixed in-memory batch (same model).

    ``spec``: ``train`` (Train dict), ``manifest`` (CSV path), ``steps``, ``rounds``,
    ``model_dir`` (where the model is saved afterwards, for the inference benchmarks).
    """
    import tensorflow as tf
    import tf_keras as keras

    from brainseg.data.pipeline import train_dataset
    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.models.factory import build_model
    from brainseg.training.train import _compile

    cfg = Train.from_dict(spec["train"])
    steps, rounds = int(spec["steps"]), int(spec["rounds"])
    X, Y = load_arrays(pd.read_csv(spec["manifest"]), cfg.prep)
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg)
    _compile(model, cfg, cfg.lr)
    batch = min(cfg.batch_size, len(X))
    pipeline = train_dataset(X, Y, batch_size=batch, tumor_fraction=cfg.tumor_fraction,
                             augment=cfg.augment, seed=cfg.seed)
    xb, yb = next(iter(pipeline))
    in_memory = tf.data.Dataset.from_tensors((xb, yb)).repeat()

    class StepClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, b, logs=None):
            self.ends.append(time.perf_counter())

    clock = StepClock()

    def fit_rate(ds) -> float:  # steady state: from the end of the first step to the end of the last
        model.fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[clock])
        return steps * batch / (clock.ends[-1] - clock.ends[0])

    for ds in (pipeline, in_memory):  # trace the train step and start the pipeline's threads
        model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
    rates: dict[str, list[float]] = {"pipeline": [], "in_memory": []}
    for _ in range(rounds):  # alternate, so background load hits both alike
        rates["pipeline"].append(fit_rate(pipeline))
        rates["in_memory"].append(fit_rate(in_memory))
    it = iter(pipeline)
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    alone = steps * batch / (time.perf_counter() - t0)
    save_model(model, cfg, InferenceSettings(threshold=cfg.threshold), Path(spec["model_dir"]))
    pipe, mem = float(np.median(rates["pipeline"])), float(np.median(rates["in_memory"]))
    return {"batch_size": batch, "steps": steps, "rounds": rounds, "train_slices": len(X),
            "pipeline_slices_per_s": pipe, "in_memory_slices_per_s": mem,
            "efficiency": pipe / mem, "target": PIPELINE_TARGET,
            "pipeline_alone_slices_per_s": alone, "rounds_pipeline": rates["pipeline"],
            "rounds_in_memory": rates["in_memory"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_training_child(spec: dict, workdir: Path, timeout_s: float = 900) -> dict:
    spec_path, out_path = Path(workdir) / "train_spec.json", Path(workdir) / "train_result.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "brainseg.bench", "train-worker", str(spec_path), str(out_path)],
                          check=False, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"training benchmark failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out_path.read_text())

