"""Client side of the served outcome model: its input from predicted features and data.csv.

Used by ``brainseg predict --survival`` and the web page. The model's answer (see
:mod:`brainseg.outcome.pyfunc`) carries its evidence (CV ROC-AUC, patients, data version,
``fitted_on``) and a ``status``; callers show the probability only with them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from brainseg.data.clinical import ID, read_clinical


def find_clinical(files: list[Path]) -> Path | None:
    """The nearest data.csv above the slice files (the public layout keeps it beside the patient folders)."""
    for f in files:
        for parent in list(f.parents)[:3]:
            if (parent / "data.csv").is_file():
                return parent / "data.csv"
    return None


def _code_text(v) -> str | None:
    """A data.csv code cell as the model's string code (``2.0`` -> ``"2"``), None when missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return str(int(v)) if float(v).is_integer() else str(v)


def model_inputs(model, patients: pd.DataFrame, clinical_csv: Path | None) -> pd.DataFrame:
    """The model's input columns for each patient (index: patient): imaging features joined with
    data.csv; code columns as strings, the others float; None / NaN where unknown."""
    schema = model.metadata.get_input_schema()
    frame = patients.set_index("patient")
    if clinical_csv is not None:
        frame = frame.join(read_clinical(clinical_csv).rename_axis("patient"), how="left", rsuffix="_clinical")
    out = pd.DataFrame(index=frame.index)
    for spec in schema.inputs:
        values = frame[spec.name] if spec.name in frame.columns else pd.Series(float("nan"), index=frame.index)
        if getattr(spec.type, "name", None) == "string":  # numbers are typed Any (outcome/pyfunc.py)
            out[spec.name] = pd.Series([_code_text(v) for v in values], index=frame.index, dtype=object)
        else:
            out[spec.name] = pd.to_numeric(values, errors="coerce").astype(float)
    return out


def load(model_uri: str):
    """Load a survival pyfunc, or FileNotFoundError naming the URI."""
    from brainseg.registry import model_registry

    try:
        return model_registry.load_pyfunc(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for an unknown model
        raise FileNotFoundError(f"survival model {model_uri!r}: cannot be loaded ({exc})") from exc


def survival_probabilities(model_uri: str, patients: pd.DataFrame, clinical_csv: Path | None,
                           files: list[Path]) -> pd.DataFrame:
    """``patient`` + the model's answer columns (probability, class, status, evidence) +
    ``clinical_source``, one row per patient."""
    model = load(model_uri)
    clinical_csv = clinical_csv or find_clinical(files)
    X = model_inputs(model, patients, clinical_csv)
    try:
        out = pd.DataFrame(model.predict(X))
    except Exception as exc:  # noqa: BLE001 - MlflowException (a refused value) and schema errors
        raise ValueError(f"survival model refused the input: {getattr(exc, 'message', exc)}") from exc
    out.index = X.index
    out = out.rename_axis("patient").reset_index()
    out["clinical_source"] = str(clinical_csv) if clinical_csv else "none (no data.csv found)"
    return out.rename(columns={ID: "patient"})
