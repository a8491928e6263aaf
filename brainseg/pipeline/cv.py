"""``brainseg cv``: cross-validation as the unit of evidence, the fold ensemble as the deployed model.

One parent MLflow run (the recipe, the folds, the data version, the budget) and one nested run per
fold. Fold ``k``'s model trains with the recipe on the other folds of the non-test patients, with
``choose_epoch: last`` (a budgeted schedule decays to its last step; the held-out fold is watched,
never used to choose: nnU-Net's final-epoch rule) and the fold's share of ``cv.budget_minutes``.
Once every fold is done (here, or in other processes against the same tracking server with
``--fold K``) :mod:`brainseg.pipeline.cv_ensemble` pools the out-of-fold predictions, chooses the
post-processing on them, logs the figures and the ensemble model, and scores the test patients once.
A killed CV resumes where it stopped: finished folds are kept, an interrupted fold continues from its
checkpoint (``brainseg checkpoints`` names it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from brainseg.data.context import DataContext, build_split
from brainseg.evaluation.crossval import Fold, FoldError, check_partition, fold_split, folds_of
from brainseg.pipeline.cv_ensemble import assemble
from brainseg.registry import model_registry
from brainseg.settings.architectures import model_name
from brainseg.settings.config import Settings, Train, flatten
from brainseg.settings.settings_io import ConfigError
from brainseg.tracking import mlflow_runs, run_context, run_metrics, search
from brainseg.training.checkpoint import DEFAULT_ROOT, Checkpoint, interrupted
from brainseg.training.training_run import tracked_training

ROLE_TAG, PARENT_TAG, FOLD_TAG = "brainseg.role", "brainseg.cv_parent", "brainseg.cv_fold"
STATE_TAG = "brainseg.cv_state"
MODEL_TAG = "brainseg.cv_model_uri"
SETTINGS_ARTIFACT = "cv_settings.json"


class CvRefused(ValueError):
    """A cross-validation that cannot run as asked (one line, exit 2)."""


@dataclasses.dataclass
class CvPlan:
    settings: Settings       # the settings of the whole CV (as given)
    fold_settings: Settings  # what each fold trains with (choose_epoch, its share of the budget)
    cfg: Train               # the fold's training config
    split: pd.DataFrame     # the patient split with the CV's folds
    folds: list[Fold]


def plan_cv(settings: Settings, ctx: DataContext) -> CvPlan:
    """The folds (``split.folds`` of the non-test patients; the subsets are the split's own) and each
    fold's training settings. Raises :class:`CvRefused` in one line."""
    split = build_split(ctx.manifest, settings.split)  # same subsets; the fold column for split.folds
    on_disk = ctx.split.set_index("patient")["subset"]
    if not split.set_index("patient")["subset"].equals(on_disk.reindex(split["patient"])):
        raise CvRefused(f"the split on disk ({settings.data.split}) is not the one split.* gives: "
                        "run `brainseg data split` first")
    try:
        folds = folds_of(split)
        check_partition(split, folds)
    except FoldError as exc:
        raise CvRefused(str(exc)) from exc
    train = {"choose_epoch": settings.cv.choose_epoch}
    if settings.cv.budget_minutes:
        train["budget_minutes"] = float(settings.cv.budget_minutes) / len(folds)
    try:
        fold_settings = settings.with_changes(train=train, evaluate={"select_postprocessing": False})
    except ConfigError as exc:
        raise CvRefused(str(exc)) from exc
    return CvPlan(settings, fold_settings, fold_settings.train, split, folds)


def run_name(cfg: Train) -> str:
    """``cv-plain_unet`` / ``cv-unet-resnet18``: an encoder only where the architecture has one."""
    return f"cv-{model_name(cfg.arch, cfg.encoder)}"


def parent_params(plan: CvPlan) -> dict:
    return {**run_metrics.train_config_params(plan.cfg), "profile": plan.settings.profile,
            "cv.folds": len(plan.folds), "cv.budget_minutes": plan.settings.cv.budget_minutes,
            "cv.fold_budget_minutes": plan.cfg.budget_minutes, "cv.choose_epoch": plan.cfg.choose_epoch,
            "cv.patients": sum(len(f.held_out) for f in plan.folds),
            **{f"split.{k}": v for k, v in flatten(plan.settings.split.given()).items()}}


def stored_settings(parent_id: str) -> dict:
    """The settings a CV parent ran with (its ``cv_settings.json``): a resumed CV runs with them."""
    try:
        path = model_registry.resolve_model_dir(f"runs:/{parent_id}/{SETTINGS_ARTIFACT}")
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError) as exc:
        raise CvRefused(f"run {parent_id}: not a cross-validation run of this store ({SETTINGS_ARTIFACT} "
                        "missing)") from exc


def newest_open_parent(experiment: str) -> str | None:
    """The newest CV parent whose ensemble is not assembled yet (what ``--resume`` continues)."""
    for rec in search.runs_tagged(experiment, {ROLE_TAG: "cv"}):
        if rec.tags.get(STATE_TAG) != "assembled":
            return rec.run_id
    return None


def finished_folds(experiment: str, parent_id: str) -> dict[int, str]:
    """{fold: model URI} of the parent's fold runs that finished with a logged model."""
    done: dict[int, str] = {}
    for rec in search.runs_tagged(experiment, {PARENT_TAG: parent_id}, newest_first=False):
        if rec.status != "FINISHED" or FOLD_TAG not in rec.tags:
            continue
        uri = rec.tags.get(MODEL_TAG) or next((f"models:/{m.model_id}" for m in
                                               mlflow_runs.logged_models_of(rec.run_id)), None)
        if uri:
            done[int(rec.tags[FOLD_TAG])] = uri
    return done


