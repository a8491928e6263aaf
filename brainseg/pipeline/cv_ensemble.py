"""A finished cross-validation's second half: out-of-fold figures, the choices made on them, and the
fold ensemble as the deployed model (called by :func:`brainseg.pipeline.cv.run_cv` inside the parent run).

- Every non-test patient is segmented by the one fold model that never saw it (probabilities, with
  and without flip TTA); nothing of these patients steered that model (it kept its last epoch).
- TTA and post-processing are chosen on the pooled out-of-fold predictions (all non-test patients),
  each candidate reported with its bootstrap interval and its spread across folds.
- The out-of-fold figures under the chosen post-processing are the CV's headline (``cv_*``), with the
  spread of the per-fold means; the per-patient table (with each patient's fold) is an artifact.
- The k fold models become one network (:func:`brainseg.inference.ensemble.ensemble_model`), stored
  with the chosen settings and logged as the parent's segmenter model: served, predicted with and
  evaluated through the one inference path. The test patients are scored with it once (``test_*``,
  report only).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data.arrays import load_full_images, load_full_masks
from brainseg.data.context import DataContext
from brainseg.evaluation.crossval import choose_on_pooled, fold_spread, paired_difference
from brainseg.evaluation.evaluate import score
from brainseg.inference.ensemble import ensemble_model
from brainseg.inference.segmenter import InferenceSettings, Segmenter, final_masks, load_model_dir, save_model
from brainseg.registry import evidence, model_registry
from brainseg.tracking import mlflow_runs
from brainseg.tracking.run_context import CHOSEN_ON_TAG
from brainseg.training.training_run import report_on_test

CHOSEN_ON = "cv-oof"  # the CHOSEN_ON_TAG value: chosen on the pooled out-of-fold predictions


def out_of_fold(plan, ctx: DataContext, models: dict, base: InferenceSettings, echo=print) -> dict:
    """Each fold's held-out rows with its own model's probabilities (both TTA values), pooled in fold order."""
    parts = {"rows": [], "probs": {False: [], True: []}, "shapes": [], "boxes": [], "truths": []}
    for fold in plan.folds:
        rows = ctx.manifest[ctx.manifest["patient"].isin(fold.held_out)].reset_index(drop=True)
        model, cfg = models[fold.k]
        images = load_full_images(rows)
        seg = Segmenter(model, cfg, base)
        X, boxes = seg.prepare(images)
        for tta in (False, True):
            parts["probs"][tta].append(seg.with_settings(tta=tta).probs(X))
        parts["rows"].append(rows.assign(fold=fold.k))
        parts["shapes"] += [im.shape[:2] for im in images]
        parts["boxes"] += boxes
        parts["truths"] += load_full_masks(rows)
        echo(f"fold {fold.k}: out-of-fold probabilities of {len(fold.held_out)} patients ({len(rows)} slices)")
    return {"manifest": pd.concat(parts["rows"], ignore_index=True),
            "probs": {t: np.concatenate(v) for t, v in parts["probs"].items()},
            "shapes": parts["shapes"], "boxes": parts["boxes"], "truths": parts["truths"]}


def load_folds(done: dict[int, str]) -> dict:
    """{fold: (network, its Train)} from the fold runs' logged models."""
    out = {}
    for k, uri in sorted(done.items()):
        model, cfg, _ = load_model_dir(model_registry.resolve_model_dir(uri))
        out[k] = (model, cfg)
    return out


