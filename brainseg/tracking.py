"""MLflow glue: lineage tags, the per-epoch Keras callback, training/evaluation artifacts.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default ``sqlite:///mlflow.db`` in the
working folder (artifacts in ``./mlruns``); ``mlflow ui`` and ``mlflow models serve`` started in
the same folder find the same runs and registry.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from brainseg import plots
from brainseg.config import TrainConfig
from brainseg.data.version import git_commit

PIPELINE_TAG = "brainseg.pipeline_run"  # shared by every run of one pipeline execution
PIPELINE_ENV = "BRAINSEG_PIPELINE_RUN"
PROJECT_ENV = "BRAINSEG_PROJECT_RUN"  # the `mlflow run` run this command executes under, if any


def adopt_project_run() -> None:
    """Under ``mlflow run``, MLflow hands the command its run through ``MLFLOW_RUN_ID``; every
    ``start_run`` would then resume that one run. Take it out of the environment (subprocesses
    included) and nest this command's runs under it instead."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        os.environ[PROJECT_ENV] = run_id


def _with_project_parent(tags: dict) -> dict:
    project = os.environ.get(PROJECT_ENV)
    if project and "mlflow.parentRunId" not in tags:
        return {**tags, "mlflow.parentRunId": project}
    return tags


def set_experiment(name: str) -> None:
    mlflow.set_experiment(name)


def lineage_tags(version: str, settings: dict | None = None) -> dict[str, str]:
    tags = {"data_version": version, "git_commit": git_commit(),
            "profile": str((settings or {}).get("profile", ""))}
    if os.environ.get(PIPELINE_ENV):
        tags[PIPELINE_TAG] = os.environ[PIPELINE_ENV]
    if os.environ.get(PROJECT_ENV):
        tags["brainseg.project_run"] = os.environ[PROJECT_ENV]
    return tags


def clean_metrics(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric, finite entries of ``d`` (NaN means 'undefined' and is not logged)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, np.bool_)):
            v = float(v)
        if isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
            out[f"{prefix}{k}"] = float(v)
    return out


def epoch_logger():
    """Keras callback logging every epoch's metrics (loss, Dice, IoU, val_patient_dice, lr) in one batch."""
    import tf_keras as keras

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics(clean_metrics(logs or {}), step=epoch)

    return MlflowEpochLogger()


def log_params(settings_flat: dict) -> None:
    """Log parameters in batches (a tracking server charges per call)."""
    items = [(k, "None" if v is None else str(v)[:6000]) for k, v in settings_flat.items()]
    for i in range(0, len(items), 90):
        mlflow.log_params(dict(items[i:i + 90]))


def log_dataset_input(rows: pd.DataFrame, root: Path, version: str, context: str) -> None:
    table = rows[["patient", "slice", "tumor_px"]].copy()
    ds = mlflow.data.from_pandas(table, source=str(Path(root).resolve()), name=f"kaggle_3m@{version[:12]}")
    # Several tuning workers start trials on the same dataset at once. A tracking server on
    # PostgreSQL checks "does this dataset exist?" and then inserts it, so two concurrent first
    # logs can race and one gets a unique-constraint violation. The loser only has to retry:
    # by then the row exists and the server merely links it to the run.
    for attempt in range(4):
        try:
            mlflow.log_input(ds, context=context)
            return
        except mlflow.exceptions.MlflowException as exc:
            text = str(exc).lower()
            if attempt == 3 or not ("unique" in text or "duplicate" in text or "already exists" in text):
                raise
            time.sleep(0.2 * (attempt + 1))


