"""MLflow runs of an outcome comparison: a parent run "survival" with one nested run per candidate
(classifier x feature set x feature source), so the MLflow UI compares them side by side.

The parent is tagged with the pre-declared final candidate (``final_key``), never with "the best":
the final pipeline is chosen in params.yaml before scores are seen.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from brainseg.data.clinical import TARGET
from brainseg.outcome.cv import SCORES, SurvivalResult, calibration_figure, roc_figure
from brainseg.outcome.pyfunc import log_final_model
from brainseg.outcome.validate import build_spec
from brainseg.settings.config import Settings
from brainseg.tracking import mlflow_runs, run_context, run_metrics

METRIC_KEYS = tuple(f"{s}_{k}" for s in SCORES for k in ("mean", "std", "low", "high")) + (
    "baseline_roc_auc", "baseline_balanced_accuracy", "baseline_brier", "c_median", "patients", "positives")


def summary_row(r: SurvivalResult) -> dict:
    """One comparison row: candidate, then finite metrics."""
    return {"classifier": r.classifier, "feature_set": r.feature_set, "features_from": r.features_from,
            **{k: v for k, v in run_metrics.clean_metrics({k: r.cv[k] for k in METRIC_KEYS if k in r.cv}).items()}}


def _log_tables(tables: dict[str, pd.DataFrame]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, table in tables.items():
            table.to_csv(Path(tmp) / name, index=name == "oof_probability.csv")
            mlflow_runs.log_artifact(Path(tmp) / name)


def _log_result(result: SurvivalResult, y: pd.Series, settings_params: dict) -> None:
    cv = result.cv
    mlflow_runs.log_params({"classifier": result.classifier, "feature_set": result.feature_set,
                         "features_from": result.features_from, "folds": cv["folds"],
                         "folds_requested": cv["folds_requested"], "repeats": cv["repeats"], "seed": cv["seed"],
                         "n_features": len(result.columns), **settings_params})
    mlflow_runs.log_active_metrics(run_metrics.clean_metrics({k: cv[k] for k in METRIC_KEYS if k in cv}))
    prob = cv["oof_probability"]
    truth = y.loc[prob.index]
    mlflow_runs.log_figure(roc_figure(truth, prob.to_numpy()), "roc.png")
    mlflow_runs.log_figure(calibration_figure(truth, prob.to_numpy()), "calibration.png")
    _log_tables({"fold_scores.csv": cv["fold_scores"],
                 "oof_probability.csv": pd.DataFrame({TARGET: truth, "probability": prob})})
    if result.notes:
        mlflow_runs.log_text("\n".join(result.notes) + "\n", "notes.txt")


def log_comparison(results: Sequence[SurvivalResult], y: pd.Series, *, tags: dict, final_key: str,
                   join_report: dict | None = None, settings_params: dict | None = None,
                   run_name: str = "survival") -> dict:
    """Parent run + one nested run per result; returns {"parent_run_id", "runs": {key: run_id}}."""
    if not results:
        raise ValueError("no survival results to log")
    all_tags = {k: str(v) for k, v in tags.items()}
    runs = {}
    with mlflow_runs.run(run_name, all_tags, nested=mlflow_runs.active_run_id() is not None) as parent:
        if join_report is not None:
            mlflow_runs.log_dict(join_report, "join_report.json")
            mlflow_runs.log_active_metrics(run_metrics.clean_metrics({k: join_report.get(k) for k in (
                "clinical_patients", "imaging_patients", "matched", "excluded_missing_target",
                "patients", "positives")}))
        for result in results:
            with mlflow_runs.run(result.key, {**all_tags, "features_from": result.features_from},
                              nested=True) as child:
                _log_result(result, y, settings_params or {})
                runs[result.key] = child.info.run_id
        mlflow_runs.set_active_tags({"final": final_key, "final_run_id": runs.get(final_key, "")})
        summary = pd.DataFrame([summary_row(r) for r in results])
        mlflow_runs.log_text(summary.to_csv(index=False), "comparison.csv")
    return {"parent_run_id": parent.info.run_id, "runs": runs}


def log_fit(fit, settings: Settings, experiment: str) -> dict:
    """A :class:`brainseg.outcome.workflow.SurvivalFit` as MLflow records: the comparison (a parent
    run, one nested run per candidate) and the final pipeline as a model; their run ids and URI."""
    sv = settings.survival
    final = fit.final
    evidence = {"cv_roc_auc": final.cv["roc_auc_mean"], "cv_n_patients": final.cv["patients"],
                "data_version": fit.data_version, "fitted_on": fit.fitted_on, "features_from": fit.features_from}
    tags = {**run_context.lineage_tags(fit.data_version, settings.profile), "features_from": fit.features_from,
            "fitted_on": fit.fitted_on}
    mlflow_runs.set_experiment(experiment)
    logged = log_comparison(fit.results, fit.y, tags=tags, final_key=final.key, join_report=fit.join,
                            settings_params={"inner_folds": sv.inner_folds, "min_frequency": sv.min_frequency})
    spec = build_spec(fit.X, final.columns, sv.min_known_fraction)
    run_id, model_uri = log_final_model(
        fit.pipeline, fit.X, spec, evidence,
        tags={**tags, "final": "true", "mlflow.parentRunId": logged["parent_run_id"]},
        params={"classifier": final.classifier, "feature_set": final.feature_set, "features_from": fit.features_from},
        extra_json={"notes": fit.notes, "permutation_importance": fit.importance.to_dict("records")})
    return {"final_run_id": run_id, "final_model_uri": model_uri, "parent_run_id": logged["parent_run_id"]}
