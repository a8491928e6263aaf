"""What a study's result rests on: whether its top configurations differ beyond the noise of the
validation patients, and the cross-validated refit (``tune.refit: cv``).

A study compares trials on the validation patients only (13 on the real data, about +-0.05 on a mean
per-patient Dice), so its best trial may be best by chance. :func:`top_two_noise` says so in the
summary. With ``tune.refit: cv`` the best configuration is not retrained once on the training
patients but cross-validated (:func:`brainseg.pipeline.cv.run_cv`): its evidence is then out of fold
and its model the fold ensemble, registered like any refit.
"""

from __future__ import annotations

import pandas as pd

from brainseg.data.context import DataContext
from brainseg.evaluation.crossval import paired_difference
from brainseg.pipeline.cv import run_cv
from brainseg.registry import model_registry
from brainseg.registry.promotion import register_segmenter
from brainseg.settings.config import Settings
from brainseg.tracking import mlflow_runs, search

PER_PATIENT = "val_per_patient_metrics.csv"


def top_two_noise(experiment: str, parent: str) -> dict | None:
    """The best two finished trials of study run ``parent``: the paired per-patient Dice difference on
    the validation patients and whether its 95% bootstrap interval holds 0 (``within_noise``)."""
    trials = [r for r in search.runs_tagged(experiment, {"mlflow.parentRunId": parent}) if r.status == "FINISHED"
              and "best_val_patient_dice" in r.metrics and r.tags.get("brainseg.role") != "refit"]
    trials.sort(key=lambda r: r.metrics["best_val_patient_dice"], reverse=True)
    if len(trials) < 2:
        return None
    tables = []
    for r in trials[:2]:
        try:
            tables.append(pd.read_csv(model_registry.resolve_model_dir(f"runs:/{r.run_id}/{PER_PATIENT}")))
        except (FileNotFoundError, ValueError):
            return None
    d = paired_difference(*tables)
    return {"runs": [r.run_id for r in trials[:2]], **d,
            "within_noise": bool(d["diff_ci_low"] <= 0 <= d["diff_ci_high"])}


def noise_line(noise: dict | None) -> str | None:
    if not noise:
        return None
    verdict = ("within the noise of the validation patients: the study cannot tell them apart"
               if noise["within_noise"] else "beyond the noise of the validation patients")
    return (f"the top two trials differ by {noise['diff_mean']:+.3f} per-patient Dice on {noise['n_patients']} "
            f"validation patients (95% CI {noise['diff_ci_low']:+.3f} to {noise['diff_ci_high']:+.3f}): {verdict}")


def refit_cv(settings: Settings, ctx: DataContext, experiment: str, summary: dict, register: bool, echo=print) -> dict:
    """``tune.refit: cv``: cross-validate the best trial's configuration (the recipe's schedule and
    ``cv.budget_minutes``), log the fold ensemble, register it if asked; linked to the study's run."""
    from brainseg.tune.space import apply_params  # Optuna: only a study pays for it

    params = summary.get("best_params") or {}
    cv_settings = settings.with_changes(train=apply_params(settings.train.model_dump(), params))
    echo(f"refit (cross-validated): trial {summary.get('best_trial')}'s configuration, {params}")
    res = run_cv(cv_settings, ctx, experiment, echo=echo)
    parent = summary.get("parent_run_id")
    if parent:
        mlflow_runs.set_tags(parent, {"refit_cv_run_id": res["run_id"], "refit_model_uri": res.get("model_uri", "")})
    out = {"run_id": res["run_id"], "model_uri": res.get("model_uri"), "kind": "cv",
           **{k: v for k, v in res.items() if k.startswith(("cv_patient", "cv_fold_dice_sd", "test_patient"))}}
    if register and res.get("model_uri"):
        out["registered"] = register_segmenter(settings, ctx, res["run_id"], res["model_uri"])
    return out
