"""The boundary and lesion-wise figures in the per-patient table, the summary and score(): hand example."""

import math

import numpy as np
import pandas as pd
import pytest

from brainseg.evaluation.evaluate import score
from brainseg.evaluation.metrics import boundary_table, empty_baseline, patient_table, slice_table, summarize


def sq(y=2, x=2, size=3, shape=(10, 10)):
    mask = np.zeros(shape, bool)
    mask[y:y + size, x:x + size] = True
    return mask


E = np.zeros((10, 10), bool)
# Hand example, (patient, slice number, prediction, truth), slices deliberately out of order:
# A: perfect (HD95 0, NSD 1); B: the lesion missed (HD95 inf, NSD 0);
# C: empty truth, one false lesion (no tumor: out of the HD95 / NSD means, in the false-lesion rate);
# D: a 3x3x3 cube predicted one voxel to the right (HD95 1; NSD 1 at tolerance 1 and 2, ~0.660 at 0.5).
SLICES = [
    ("A", 2, sq(), sq()), ("A", 1, E, E), ("A", 3, sq(), sq()),
    ("B", 1, E, sq()), ("B", 2, E, E),
    ("C", 1, sq(5, 5), E), ("C", 2, E, E),
    ("D", 3, sq(x=3), sq()), ("D", 1, sq(x=3), sq()), ("D", 2, sq(x=3), sq()), ("D", 0, E, E), ("D", 4, E, E),
]
ONE_SHIFT_NSD_HALF = 1 - (math.sqrt(3) / 2 + 4 * math.sqrt(2) + 8) / (math.sqrt(3) + 12 * math.sqrt(2) + 24)


def _columns():
    patients, order, preds, truths = (list(c) for c in zip(*SLICES))
    return patients, order, preds, truths


@pytest.fixture
def tables():
    patients, order, preds, truths = _columns()
    return slice_table(patients, preds, truths), boundary_table(patients, preds, truths, order=order)


@pytest.mark.parametrize("column, expected", [
    ("hd95", [0.0, math.inf, math.inf, 1.0]),
    ("nsd", [1.0, 0.0, 0.0, 1.0]),
    ("lesions_true", [1, 1, 0, 1]),
    ("lesions_found", [1, 0, 0, 1]),
    ("lesions_missed", [0, 1, 0, 0]),
    ("lesions_false", [0, 0, 1, 0]),
    ("distance_unit", ["voxel"] * 4),
    ("nsd_tolerance", [2.0] * 4),
])
def test_patient_table_gains_the_boundary_columns(tables, column, expected):
    pt = patient_table(*tables)
    assert pt["patient"].tolist() == ["A", "B", "C", "D"]
    assert pt[column].tolist() == expected
    assert pt["volume_dice"].tolist()[:2] == [1.0, 0.0]  # Dice columns unchanged beside them


@pytest.mark.parametrize("key, expected", [
    ("hd95_mean", 0.5), ("hd95_median", 0.5),   # A and D: B's inf is left out ...
    ("n_patients_hd95", 2), ("n_patients_hd95_inf", 1),  # ... and counted; C has no tumor
    ("nsd_mean", 2 / 3), ("nsd_median", 1.0),   # A, B (0: nothing predicted), D
    ("lesion_detection_rate", 2 / 3), ("lesions_true", 3), ("lesions_found", 2), ("lesions_missed", 1),
    ("false_lesions_per_patient", 1 / 4), ("lesions_false", 1), ("n_patient_volumes", 4),
    ("nsd_tolerance", 2.0), ("distances_in_mm", 0.0),
    ("n_patients", 3),                         # the Dice figures are still there
])
def test_summary_has_the_boundary_figures_with_their_counts(tables, key, expected):
    assert summarize(*tables)[key] == pytest.approx(expected)


