"""The served outcome model (``brainseg-survival``): an ``mlflow.pyfunc`` model, and how it is logged.

The contract (shared with predict's patients.csv and the web page):

Input: one row per patient. Every column is optional (none is required by the signature):

- integer code columns of data.csv (``RNASeqCluster`` ... ``ethnicity``, ``neoplasm_histologic_grade``)
  typed ``string``: send the code as a string of digits (``"2"``; a JSON integer is accepted too),
  ``null`` when unknown. Only codes seen in training are accepted.
- ``age_at_initial_pathologic`` (a number, years, 0-120) and the per-patient imaging features of
  :mod:`brainseg.outcome.features` (numbers, >= 0), ``null`` when unknown. The signature types
  these columns ``Any``: with ``double`` MLflow would cast what was sent before the model sees it
  (a JSON ``true`` became an age of 1.0 year, ``"42"`` the number 42); so the model's own check
  (:mod:`brainseg.outcome.validate`) sees the value as sent and refuses a boolean or a text by name.

Columns the model does not use are dropped by MLflow before the model sees them. Which columns a
given version uses is its signature (``columns`` in ``survival_model.json``).

Output: one row per input row, in order:

- ``death01_probability`` (double or null): P(death01 = 1), a calibrated-by-design probability.
- ``death01_class`` (long or null): 1 when the probability reaches the training prevalence.
- ``status``: ``ok``, or ``insufficient_data`` when the row has too few known fields (probability
  and class are then null, never a confident guess); ``message`` says what is missing, and on an
  ``ok`` row names the fields that were unknown (null, NaN or absent) and imputed.
- evidence, the same on every row: ``cv_roc_auc`` (mean cross-validated ROC-AUC of this pipeline),
  ``cv_n_patients`` (patients it was cross-validated and fitted on), ``data_version`` (of the
  training data), ``fitted_on`` (``real`` or ``synthetic``: whether the training data was the
  synthetic generator's output), ``features_from`` (which masks the training imaging features came
  from: ``oof_predicted`` or ``truth``).

A value of the wrong type, out of range, or an unseen code is refused with an MLflow
INVALID_PARAMETER_VALUE error (HTTP 400) naming the column and the row; an error the model did not
foresee is logged by the server and answered with a generic HTTP 500
(:func:`brainseg.serving.pyfunc.http_errors`); never a stack trace.
All answers are strict JSON (null, never NaN).
"""

from __future__ import annotations

import json
import math
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import AnyType
from sklearn.pipeline import Pipeline

import brainseg
from brainseg.data.clinical import TARGET
from brainseg.outcome.validate import InputSpec, InvalidInput, check_frame, unknown_fields
from brainseg.serving.pyfunc import http_errors
from brainseg.tracking import run_notes

PROBABILITY, CLASS = f"{TARGET}_probability", f"{TARGET}_class"
EVIDENCE = ("cv_roc_auc", "cv_n_patients", "data_version", "fitted_on", "features_from")
OUTPUT_COLUMNS = (PROBABILITY, CLASS, "status", "message") + EVIDENCE
OK, INSUFFICIENT = "ok", "insufficient_data"
FITTED_ON = ("real", "synthetic")


def _unknown_note(columns: list[str]) -> str:
    return f"unknown, imputed: {', '.join(columns)}" if columns else ""


def _none_if_nan(v):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


class SurvivalModel(mlflow.pyfunc.PythonModel):
    """The fitted pipeline, its input spec and its evidence (``EVIDENCE`` keys)."""

    def __init__(self, pipeline: Pipeline, spec: InputSpec, evidence: dict):
        missing = [k for k in EVIDENCE if k not in evidence]
        if missing:
            raise ValueError(f"evidence lacks {', '.join(missing)}")
        if evidence["fitted_on"] not in FITTED_ON:
            raise ValueError(f"fitted_on must be one of {FITTED_ON}, got {evidence['fitted_on']!r}")
        self.pipeline, self.spec, self.evidence = pipeline, spec, dict(evidence)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        with http_errors(InvalidInput):  # a 400 whose message begins with the reason; never a traceback
            return self._predict(model_input)

    def _predict(self, model_input) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        X, reasons = check_frame(frame.reset_index(drop=True), self.spec)
        n = len(X)
        prob = [None] * n
        ok = [i for i, why in enumerate(reasons) if why is None]
        if ok:
            p = self.pipeline.predict_proba(X.iloc[ok])[:, 1]
            for i, v in zip(ok, p):
                prob[i] = float(v)
        threshold = self.pipeline[-1].threshold_
        out = pd.DataFrame({
            PROBABILITY: pd.Series(prob, dtype=object),
            CLASS: pd.Series([None if p is None else int(p >= threshold) for p in prob], dtype=object),
            "status": [OK if why is None else INSUFFICIENT for why in reasons],
            "message": [why or _unknown_note(cols) for why, cols in zip(reasons, unknown_fields(X))],
        })
        for key in EVIDENCE:
            out[key] = pd.Series([_none_if_nan(self.evidence[key])] * n, dtype=object)
        return out[list(OUTPUT_COLUMNS)]


