"""MLflow glue for the outcome model: one run per classifier x feature set, and the served model.

The runs are children of one parent run ("survival") so the MLflow UI compares them; the parent
holds the join report and is tagged with the best child. The final model is a pyfunc whose
``predict`` returns ``death01_probability`` and ``death01_class`` for a frame of feature columns.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from sklearn.pipeline import Pipeline

import brainseg
from brainseg.data.clinical import TARGET
from brainseg.survival import SurvivalResult, best_result, calibration_figure, roc_figure

METRIC_KEYS = ("roc_auc_mean", "roc_auc_std", "roc_auc_ci_low", "roc_auc_ci_high",
               "balanced_accuracy", "brier", "baseline_roc_auc", "baseline_balanced_accuracy",
               "baseline_brier", "patients", "positives")
PROBABILITY = f"{TARGET}_probability"
CLASS = f"{TARGET}_class"


def _finite(d: dict, keys: Sequence[str]) -> dict[str, float]:
    return {k: float(d[k]) for k in keys if k in d and math.isfinite(float(d[k]))}


def _log_result(result: SurvivalResult, *, features_from: str, knn_neighbors: int) -> None:
    cv = result.cv
    mlflow.log_params({"classifier": result.classifier, "feature_set": result.feature_set,
                       "folds": cv["folds"], "folds_requested": cv["folds_requested"],
                       "repeats": cv["repeats"], "seed": cv["seed"], "features_from": features_from,
                       "knn_neighbors": knn_neighbors, "n_features": len(result.columns)})
    mlflow.log_metrics(_finite(cv, METRIC_KEYS))
    y, prob = result.y.loc[cv["oof_probability"].index], cv["oof_probability"].to_numpy()
    mlflow.log_figure(roc_figure(y, prob), "roc.png")
    mlflow.log_figure(calibration_figure(y, prob), "calibration.png")
    with tempfile.TemporaryDirectory() as tmp:
        importances = result.importances.rename_axis("feature").reset_index()
        tables = {"feature_importances.csv": importances,
                  "fold_scores.csv": cv["fold_scores"],
                  "oof_probability.csv": pd.DataFrame({TARGET: y, "probability": prob})}
        for name, table in tables.items():
            table.to_csv(Path(tmp) / name, index=name == "oof_probability.csv")
            mlflow.log_artifact(str(Path(tmp) / name))
    if result.notes:
        mlflow.log_text("\n".join(result.notes) + "\n", "notes.txt")


def log_survival_runs(results: Sequence[SurvivalResult], *, features_from: str, tags: dict,
                      join_report: dict | None = None, knn_neighbors: int = 4,
                      run_name: str = "survival") -> dict:
    """Log a parent run with one nested run per result; returns the run ids and the best pair.

    ``features_from`` says which masks the imaging features came from (``truth`` or a model run
    id); it is a param and a tag of every run. ``tags`` (lineage) go on every run.
    Returns {"parent_run_id", "runs": {"<classifier>/<feature_set>": run_id}, "best": that key}.
    """
    if not results:
        raise ValueError("no survival results to log")
    all_tags = {**{k: str(v) for k, v in tags.items()}, "features_from": features_from}
    runs = {}
    with mlflow.start_run(run_name=run_name, tags=all_tags,
                          nested=mlflow.active_run() is not None) as parent:
        if join_report is not None:
            mlflow.log_dict(join_report, "join_report.json")
            mlflow.log_metrics(_finite(join_report, ("clinical_patients", "imaging_patients",
                                                     "matched", "excluded_missing_target",
                                                     "patients", "positives")))
        for result in results:
            key = f"{result.classifier}/{result.feature_set}"
            with mlflow.start_run(run_name=key, nested=True, tags=all_tags) as child:
                _log_result(result, features_from=features_from, knn_neighbors=knn_neighbors)
                runs[key] = child.info.run_id
        best = best_result(results)
        best_key = f"{best.classifier}/{best.feature_set}"
        mlflow.set_tags({"best_run_id": runs[best_key], "best": best_key})
        mlflow.log_metric("best_roc_auc_mean", best.cv["roc_auc_mean"])
        summary = pd.DataFrame([{"classifier": r.classifier, "feature_set": r.feature_set,
                                 **_finite(r.cv, METRIC_KEYS)} for r in results])
        mlflow.log_text(summary.to_csv(index=False), "comparison.csv")
    return {"parent_run_id": parent.info.run_id, "runs": runs, "best": best_key}


class SurvivalModel(mlflow.pyfunc.PythonModel):
    """Served outcome model: a frame of feature columns (NaN allowed, imputed) ->
    ``death01_probability`` (float in [0, 1]) and ``death01_class`` (0/1, probability >= threshold).
    """

    def __init__(self, pipeline: Pipeline, columns: Sequence[str], threshold: float = 0.5):
        self.pipeline = pipeline
        self.columns = list(columns)
        self.threshold = threshold

    def predict(self, context, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"input lacks feature column(s): {', '.join(missing)}")
        prob = self.pipeline.predict_proba(frame[self.columns].astype(float))[:, 1]
        return pd.DataFrame({PROBABILITY: prob, CLASS: (prob >= self.threshold).astype(np.int64)},
                            index=frame.index)


def log_final_model(pipeline: Pipeline, X_example: pd.DataFrame, *, columns: Sequence[str],
                    run_id: str | None = None, tags: dict | None = None, threshold: float = 0.5,
                    registered_model_name: str | None = None,
                    params: dict | None = None) -> tuple[str, str]:
    """Log a fitted pipeline as a pyfunc model named ``model``; returns (run_id, model_uri).

    Logs into ``run_id`` when given, else into a new run "survival-final" (nested when a run is
    active). The signature takes
    ``columns`` as float (NaN allowed) and returns the two columns of :class:`SurvivalModel`.
    The brainseg package is shipped in ``code_paths`` so the pickled pipeline (its
    SelectColumns / RoundCodes steps) loads where brainseg is not installed.
    """
    columns = list(columns)
    X = X_example[columns].astype(float)
    model = SurvivalModel(pipeline, columns, threshold)
    with warnings.catch_warnings():  # the int warning concerns death01_class, never missing
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        signature = infer_signature(X, model.predict(None, X))
    package_dir = str(Path(brainseg.__file__).parent)
    kwargs = ({"run_id": run_id} if run_id else
              {"run_name": "survival-final", "nested": mlflow.active_run() is not None})
    with mlflow.start_run(**kwargs, tags={k: str(v) for k, v in (tags or {}).items()}) as run:
        if params:
            mlflow.log_params(params)
        mlflow.log_text(json.dumps({"columns": columns, "threshold": threshold}, indent=1),
                        "survival_model.json")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=model, signature=signature, input_example=X.head(3),
            code_paths=[package_dir], registered_model_name=registered_model_name,
            pip_requirements=_requirements())
    return run.info.run_id, info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version
    return [f"{p}=={version(p)}" for p in ("mlflow", "scikit-learn", "pandas", "numpy",
                                            "scipy", "scikit-image", "matplotlib",
                                            "cloudpickle")]
