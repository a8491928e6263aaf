"""MLflow glue: lineage tags, the per-epoch Keras callback, training/evaluation artifacts.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default ``sqlite:///mlflow.db`` in the
working folder (artifacts in ``./mlruns``); ``mlflow ui`` and ``mlflow models serve`` started in
the same folder find the same runs and registry.
"""

from __future__ import annotations

import contextlib
import json
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
from brainseg.run_metrics import best_epoch_summary, clean_metrics, epoch_metrics, history_name  # noqa: F401
from brainseg.run_notes import NOTE_TAG, run_note

PIPELINE_TAG = "brainseg.pipeline_run"  # shared by every run of one pipeline execution
PIPELINE_ENV = "BRAINSEG_PIPELINE_RUN"
PROJECT_ENV = "BRAINSEG_PROJECT_RUN"  # the `mlflow run` run this command executes under, if any
CHOSEN_ON_TAG = "inference_chosen_on"  # "val" when TTA and post-processing were chosen on val patients


def adopt_project_run() -> None:
    """Under ``mlflow run``, MLflow hands the command its run through ``MLFLOW_RUN_ID``; every
    ``start_run`` would then resume that one run. Take it out of the environment (subprocesses
    included) and nest this command's runs under it instead."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        os.environ[PROJECT_ENV] = run_id


def _with_project_parent(tags: dict, experiment_id: str | None = None) -> dict:
    """``tags`` with the project run as parent, when the run goes to the project run's experiment
    (a parent in another experiment would split the UI's run tree; the lineage tag still names it)."""
    project = os.environ.get(PROJECT_ENV)
    if not project or "mlflow.parentRunId" in tags:
        return tags
    try:
        same = experiment_id is None or client().get_run(project).info.experiment_id == str(experiment_id)
    except Exception:  # noqa: BLE001 - a project run in another store: no parent
        same = False
    return {**tags, "mlflow.parentRunId": project} if same else tags


KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # how MLflow records a training experiment
UI_ROOT = "http://127.0.0.1:5000"  # where `mlflow ui` / `mlflow server` listen by default


def set_experiment(name: str, artifact_root: Path | None = None):
    """Make ``name`` the active experiment (created when new, with its artifacts under
    ``artifact_root`` when given), tagged as model development once, so MLflow's UI treats it as
    training runs and models (not its GenAI traces); returns it."""
    if artifact_root is not None and mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=Path(artifact_root).resolve().as_uri())
    exp = mlflow.set_experiment(name)
    if exp.tags.get(KIND_TAG) != KIND:
        client().set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp


def ui_link(experiment_id: str, root: str = UI_ROOT) -> str:
    """The experiment's page in the MLflow UI, opened on runs and models: MLflow 3.17 starts a fresh
    browser in its GenAI workflow unless the link asks for ``workflowType=machine_learning``.

    >>> ui_link("3")
    'http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning'
    """
    return f"{root.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def lineage_tags(version: str, settings: dict | None = None) -> dict[str, str]:
    tags = {"data_version": version, "git_commit": git_commit(),
            "profile": str((settings or {}).get("profile", ""))}
    if os.environ.get(PIPELINE_ENV):
        tags[PIPELINE_TAG] = os.environ[PIPELINE_ENV]
    if os.environ.get(PROJECT_ENV):
        tags["brainseg.project_run"] = os.environ[PROJECT_ENV]
    return tags


def epoch_logger():
    """Keras callback logging every epoch's metrics in one batch, at step = epoch number counted
    from 1 (as the console and ``best_epoch`` count)."""
    import tf_keras as keras

    class MlflowEpochLogger(keras.callbacks.Callback):
        # The running best val_patient_dice goes first in the first batch. On SQLite, MLflow returns
        # a run's metrics in the order first logged (it sets no ORDER BY: PostgreSQL may differ),
        # and the UI's Compare view opens its parallel-coordinates plot on the first metric the
        # compared runs share (and on the first three, alphabetically, of the params that differ).
        best = None

        def on_epoch_end(self, epoch, logs=None):
            metrics = epoch_metrics(logs or {})
            value = metrics.get("val_patient_dice")
            if value is not None and (self.best is None or value > self.best):
                self.best = value
            head = {"best_val_patient_dice": self.best} if self.best is not None else {}
            mlflow.log_metrics({**head, **metrics}, step=epoch + 1)

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


def log_evaluation(ev, prefix: str, images=None, truths=None) -> dict:
    """Metrics (with the empty baseline), per-patient CSV and the overlay grid of one evaluation."""
    metrics = ev.metrics()
    mlflow.log_metrics(clean_metrics(metrics, prefix))
    log_table(ev.patients, f"{prefix}per_patient_metrics.csv")
    if images is not None:
        log_figure(plots.overlay_examples(ev, images, truths), f"{prefix}overlays.png")
    return metrics


def log_segmenter_model(model_dir: Path, example_image: np.ndarray | None = None, meta: dict | None = None) -> str:
    """Log the serving (pyfunc) model built from ``model.h5`` + ``brainseg.json``; returns its URI."""
    from brainseg.serving.pyfunc import (
        log_pyfunc_segmenter,  # keeps serving imports out of training
    )

    return log_pyfunc_segmenter(Path(model_dir), example_image, meta)


def with_note(name: str, tags: dict) -> dict:
    """``tags`` plus the run's description (``mlflow.note.content``) unless one is given."""
    return tags if NOTE_TAG in tags else {**tags, NOTE_TAG: run_note(name, tags)}