@pytest.mark.parametrize("key, expected", [
    ("hd95_mean", math.nan), ("n_patients_hd95", 0), ("n_patients_hd95_inf", 3),
    ("nsd_mean", 0.0), ("lesion_detection_rate", 0.0), ("lesions_missed", 3), ("false_lesions_per_patient", 0.0),
])
def test_the_empty_baseline_scores_no_boundary(tables, key, expected):
    value = empty_baseline(*tables)[key]
    assert math.isnan(value) if math.isnan(expected) else value == expected


def test_summary_without_a_boundary_table_is_dice_only(tables):
    assert not any(k.startswith(("hd95", "nsd", "lesion")) for k in summarize(tables[0]))
    assert "nsd_tolerance" not in empty_baseline(*tables)


def test_nsd_tolerance_is_stated_and_used():
    patients, order, preds, truths = _columns()
    d = boundary_table(patients, preds, truths, order=order, tolerance=0.5).set_index("patient").loc["D"]
    assert d["nsd"] == pytest.approx(ONE_SHIFT_NSD_HALF) and d["nsd_tolerance"] == 0.5


def test_slices_are_stacked_in_slice_order():
    """Lesions on slices 1 and 3 with slice 2 empty are two lesions; stacked as given (1, 3, 2), one."""
    truths = [sq(), sq(), E]
    stacked_in_order = boundary_table(["P"] * 3, truths, truths, order=[1, 3, 2])
    stacked_as_given = boundary_table(["P"] * 3, truths, truths)
    assert stacked_in_order["lesions_true"].item() == 2 and stacked_as_given["lesions_true"].item() == 1


@pytest.mark.parametrize("spacing, hd", [
    ((3.0, 1.0, 0.5), 0.5),           # one spacing for every patient, in mm
    ({"D": (3.0, 1.0, 2.0)}, 2.0),    # per patient
])
def test_spacing_in_mm(spacing, hd):
    patients, order, preds, truths = (c[7:] for c in _columns())   # patient D only
    table = boundary_table(patients, preds, truths, order=order, spacing=spacing)
    assert table["hd95"].item() == pytest.approx(hd) and table["distance_unit"].item() == "mm"
    assert summarize(slice_table(patients, preds, truths), table)["distances_in_mm"] == 1.0


def test_a_patient_without_spacing_is_named():
    patients, order, preds, truths = _columns()
    with pytest.raises(ValueError, match="no \\(z, y, x\\) spacing for patient B"):
        boundary_table(patients, preds, truths, order=order, spacing={"A": (1, 1, 1)})


def test_slices_of_different_shapes_are_named():
    with pytest.raises(ValueError, match="patient P: slices of different shapes"):
        boundary_table(["P", "P"], [E, np.zeros((4, 4), bool)], [E, np.zeros((4, 4), bool)])


def _manifest():
    patients, order, _, _ = _columns()
    return pd.DataFrame({"patient": patients, "patient_dir": [f"/d/{p}" for p in patients], "slice": order,
                         "image_path": [f"/d/{p}/{p}_{s}.tif" for p, s in zip(patients, order)]})


def test_score_reports_boundary_figures_beside_dice():
    _, _, preds, truths = _columns()
    result = score(_manifest(), preds, truths)
    assert result.patients.set_index("patient")["hd95"].to_dict() == {"A": 0.0, "B": math.inf, "C": math.inf,
                                                                      "D": 1.0}
    m = result.metrics()
    assert m["hd95_median"] == 0.5 and m["lesion_detection_rate"] == pytest.approx(2 / 3)
    assert m["baseline_empty_nsd_mean"] == 0.0 and m["patient_dice_mean"] == pytest.approx(result.summary[
        "patient_dice_mean"])
    assert "baseline_empty_nsd_tolerance" not in m


def test_score_without_boundary_is_what_the_candidate_loop_uses():
    _, _, preds, truths = _columns()
    with_boundary, without = score(_manifest(), preds, truths), score(_manifest(), preds, truths, boundary=False)
    assert "hd95" not in without.patients and "hd95_mean" not in without.metrics()
    assert {k: v for k, v in with_boundary.summary.items() if k in without.summary} == pytest.approx(without.summary)
