"""`brainseg predict` on slice files (issue 35, leftover): the physical columns are there and empty
(slice files carry no spacing: never pixel counts presented as mm), and one line says why."""

from __future__ import annotations

import pandas as pd

from brainseg.data.synth import generate
from brainseg.outcome.physical import PHYSICAL_PATIENT_COLUMNS, PHYSICAL_SLICE_COLUMNS
from brainseg.pipeline.predict import SPACING_UNKNOWN
from helpers import invoke_flat, threshold_model


def test_slice_files_get_null_physical_columns_and_one_line_saying_why(tmp_path):

    model = threshold_model(tmp_path / "model")
    root = generate(tmp_path / "kaggle_3m", patients=2, slices=4, size=64, seed=3)
    code, output = invoke_flat("predict", root, "--out", tmp_path / "out", "--model", model)
    assert code == 0, output
    assert output.count(" ".join(SPACING_UNKNOWN.split())) == 1
    slices = pd.read_csv(tmp_path / "out" / "features.csv")
    patients = pd.read_csv(tmp_path / "out" / "patients.csv")
    assert len(slices) == 8 and slices["area_px"].sum() > 0  # there is tumour in pixels ...
    assert slices[PHYSICAL_SLICE_COLUMNS].isna().all().all()  # ... and none in mm
    assert len(patients) == 2 and patients[PHYSICAL_PATIENT_COLUMNS].isna().all().all()
    assert set(patients["spacing_mm"]) == {"unknown"}