class Terminated(BaseException):
    """The process got SIGTERM (``brainseg.cli.main`` raises it where the process is): like Ctrl-C,
    open runs end KILLED, and the command exits 143."""


@contextlib.contextmanager
def run(name: str, tags: dict, nested: bool = False, finished_on: tuple = ()):
    """Start an MLflow run; an exception marks it FAILED, Ctrl-C or SIGTERM marks it KILLED.

    Exceptions of the types in ``finished_on`` (e.g. a pruned trial) end it FINISHED and propagate.
    """
    tags = with_note(name, tags)
    experiment = mlflow.tracking.fluent._get_experiment_id()  # where this run goes
    active = mlflow.start_run(run_name=name, tags=tags if nested else _with_project_parent(tags, experiment),
                              nested=nested)
    try:
        yield active
    except finished_on:
        mlflow.end_run("FINISHED")
        raise
    except (KeyboardInterrupt, Terminated) as exc:
        mlflow.set_tag("brainseg.stopped_by", "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C")
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def train_config_params(cfg: TrainConfig) -> dict:
    """The training config as MLflow params; the loss mapping is ``loss_weights`` (JSON) and
    ``loss_w_NAME``, never ``loss``, which is the metric (the loss value per epoch)."""
    d = cfg.to_dict()
    loss = d.pop("loss")
    d["loss_weights"] = json.dumps(loss, sort_keys=True)
    for name in ("bce", "dice", "jaccard", "focal", "tversky"):
        d[f"loss_w_{name}"] = float(loss.get(name, 0) or 0)
    return d


# ------------------------------------------------------------------------------- the active run
def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def log_active_metrics(metrics: dict, step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)


def set_active_tags(tags: dict) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_text(text: str, name: str) -> None:
    mlflow.log_text(text, name)


def log_dict(d: dict, name: str) -> None:
    mlflow.log_dict(d, name)


def log_artifact(path: Path) -> None:
    mlflow.log_artifact(str(path))


def logged_models_of(run_id: str) -> list:
    """The models logged by run ``run_id`` (MLflow 3 LoggedModels)."""
    return mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")


# ------------------------------------------------------------------------------- parent runs
def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def _params(params: dict) -> list:
    return [mlflow.entities.Param(k, "None" if v is None else str(v)[:6000]) for k, v in params.items()]


def create_parent_run(experiment: str, name: str, tags: dict, params: dict) -> str:
    """A run that is not active in this process (several workers attach children to it)."""
    exp = set_experiment(experiment)
    r = client().create_run(exp.experiment_id, run_name=name,
                            tags=_with_project_parent(with_note(name, tags), exp.experiment_id))
    client().log_batch(r.info.run_id, params=_params(params))
    return r.info.run_id


def run_status(run_id: str) -> str:
    return client().get_run(run_id).info.status


def set_tags(run_id: str, tags: dict) -> None:
    client().log_batch(run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])


def use_experiment_of(run_id: str) -> None:
    """Later runs of this process go to ``run_id``'s experiment."""
    mlflow.set_experiment(experiment_id=client().get_run(run_id).info.experiment_id)


def log_params_to(run_id: str, params: dict) -> None:
    """Params of ``run_id`` that it does not have yet (a resumed study keeps its first values)."""
    have = client().get_run(run_id).data.params
    client().log_batch(run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()
                                       if k not in have])


def log_metrics_to(run_id: str, metrics: dict, step: int = 0) -> None:
    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), ts, int(step))
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


# ------------------------------------------------------------------------ the `mlflow run` run
DEFAULT_EXPERIMENT_ID = "0"


def claim_project_run(project: str, experiment: str, name: str, tags: dict, params: dict) -> tuple[str, bool]:
    """Make ``mlflow run``'s run (``project``) this command's run in ``experiment``.

    Returns (run id, moved). Either way the run gets its description (``mlflow.note.content``,
    :func:`brainseg.tracking.with_note`). In ``experiment`` (or another experiment the user chose) it is used
    as is. In Default, a new run in ``experiment`` gets its tags and params and the empty original
    is ended with a note pointing at the new run (not deleted: ``mlflow run`` sets its status when
    the command ends).
    """
    c = client()
    run = c.get_run(project)
    exp = set_experiment(experiment)
    entities = mlflow.entities
    if run.info.experiment_id != DEFAULT_EXPERIMENT_ID or exp.experiment_id == DEFAULT_EXPERIMENT_ID:
        c.log_batch(project, params=_params({k: v for k, v in params.items() if k not in run.data.params}),
                    tags=[entities.RunTag(k, str(v)) for k, v in with_note(name, tags).items()])
        c.set_tag(project, "mlflow.runName", name)
        return project, False
    copied = {k: v for k, v in run.data.tags.items() if k != "mlflow.runName"}
    new = c.create_run(exp.experiment_id, run_name=name,
                       tags=with_note(name, {**copied, **tags, "brainseg.moved_from_run": project}))
    c.log_batch(new.info.run_id, params=_params({**run.data.params, **params}))
    # Not deleted: `mlflow run` sets the status of its run when the command ends and fails on a
    # deleted run. It is ended, and says where the study went (`--experiment-name brainseg` avoids it).
    c.log_batch(project, tags=[entities.RunTag(NOTE_TAG,
                                               f"Launcher only: the study is run {new.info.run_id} in "
                                               f"experiment {experiment!r}."),
                               entities.RunTag("brainseg.moved_to_run", new.info.run_id)])
    c.set_terminated(project, "FINISHED")
    os.environ[PROJECT_ENV] = new.info.run_id
    return new.info.run_id, True
