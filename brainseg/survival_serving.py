"""Survival predictions at prediction time: per-patient features from predicted masks + data.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data.clinical import ID, read_clinical


def find_clinical(files: list[Path]) -> Path | None:
    """The nearest data.csv above the slice files (the public layout keeps it beside the patient folders)."""
    for f in files:
        for parent in list(f.parents)[:3]:
            if (parent / "data.csv").is_file():
                return parent / "data.csv"
    return None


def model_inputs(model, patients: pd.DataFrame, clinical_csv: Path | None) -> pd.DataFrame:
    """The model's input columns for each patient: imaging features joined with data.csv (NaN where unknown)."""
    names = model.metadata.get_input_schema().input_names()
    frame = patients.set_index("patient")
    if clinical_csv is not None:
        frame = frame.join(read_clinical(clinical_csv).rename_axis("patient"), how="left", rsuffix="_clinical")
    for name in names:
        if name not in frame.columns:
            frame[name] = np.nan
    return frame[names].astype(float)


def survival_probabilities(model_uri: str, patients: pd.DataFrame, clinical_csv: Path | None,
                           files: list[Path]) -> pd.DataFrame:
    """``patient``, ``death01_probability``, ``death01_class`` from the survival model."""
    import mlflow

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for an unknown model
        raise FileNotFoundError(f"survival model {model_uri!r}: cannot be loaded ({exc})") from exc
    clinical_csv = clinical_csv or find_clinical(files)
    X = model_inputs(model, patients, clinical_csv)
    out = model.predict(X)
    out = pd.DataFrame(out, index=X.index).reset_index().rename(columns={"index": "patient"})
    out["clinical_source"] = str(clinical_csv) if clinical_csv else "none (imaging only, clinical imputed)"
    return out.rename(columns={ID: "patient"})