def fold_checkpoint(root: Path, parent_id: str, k: int):
    """(checkpoint, state) of fold ``k`` of ``parent_id`` interrupted under ``root``, or None."""
    for ckpt, state in interrupted(root):
        cv = (ckpt.meta or {}).get("cv") or {}
        if "error" not in state and cv.get("parent") == parent_id and int(cv.get("fold", -1)) == k:
            return Checkpoint.reopen(root, ckpt.run_id)
    return None


def train_fold(plan: CvPlan, ctx: DataContext, fold: Fold, parent_id: str, *, checkpoints: Path,
               callbacks: list | None = None, echo=print) -> dict:
    """Train, score (held-out fold) and log fold ``fold`` as a nested run of ``parent_id``."""
    fctx = dataclasses.replace(ctx, split=fold_split(plan.split, fold))
    resume = fold_checkpoint(checkpoints, parent_id, fold.k)
    if resume:
        echo(f"fold {fold.k}: resuming run {resume[0].run_id} after epoch {resume[1].get('epoch')}")
    tags = {ROLE_TAG: "cv-fold", PARENT_TAG: parent_id, FOLD_TAG: str(fold.k),
            "brainseg.cv_held_out": ",".join(fold.held_out)[:5000]}
    meta = {"cv": {"parent": parent_id, "fold": fold.k}}  # resume_command: `brainseg cv --run PARENT`
    res = tracked_training(plan.fold_settings, plan.cfg, fctx, run_name=f"cv-fold{fold.k}", nested=True, tags=tags,
                           callbacks=callbacks, verbose=0, report_test=False, checkpoints=checkpoints,
                           checkpoint_meta=meta, resume=resume)
    mlflow_runs.set_tags(res["run_id"], {MODEL_TAG: res["model_uri"]})
    return res


def run_cv(settings: Settings, ctx: DataContext, experiment: str, *, parent_id: str | None = None,
           only_fold: int | None = None, report_test: bool = True, checkpoints: Path = DEFAULT_ROOT,
           callbacks_for=None, echo=print) -> dict:
    """One ``brainseg cv``: the folds not done yet (or fold ``only_fold`` alone), then, when every
    fold is done and no single fold was asked for, the ensemble (:func:`brainseg.pipeline.cv_ensemble.assemble`).

    ``parent_id``: continue that CV (its own stored settings must be passed in ``settings``).
    ``callbacks_for(fold)``: Keras callbacks of a fold's training (progress). Returns the parent's
    run id, the folds done, and the assembled figures when assembled.
    """
    plan = plan_cv(settings, ctx)
    if only_fold is not None and only_fold not in [f.k for f in plan.folds]:
        raise CvRefused(f"--fold {only_fold}: the folds are {', '.join(str(f.k) for f in plan.folds)}")
    tags = {**run_context.lineage_tags(ctx.version, settings.profile), ROLE_TAG: "cv"}
    with mlflow_runs.run(run_name(plan.cfg), tags, run_id=parent_id) as active:
        parent_id = active.info.run_id
        if active.data.tags.get(STATE_TAG) == "assembled":  # nothing left to do: say what it made
            return {"run_id": parent_id, "folds_done": [f.k for f in plan.folds], "folds_missing": [],
                    "model_uri": active.data.tags.get(MODEL_TAG), "already_assembled": True}
        if not active.data.params:  # a new CV: its record, and the settings a resume runs with
            mlflow_runs.log_params(parent_params(plan))
            mlflow_runs.log_dict(settings.as_dict(), SETTINGS_ARTIFACT)
            mlflow_runs.set_active_tags({STATE_TAG: "training folds"})
        echo(f"cross-validation run {parent_id}: {len(plan.folds)} folds of "
             f"{sum(len(f.held_out) for f in plan.folds)} non-test patients"
             + (f", {plan.cfg.budget_minutes:.1f} min of training each" if plan.cfg.budget_minutes else ""))
        for fold in plan.folds:
            done = finished_folds(experiment, parent_id)
            if fold.k in done or (only_fold is not None and fold.k != only_fold):
                if fold.k in done:
                    echo(f"fold {fold.k}: done before")
                continue
            echo(f"fold {fold.k}: training on {len(fold.train)} patients, held out {len(fold.held_out)}")
            res = train_fold(plan, ctx, fold, parent_id, checkpoints=checkpoints,
                             callbacks=callbacks_for(fold) if callbacks_for else None, echo=echo)
            held = res["metrics"].get("patient_dice_mean", float("nan"))
            echo(f"fold {fold.k}: held-out per-patient Dice {held:.3f} (last epoch {res['best_epoch']}; "
                 f"run {res['run_id']})")
        done = finished_folds(experiment, parent_id)
        missing = [f.k for f in plan.folds if f.k not in done]
        mlflow_runs.set_active_tags({STATE_TAG: f"{len(done)} of {len(plan.folds)} folds done"})
        out = {"run_id": parent_id, "folds_done": sorted(done), "folds_missing": missing}
        if missing or only_fold is not None:
            if not missing:
                out["next"] = f"every fold is done: assemble the ensemble with `brainseg cv --run {parent_id}`"
            return out
        out.update(assemble(plan, ctx, done, parent_id, report_test=report_test, echo=echo))
        mlflow_runs.set_active_tags({STATE_TAG: "assembled", MODEL_TAG: out["model_uri"]})
        return out
