"""One training run as MLflow records: train, choose the inference settings on the validation
patients, score, log the model; the test report (read by no decision).

Called by ``brainseg train``, by every tuning trial and refit (:mod:`brainseg.tune`) and by the
stages that span several steps (:mod:`brainseg.pipeline.workflows`); it calls none of them."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

from brainseg.data.arrays import load_full_images
from brainseg.data.context import DataContext
from brainseg.evaluation import plots
from brainseg.evaluation.evaluate import evaluate, select_postprocessing
from brainseg.inference.segmenter import InferenceSettings, Segmenter, save_model
from brainseg.settings.config import Settings, Train, flatten
from brainseg.tracking import mlflow_runs, run_context, run_metrics
from brainseg.tracking.run_context import CHOSEN_ON_TAG
from brainseg.training.checkpoint import Checkpoint, disk_full_stop, resume_command
from brainseg.training.full_disk import disk_full
from brainseg.training.train import save_trained, train, trained_result


def tracked_training(settings: Settings, cfg: Train, ctx: DataContext, *, run_name: str = "train",
                     nested: bool = False, callbacks: list | None = None, tags: dict | None = None,
                     verbose: int = 1, finished_on: tuple = (), report_test: bool = False,
                     checkpoints: Path | None = None, checkpoint_meta: dict | None = None,
                     resume: tuple[Checkpoint, dict] | None = None) -> dict:
    """Train ``cfg`` as one MLflow run: params, per-epoch metrics, the chosen inference settings,
    validation metrics at the original size, the model; test metrics (``test_*``) only if
    ``report_test``, computed after every choice is made and used in none.

    Choices, all on validation patients: the epoch (best ``val_patient_dice`` at network size),
    then TTA and post-processing (``select_postprocessing``), stored with the model.
    ``checkpoints``: a folder where every epoch is saved (:mod:`brainseg.training.checkpoint`; removed when
    the run finishes; ``checkpoint_meta``: more for the checkpoint to keep, such as what a tuning
    refit owes its study). ``resume`` (a checkpoint and its state): reopen that run and continue it:
    the epochs it lacks in MLflow are logged, training goes on after the saved epoch (or not at all
    when it had ended), then everything after training. Ctrl-C / SIGTERM add the resume command to
    the run's description; a tracking server that stops answering raises
    :class:`~brainseg.tracking.mlflow_runs.TrackingLost` after training, with the work kept in the checkpoint.
    Returns run_id, model_uri, best_epoch (1-based), val_patient_dice and the validation metrics.
    """
    ckpt, state = resume if resume else (None, None)
    all_tags = {**run_context.lineage_tags(ctx.version, settings.profile), **(tags or {})}
    with mlflow_runs.run(run_name, all_tags, nested=nested, finished_on=finished_on,
                      run_id=ckpt.run_id if ckpt else None) as active:
        if ckpt is None:
            mlflow_runs.log_params({**run_metrics.train_config_params(cfg), "profile": settings.profile,
                                 **{f"split.{k}": v for k, v in flatten(settings.split.given()).items()}})
            mlflow_runs.log_dataset_input(ctx.rows("train"), ctx.root, ctx.version, "training")
            mlflow_runs.log_dataset_input(ctx.rows("val"), ctx.root, ctx.version, "validation")
            meta = {"settings": {**settings.as_dict(), "train": cfg.to_dict()}, "run_name": run_name,
                    "report_test": report_test, "data_version": ctx.version,
                    **(checkpoint_meta or {})}  # the config that runs (a refit's differs)
            ckpt = Checkpoint.of(checkpoints, active.info.run_id, meta) if checkpoints else None
        else:
            mlflow_runs.log_missing_epochs(state["history"])  # saved, but killed before they were logged
            mlflow_runs.set_active_tags({"brainseg.resumed_from_epoch": state["epoch"]})
        logger = mlflow_runs.epoch_logger(state["history"] if state else None)
        try:
            if state and state.get("trained"):
                result = trained_result(cfg, ckpt, state)
            else:
                result = train(cfg, ctx.arrays("train", cfg), ctx.arrays("val", cfg),
                               callbacks=[logger, *(callbacks or [])], verbose=verbose, checkpoint=ckpt, resume=state)
        except (KeyboardInterrupt, run_context.Terminated) as exc:
            if ckpt is not None and ckpt.exists():
                stopped(ckpt, "SIGTERM" if isinstance(exc, run_context.Terminated) else "Ctrl-C")
            raise
        if ckpt is not None:
            save_trained(ckpt, result)
        try:
            mlflow_runs.log_missing_epochs(result.history)  # those trained while the server was away
            mlflow_runs.log_active_metrics({**run_metrics.best_epoch_summary(result.history, result.best_epoch,
                                                                       result.epochs_run), **result.budget})
            mlflow_runs.log_figure(plots.learning_curves(result.history), "learning_curves.png")
            segmenter, metrics, example = choose_and_score(settings, result.model, cfg, ctx)
            if report_test:
                metrics.update(report_on_test(segmenter, ctx))
            model_uri = log_model(result.model, cfg, segmenter, example, ctx)
        except Exception as exc:
            if ckpt is not None and disk_full(exc):  # issue 37: one line, the checkpoint kept and described
                raise disk_full_stop(ckpt, exc) from exc
            if ckpt is None or not mlflow_runs.unreachable(exc):
                raise
            ckpt.update(stopped_by="tracking server lost")
            local = save_model(result.model, cfg, InferenceSettings.from_dict({**settings.evaluate.given(),
                                                                               "threshold": cfg.threshold}),
                               ckpt.folder / "model", {"data_version": ctx.version, "run_id": ckpt.run_id})
            raise mlflow_runs.TrackingLost(
                f"the tracking server stopped answering ({str(exc).splitlines()[0][:200]}); training finished "
                f"({result.epochs_run} epochs) and is kept in {ckpt.folder}/ (a usable model, post-processing not "
                f"chosen on val yet: brainseg predict --model {local}). When the server is back, log the "
                f"rest (epochs, evaluation, model) with: {resume_command(ckpt)}") from exc
        if ckpt is not None:
            ckpt.remove()
        return {"run_id": active.info.run_id, "model_uri": model_uri, "best_epoch": result.best_epoch + 1,
                "val_patient_dice": result.best_value, "metrics": metrics,
                "inference": segmenter.settings.to_dict(), "budget": result.budget}


def stopped(ckpt: Checkpoint, by: str) -> None:
    """A run stopped by ``by`` (Ctrl-C, SIGTERM): the checkpoint and the run's description say how to resume."""
    state = ckpt.state()
    ckpt.update(stopped_by=by)
    text = (f"Stopped by {by} after epoch {state['epoch']}. Checkpoint: {ckpt.folder.resolve()}. "
            f"Resume with: {resume_command(ckpt)}")
    with contextlib.suppress(Exception):  # the description is a courtesy: the stop must not fail on it
        mlflow_runs.add_to_note(text)
    print(text, file=sys.stderr)


