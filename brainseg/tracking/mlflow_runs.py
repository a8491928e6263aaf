"""MLflow glue: runs (started, reopened, ended), the per-epoch Keras callback, training/evaluation
artifacts; what a lost tracking server means.

Tracking URI: ``MLFLOW_TRACKING_URI`` if set, else MLflow's default ``sqlite:///mlflow.db`` in the
working folder (artifacts in ``./mlruns``); ``mlflow ui`` and ``mlflow models serve`` started in
the same folder find the same runs and registry.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from brainseg.evaluation import plots
from brainseg.tracking.run_context import PROJECT_ENV, Terminated, quick_http
from brainseg.tracking.run_metrics import clean_metrics, epoch_rows
from brainseg.tracking.run_notes import NOTE_TAG, with_note


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


def epoch_logger(history: dict | None = None):
    """Keras callback logging every epoch's metrics in one batch, at step = epoch number counted
    from 1 (as the console and ``best_epoch`` count); ``history``: the epochs a resumed run had.

    A tracking server that stops answering does not stop the training: the logger says so once
    and logs nothing more (the epochs stay in the checkpoint; :func:`log_missing_epochs` sends
    them when the server is back)."""
    import tf_keras as keras

    class MlflowEpochLogger(keras.callbacks.Callback):
        # The running best val_patient_dice goes first in the first batch. On SQLite, MLflow returns
        # a run's metrics in the order first logged (it sets no ORDER BY: PostgreSQL may differ),
        # and the UI's Compare view opens its parallel-coordinates plot on the first metric the
        # compared runs share (and on the first three, alphabetically, of the params that differ).
        def __init__(self):
            super().__init__()
            self.history = {k: list(v) for k, v in (history or {}).items()}
            self.lost_at = None  # the first epoch the server did not take

        def on_epoch_end(self, epoch, logs=None):
            for k, v in (logs or {}).items():
                self.history.setdefault(k, []).append(float(v))
            if self.lost_at is not None:
                return
            step, row = list(epoch_rows(self.history))[-1]
            try:
                mlflow.log_metrics(row, step=step)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                self.lost_at = step
                sys.stderr.write(f"tracking server not answering at epoch {step}: training goes on, its epochs are "
                                 "kept in the checkpoint and logged when the server is back\n")

    return MlflowEpochLogger()


def log_missing_epochs(history: dict) -> list[int]:
    """Log the epochs of ``history`` the active run lacks (trained while the tracking server was
    away, or saved just before a kill); returns their steps."""
    have = {m.step for m in client().get_metric_history(active_run_id(), "loss")}
    missing = [(step, row) for step, row in epoch_rows(history) if step not in have]
    for step, row in missing:
        mlflow.log_metrics(row, step=step)
    return [step for step, _ in missing]


class TrackingLost(RuntimeError):
    """The tracking server stopped answering; the work is kept locally and the message says how to log it."""


def unreachable(exc: BaseException) -> bool:
    """Whether an MLflow call failed because the tracking server did not answer (after MLflow's own
    retries: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``), not because it refused."""
    text = str(exc)
    return isinstance(exc, (mlflow.exceptions.MlflowException, OSError)) and any(
        s in text for s in ("Max retries exceeded", "Connection refused", "Read timed out", "Connection aborted",
                            "RemoteDisconnected", "Failed to establish a new connection"))


def add_to_note(text: str) -> None:
    """Append a paragraph to the active run's description (``mlflow.note.content``)."""
    run_id = active_run_id()
    old = client().get_run(run_id).data.tags.get(NOTE_TAG, "")
    mlflow.set_tag(NOTE_TAG, f"{old}\n\n{text}".strip())


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
    from brainseg.serving.pyfunc import log_pyfunc_segmenter  # keeps serving imports out of training

    before = {m.model_id for m in logged_models_of(active_run_id())}
    try:
        return log_pyfunc_segmenter(Path(model_dir), example_image, meta)
    except BaseException:  # a full disk: the model goes with what it wrote (no cut model.h5 stays in the store)
        for m in (m for m in logged_models_of(active_run_id()) if m.model_id not in before):
            with contextlib.suppress(Exception):  # best effort: the error that stopped the logging is the news
                mlflow.MlflowClient().delete_logged_model(m.model_id)
                get_artifact_repository(m.artifact_location).delete_artifacts()
        raise


@contextlib.contextmanager
def run(name: str, tags: dict, nested: bool = False, finished_on: tuple = (), run_id: str | None = None):
    """Start an MLflow run (or reopen run ``run_id``); an exception marks it FAILED, Ctrl-C or
    SIGTERM marks it KILLED; :class:`TrackingLost` leaves it to the command that logs the rest.

    Exceptions of the types in ``finished_on`` (e.g. a pruned trial) end it FINISHED and propagate.
    """
    if run_id:
        active = mlflow.start_run(run_id=run_id, nested=nested)
    else:
        tags = with_note(name, tags)
        active = mlflow.start_run(run_name=name, tags=tags, nested=nested)
    try:
        if not run_id and not nested:  # where the run went is known once it exists (MLflow's public API)
            parent = _with_project_parent(tags, active.info.experiment_id).get("mlflow.parentRunId")
            if parent and "mlflow.parentRunId" not in tags:
                mlflow.set_tag("mlflow.parentRunId", parent)
        yield active
    except finished_on:
        mlflow.end_run("FINISHED")
        raise
    except TrackingLost:  # one quick try (the server may be back), then the run stays as the server has it
        with contextlib.suppress(Exception), quick_http():
            mlflow.end_run("FAILED")
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
    :func:`brainseg.tracking.mlflow_runs.with_note`). In ``experiment`` (or another experiment the user chose) it is
    used as is. In Default, a new run in ``experiment`` gets its tags and params and the empty original
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