def log_figure(fig, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        plots.save(fig, path)
        mlflow.log_artifact(str(path))


def log_table(df: pd.DataFrame, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        df.to_csv(path, index=False)
        mlflow.log_artifact(str(path))


def log_json(d: dict, name: str) -> None:
    mlflow.log_dict(d, name)


def overlay_examples(ev, images: list[np.ndarray], truths: list[np.ndarray]):
    """Best, median and worst tumor slices by per-slice Dice -> overlay grid figure."""
    s = ev.slices
    tumor = s[s["truth_px"] > 0].copy()
    if tumor.empty:
        idx = list(range(min(3, len(s))))
        titles = [f"{s.loc[i, 'patient_dir']} #{s.loc[i, 'slice']}" for i in idx]
    else:
        tumor["dice"] = 2 * tumor["tp"] / (2 * tumor["tp"] + tumor["fp"] + tumor["fn"])
        tumor = tumor.sort_values("dice")
        picks = {"worst": tumor.index[0], "median": tumor.index[len(tumor) // 2], "best": tumor.index[-1]}
        idx = list(picks.values())
        titles = [f"{k}: {s.loc[i, 'patient_dir']} #{s.loc[i, 'slice']} Dice {tumor.loc[i, 'dice']:.2f}"
                  for k, i in picks.items()]
    return plots.overlay_grid([images[i] for i in idx], [truths[i] for i in idx],
                              [ev.preds[i] for i in idx], titles)


def log_evaluation(ev, prefix: str, images=None, truths=None) -> dict:
    """Metrics (with the empty baseline), per-patient CSV and the overlay grid of one evaluation."""
    metrics = ev.metrics()
    mlflow.log_metrics(clean_metrics(metrics, prefix))
    log_table(ev.patients, f"{prefix}per_patient_metrics.csv")
    if images is not None:
        log_figure(overlay_examples(ev, images, truths), f"{prefix}overlays.png")
    return metrics


def log_segmenter_model(model_dir: Path, example_image: np.ndarray | None = None, meta: dict | None = None) -> str:
    """Log the serving (pyfunc) model built from ``model.h5`` + ``brainseg.json``; returns its URI."""
    from brainseg.serving import log_pyfunc_segmenter  # keeps serving imports out of training

    return log_pyfunc_segmenter(Path(model_dir), example_image, meta)


@contextlib.contextmanager
def run(name: str, tags: dict, nested: bool = False, finished_on: tuple = ()):
    """Start an MLflow run; an exception marks it FAILED, Ctrl-C marks it KILLED.

    Exceptions of the types in ``finished_on`` (e.g. a pruned trial) end it FINISHED and propagate.
    """
    active = mlflow.start_run(run_name=name, tags=tags if nested else _with_project_parent(tags), nested=nested)
    try:
        yield active
    except finished_on:
        mlflow.end_run("FINISHED")
        raise
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def train_config_params(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    loss = d.pop("loss")
    d["loss"] = json.dumps(loss, sort_keys=True)
    for name in ("bce", "dice", "jaccard", "focal", "tversky"):
        d[f"loss_w_{name}"] = float(loss.get(name, 0) or 0)
    return d


# ------------------------------------------------------------------------------- parent runs
def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def create_parent_run(experiment: str, name: str, tags: dict, params: dict) -> str:
    """A run that is not active in this process (several workers attach children to it)."""
    exp = mlflow.set_experiment(experiment)
    r = client().create_run(exp.experiment_id, run_name=name, tags=_with_project_parent(tags))
    items = [mlflow.entities.Param(k, "None" if v is None else str(v)[:6000]) for k, v in params.items()]
    client().log_batch(r.info.run_id, params=items)
    return r.info.run_id


def run_status(run_id: str) -> str:
    return client().get_run(run_id).info.status


def set_tags(run_id: str, tags: dict) -> None:
    client().log_batch(run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])


def log_metrics_to(run_id: str, metrics: dict) -> None:
    import time

    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), ts, 0)
                                        for k, v in clean_metrics(metrics).items()])


def log_figure_to(run_id: str, fig, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        plots.save(fig, path)
        client().log_artifact(run_id, str(path))


def terminate(run_id: str, status: str) -> None:
    """End a run (FINISHED, FAILED, KILLED) unless it already ended."""
    try:
        if run_status(run_id) == "RUNNING":
            client().set_terminated(run_id, status)
    except mlflow.exceptions.MlflowException:
        pass