def signature(spec: InputSpec) -> ModelSignature:
    """Codes ``string``, numbers ``Any`` (checked by the model as sent, see the module doc), every
    input optional."""
    inputs = [ColSpec(DataType.string if c in spec.codes else AnyType(), c, required=False) for c in spec.columns]
    outputs = [ColSpec(DataType.double, PROBABILITY, required=False), ColSpec(DataType.long, CLASS, required=False),
               ColSpec(DataType.string, "status"), ColSpec(DataType.string, "message"),
               ColSpec(DataType.double, "cv_roc_auc", required=False), ColSpec(DataType.long, "cv_n_patients"),
               ColSpec(DataType.string, "data_version"), ColSpec(DataType.string, "fitted_on"),
               ColSpec(DataType.string, "features_from")]
    return ModelSignature(Schema(inputs), Schema(outputs))


def example_input(X: pd.DataFrame, spec: InputSpec) -> pd.DataFrame:
    """A made-up two-row example (no patient's row is stored with the model): the training
    medians / most common codes, then the same row with its second half unknown."""
    row = {}
    for c in spec.columns:
        if c in spec.codes:
            mode = X[c].mode()
            row[c] = str(int(mode.iloc[0])) if len(mode) else None
        else:
            med = X[c].median()
            row[c] = None if pd.isna(med) else float(med)
    second = {c: (v if i < len(spec.columns) // 2 else None) for i, (c, v) in enumerate(row.items())}
    return pd.DataFrame([row, second], columns=spec.columns)


def requirements() -> list[str]:
    return [f"{p}=={package_version(p)}" for p in ("mlflow", "scikit-learn", "pandas", "numpy", "scipy",
                                                   "scikit-image", "matplotlib", "cloudpickle")]


def log_final_model(pipeline: Pipeline, X: pd.DataFrame, spec: InputSpec, evidence: dict, *,
                    run_id: str | None = None, tags: dict | None = None, params: dict | None = None,
                    extra_json: dict | None = None) -> tuple[str, str]:
    """Log the fitted pipeline as pyfunc ``model``; returns (run_id, model_uri).

    Logs into ``run_id`` when given, else a new run "survival-final" (nested when a run is active)
    with its description (the run note, :func:`brainseg.tracking.mlflow_runs.with_note`).
    The brainseg package goes in ``code_paths`` so the pickled pipeline loads without it installed.
    ``survival_model.json`` holds the spec, the evidence and ``extra_json`` (importances, notes).
    """
    model = SurvivalModel(pipeline, spec, evidence)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    kwargs = ({"run_id": run_id} if run_id else
              {"run_name": "survival-final", "nested": mlflow.active_run() is not None})
    with mlflow.start_run(**kwargs, tags=tags if run_id else run_notes.with_note("survival-final", tags)) as run:
        if params:
            mlflow.log_params(params)
        doc = {"spec": spec.to_dict(), "evidence": evidence, "threshold": pipeline[-1].threshold_,
               **(extra_json or {})}
        mlflow.log_text(json.dumps(doc, indent=1, default=_json_default), "survival_model.json")
        info = mlflow.pyfunc.log_model(
            name="model", python_model=model, signature=signature(spec), input_example=example_input(X, spec),
            code_paths=[str(Path(brainseg.__file__).parent)], pip_requirements=requirements())
    return run.info.run_id, info.model_uri


def _json_default(v):
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return str(v)