def choose_and_score(settings: Settings, model, cfg: Train, ctx: DataContext):
    """In the active run: choose the inference settings on the validation patients
    (:func:`choose_inference`), log them (params ``inference.*``, tag ``inference_chosen_on``, the
    candidates table) and the validation metrics they give. Returns (segmenter, val metrics, a slice)."""
    val_rows = ctx.rows("val")
    segmenter, choice = choose_inference(settings, model, cfg, val_rows, ctx)
    if choice is not None:
        mlflow_runs.log_table(choice, "val_postprocessing_candidates.csv")
    mlflow_runs.set_active_tags({CHOSEN_ON_TAG: "val" if choice is not None else "fixed (evaluate settings)"})
    mlflow_runs.log_params({f"inference.{k}": v for k, v in segmenter.settings.to_dict().items()})
    val_images, truths = load_full_images(val_rows), ctx.truths("val")
    ev = evaluate(segmenter, val_rows, val_images, truths)
    return segmenter, mlflow_runs.log_evaluation(ev, "val_", val_images, truths), val_images[0]


def log_model(model, cfg: Train, segmenter: Segmenter, example, ctx: DataContext) -> str:
    """Log the network with ``segmenter``'s settings as the active run's serving model; its URI."""
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, cfg, segmenter.settings, Path(tmp))
        return mlflow_runs.log_segmenter_model(Path(tmp), example, {"data_version": ctx.version})


def choose_inference(settings: Settings, model, cfg: Train, val_rows, ctx: DataContext):
    """The model's inference settings: ``evaluate``'s values, with TTA and post-processing chosen
    on the validation patients when ``evaluate.select_postprocessing`` is on."""
    base = InferenceSettings.from_dict({**settings.evaluate.given(), "threshold": cfg.threshold})
    segmenter = Segmenter(model, cfg, base)
    if not settings.evaluate.select_postprocessing:
        return segmenter, None
    best, table = select_postprocessing(segmenter, val_rows, load_full_images(val_rows), ctx.truths("val"))
    return segmenter.with_settings(**best.to_dict()), table


def report_on_test(segmenter: Segmenter, ctx: DataContext) -> dict:
    """Test metrics logged as ``test_*`` for the report; nothing reads them to choose.

    When the test masks are missing or unreadable the run says so (tag) and carries on.
    """
    rows = ctx.rows("test")
    if rows.empty:
        mlflow_runs.set_active_tags({"test_report": "no test patients"})
        return {}
    try:
        truths = ctx.truths("test")
        images = load_full_images(rows)
    except (OSError, ValueError) as exc:
        mlflow_runs.set_active_tags({"test_report": f"unavailable: {exc}"[:500]})
        return {}
    ev = evaluate(segmenter, rows, images, truths)
    metrics = mlflow_runs.log_evaluation(ev, "test_", images, truths)
    mlflow_runs.set_active_tags({"test_report": "test_* metrics: report only, used in no choice"})
    return {f"test_{k}": v for k, v in metrics.items()}
