"""What a run's numbers are called in MLflow: finite values only, per-epoch names, best-epoch values.

Pure (no MLflow): :mod:`brainseg.tracking.mlflow_runs` logs what these return.
"""

from __future__ import annotations

import json
import math

import numpy as np

from brainseg.settings.architectures import without_unused_encoder
from brainseg.settings.config import Train


def clean_metrics(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric, finite entries of ``d`` (NaN means 'undefined' and is not logged)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, np.bool_)):
            v = float(v)
        if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
            out[f"{prefix}{k}"] = float(v)
    return out


# Keras log keys renamed in MLflow so that no metric shares a name with a parameter (param `lr`)
# or with a summary metric (the full-size evaluation's `val_empty_slice_fp_rate`).
EPOCH_METRIC_RENAMES = {"lr": "learning_rate", "val_empty_slice_fp_rate": "val_empty_fp_rate"}


def history_name(key: str) -> str:
    """The MLflow name of a per-epoch history key; ``best_`` + this names its best-epoch value.

    >>> history_name("val_patient_dice"), history_name("lr"), history_name("val_empty_slice_fp_rate")
    ('val_patient_dice', 'learning_rate', 'val_empty_fp_rate')
    """
    return EPOCH_METRIC_RENAMES.get(key, key)


def epoch_metrics(logs: dict) -> dict[str, float]:
    """One epoch's Keras logs as MLflow metrics under :func:`history_name` (NaN left out).

    >>> epoch_metrics({"loss": 0.5, "lr": 0.001, "val_patient_dice": float("nan")})
    {'loss': 0.5, 'learning_rate': 0.001}
    """
    return clean_metrics({history_name(k): v for k, v in (logs or {}).items()})


def best_epoch_summary(history: dict, best_epoch: int, epochs_run: int) -> dict[str, float]:
    """The best epoch's values as ``best_<history name>`` plus ``best_epoch`` counted from 1.

    ``best_epoch`` is 0-based here (Keras); -1 means no epoch had a value.

    >>> best_epoch_summary({"loss": [0.9, 0.5, 0.7], "val_empty_slice_fp_rate": [1.0, 0.79, 1.0]}, 1, 3)
    {'best_epoch': 2.0, 'epochs_run': 3.0, 'best_loss': 0.5, 'best_val_empty_fp_rate': 0.79}
    """
    out = {"best_epoch": best_epoch + 1, "epochs_run": epochs_run}
    if best_epoch >= 0:
        for key, values in history.items():
            if best_epoch < len(values):
                out[f"best_{history_name(key)}"] = values[best_epoch]
    return clean_metrics(out)


def train_config_params(cfg: Train) -> dict:
    """The training config as MLflow params; the loss mapping is ``loss_weights`` (JSON) and
    ``loss_w_NAME``, never ``loss``, which is the metric (the loss value per epoch). An encoder the
    architecture does not have is left out."""
    d = without_unused_encoder(cfg.to_dict())
    loss = d.pop("loss")
    d["loss_weights"] = json.dumps(loss, sort_keys=True)
    for name in ("bce", "dice", "jaccard", "focal", "tversky"):
        d[f"loss_w_{name}"] = float(loss.get(name, 0) or 0)
    return d


def epoch_rows(history: dict, best=None):
    """(step, metrics) of every epoch in ``history``, with the running best ``val_patient_dice`` first."""
    for e in range(len(history.get("loss", []))):
        metrics = epoch_metrics({k: v[e] for k, v in history.items() if e < len(v)})
        value = metrics.get("val_patient_dice")
        best = value if value is not None and (best is None or value > best) else best
        yield e + 1, ({"best_val_patient_dice": best} if best is not None else {}) | metrics