def assemble(plan, ctx: DataContext, done: dict[int, str], parent_id: str, *, report_test: bool = True,
             echo=print) -> dict:
    """In the active parent run: choose on the pooled out-of-fold predictions, log the CV figures,
    log the ensemble model; the test report last. Returns the figures and the model's URI."""
    models = load_folds(done)
    cfg = models[plan.folds[0].k][1]
    base = InferenceSettings.from_dict({**plan.settings.evaluate.given(), "threshold": cfg.threshold, "tta": False})
    oof = out_of_fold(plan, ctx, models, base, echo)
    manifest, groups = oof["manifest"], oof["manifest"]["patient"].tolist()
    folds = manifest.drop_duplicates("patient").set_index("patient")["fold"]
    chosen, table = base, None
    if plan.settings.evaluate.select_postprocessing:
        chosen, table = choose_on_pooled(manifest, oof["probs"], oof["shapes"], oof["boxes"], oof["truths"], base,
                                         folds)
        mlflow_runs.log_table(table, "cv_postprocessing_candidates.csv")
    masks = final_masks(oof["probs"][chosen.tta], oof["shapes"], oof["boxes"], chosen, groups)
    ev = score(manifest, masks, oof["truths"])
    plain = score(manifest, final_masks(oof["probs"][False], oof["shapes"], oof["boxes"], base, groups),
                  oof["truths"], boundary=False)
    gain = paired_difference(ev.patients, plain.patients)
    spread = fold_spread(ev.patients, folds)
    metrics = mlflow_runs.log_evaluation(ev, "cv_")
    extra = {f"cv_{k}": v for k, v in spread.items()}
    extra.update({f"cv_postprocessing_gain_{k}": v for k, v in gain.items()})
    mlflow_runs.log_active_metrics(extra)
    mlflow_runs.log_table(ev.patients.assign(fold=ev.patients["patient"].map(folds)), "cv_oof_patients.csv")
    mlflow_runs.set_active_tags({CHOSEN_ON_TAG: CHOSEN_ON, evidence.EVIDENCE_TAG: "cv",
                                 evidence.KEY_TAG: evidence.cv_key(ctx.version, folds.to_dict()),
                                 "brainseg.cv_folds": ",".join(str(f.k) for f in plan.folds)})
    mlflow_runs.log_params({f"inference.{k}": v for k, v in chosen.to_dict().items()})
    echo(f"out of fold ({metrics['n_patients']} patients): per-patient Dice {metrics['patient_dice_mean']:.3f} "
         f"mean / {metrics['patient_dice_median']:.3f} median (95% CI {metrics['patient_dice_ci_low']:.3f}-"
         f"{metrics['patient_dice_ci_high']:.3f}), fold means sd {spread['fold_dice_sd']:.3f}, "
         f"FP on empty slices {metrics['empty_slice_fp_rate']:.1%}; post-processing {chosen.to_dict()}")
    ensemble = Segmenter(ensemble_model([models[f.k][0] for f in plan.folds]), cfg, chosen)
    out = {"cv_" + k: v for k, v in metrics.items()}
    out.update(extra)
    out["inference"] = chosen.to_dict()
    if report_test:
        out.update(ensemble_test_report(ensemble, ctx, echo))
    example = load_full_images(ctx.manifest.head(1))[0]
    meta = {"data_version": ctx.version, "ensemble": {"members": len(plan.folds), "cv_run_id": parent_id,
                                                     "folds": [f.k for f in plan.folds], "evidence": "cv"}}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ensemble.model, cfg, chosen, Path(tmp), meta)
        out["model_uri"] = mlflow_runs.log_segmenter_model(Path(tmp), example, {"data_version": ctx.version})
    return out


def ensemble_test_report(segmenter: Segmenter, ctx: DataContext, echo=print) -> dict:
    """The ensemble on the test patients, once, after every choice (``test_*``: report only): the
    same report as a single training run's (:func:`brainseg.training.training_run.report_on_test`)."""
    out = report_on_test(segmenter, ctx)
    if out:
        echo(f"test (report only, {out['test_n_patients']} patients): per-patient Dice "
             f"{out['test_patient_dice_mean']:.3f} mean / {out['test_patient_dice_median']:.3f} median, "
             f"FP on empty slices {out['test_empty_slice_fp_rate']:.1%}")
    return out
