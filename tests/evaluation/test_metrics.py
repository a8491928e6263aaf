"""Metrics on tiny hand-computed arrays: the empty-mask policy made explicit."""

import math

import numpy as np
import pandas as pd
import pytest

from brainseg.evaluation.metrics import (
    confusion,
    dice_from_counts,
    empty_baseline,
    iou_from_counts,
    patient_table,
    slice_table,
    smoothed_slice_dice,
    summarize,
)


def b(*bits):
    return np.array(bits, bool)


@pytest.mark.parametrize("pred, truth, expected", [
    (b(1, 1, 0, 0), b(1, 0, 1, 0), (1, 1, 1)),
    (b(0, 0, 0, 0), b(0, 0, 0, 0), (0, 0, 0)),
    (b(1, 1, 1, 1), b(0, 0, 0, 0), (0, 4, 0)),
    (b(0, 0, 0, 0), b(1, 1, 0, 0), (0, 0, 2)),
    (b(1, 1, 0, 0), b(1, 1, 0, 0), (2, 0, 0)),
    (np.array([[1, 0], [1, 1]], bool), np.array([[1, 1], [0, 1]], bool), (2, 1, 1)),
    (np.array([0, 3, 0, 255]), np.array([0, 1, 1, 0]), (1, 1, 1)),  # non-zero counts as true
])
def test_confusion(pred, truth, expected):
    assert confusion(pred, truth) == expected


def test_confusion_shape_mismatch():
    with pytest.raises(ValueError, match=r"prediction shape \(3,\) != truth shape \(4,\)"):
        confusion(b(1, 0, 0), b(1, 0, 0, 0))


@pytest.mark.parametrize("counts, dice, iou", [
    ((1, 1, 1), 0.5, 1 / 3),
    ((5, 0, 0), 1.0, 1.0),
    ((0, 3, 0), 0.0, 0.0),     # prediction on an empty truth
    ((0, 0, 3), 0.0, 0.0),     # missed tumor
    ((2, 1, 1), 4 / 6, 0.5),
    ((3, 0, 1), 6 / 7, 3 / 4),
])
def test_dice_iou_from_counts(counts, dice, iou):
    assert dice_from_counts(*counts) == pytest.approx(dice)
    assert iou_from_counts(*counts) == pytest.approx(iou)


def test_empty_vs_empty_is_nan_never_one():
    assert math.isnan(dice_from_counts(0, 0, 0))
    assert math.isnan(iou_from_counts(0, 0, 0))


# Hand example. Patient A: tp 2+2, fp 1, fn 2 -> volume Dice 8/11, IoU 4/7.
# Patient B: misses a 3-pixel tumor, 1 false pixel on an empty slice -> Dice 0.
# Patient C: empty truth, 1 false pixel on one of its two slices -> left out of the Dice means.
E = b(0, 0, 0, 0, 0, 0)
SLICES = [  # patient, prediction, truth
    ("A", b(1, 1, 0, 0, 1, 0), b(1, 1, 1, 1, 0, 0)),  # tp 2 fp 1 fn 2, slice Dice 4/7
    ("A", b(0, 0, 1, 1, 0, 0), b(0, 0, 1, 1, 0, 0)),  # tp 2,          slice Dice 1
    ("A", E, E),                                      # empty, no false positive
    ("B", E, b(1, 1, 1, 0, 0, 0)),                    # fn 3,          slice Dice 0
    ("B", b(0, 0, 0, 0, 0, 1), E),                    # empty, false positive
    ("C", b(1, 0, 0, 0, 0, 0), E),                    # empty, false positive
    ("C", E, E),                                      # empty, no false positive
]


@pytest.fixture
def table():
    patients, preds, truths = zip(*SLICES)
    return slice_table(list(patients), list(preds), list(truths))


def test_slice_table(table):
    assert table[["tp", "fp", "fn", "truth_px", "pred_px"]].values.tolist() == [
        [2, 1, 2, 4, 3], [2, 0, 0, 2, 2], [0, 0, 0, 0, 0], [0, 0, 3, 3, 0],
        [0, 1, 0, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 0, 0]]


def test_patient_table(table):
    pt = patient_table(table).set_index("patient")
    assert pt["slices"].tolist() == [3, 2, 2]
    assert pt["tumor_slices"].tolist() == [2, 1, 0]
    assert pt["empty_slices"].tolist() == [1, 1, 2]
    assert pt["fp_empty_slices"].tolist() == [0, 1, 1]
    assert pt.loc["A", "volume_dice"] == pytest.approx(8 / 11)
    assert pt.loc["A", "volume_iou"] == pytest.approx(4 / 7)
    assert pt.loc["A", "tumor_slice_dice"] == pytest.approx((4 / 7 + 1) / 2)
    assert pt.loc["B", "volume_dice"] == 0 and pt.loc["B", "tumor_slice_dice"] == 0
    assert math.isnan(pt.loc["C", "volume_dice"]) and math.isnan(pt.loc["C", "tumor_slice_dice"])


@pytest.mark.parametrize("key, expected", [
    ("patient_dice_mean", (8 / 11 + 0) / 2),
    ("patient_dice_median", (8 / 11 + 0) / 2),
    ("patient_iou_mean", (4 / 7 + 0) / 2),
    ("n_patients", 2),                     # C (empty truth) left out ...
    ("n_patients_empty_truth", 1),         # ... and counted
    ("tumor_slice_dice_mean", (4 / 7 + 1 + 0) / 3),
    ("n_tumor_slices", 3),
    ("empty_slice_fp_rate", 2 / 4),        # B's and C's false pixels, of 4 empty slices
    ("n_empty_slices", 4),
    ("global_dice", 2 * 4 / (2 * 4 + 3 + 5)),
    ("global_iou", 4 / (4 + 3 + 5)),
    ("n_slices", 7),
])
def test_summarize_hand_example(table, key, expected):
    assert summarize(table)[key] == pytest.approx(expected)


def test_patient_with_empty_truth_does_not_change_the_dice_mean(table):
    without_c = table[table["patient"] != "C"]
    assert summarize(without_c)["patient_dice_mean"] == summarize(table)["patient_dice_mean"]
    assert summarize(without_c)["n_patients_empty_truth"] == 0
    assert summarize(without_c)["empty_slice_fp_rate"] == pytest.approx(1 / 2)


@pytest.mark.parametrize("key, expected", [
    ("patient_dice_mean", 0.0), ("patient_dice_median", 0.0), ("patient_iou_mean", 0.0),
    ("tumor_slice_dice_mean", 0.0), ("empty_slice_fp_rate", 0.0), ("global_dice", 0.0),
    ("n_patients", 2), ("n_patients_empty_truth", 1), ("n_empty_slices", 4), ("n_slices", 7),
])
def test_empty_baseline(table, key, expected):
    assert empty_baseline(table)[key] == expected


def null_predictor(slices: pd.DataFrame) -> pd.DataFrame:
    return slices.assign(tp=0, fp=0, fn=slices["truth_px"], pred_px=0)


def test_smoothed_slice_dice_of_the_empty_predictor_is_the_share_of_empty_slices(table):
    null = null_predictor(table)
    assert smoothed_slice_dice(null, smooth=1e-9) == pytest.approx(4 / 7)
    # with smooth=1 each tumor slice adds 1 / (truth_px + 1): here truths of 4, 2 and 3 pixels
    assert smoothed_slice_dice(null) == pytest.approx((4 + 1 / 5 + 1 / 3 + 1 / 4) / 7)


def test_smoothed_slice_dice_flatters_on_realistic_masks():
    # 65 % empty slices, tumors of a few hundred pixels: the never-tumor model scores about 0.65
    truth_px = [0] * 13 + [300, 450, 800, 120, 600, 250, 900]
    slices = pd.DataFrame({"patient": "P", "tp": 0, "fp": 0, "fn": truth_px,
                           "truth_px": truth_px, "pred_px": 0})
    assert smoothed_slice_dice(slices) == pytest.approx(13 / 20, abs=0.005)
    assert summarize(slices)["patient_dice_mean"] == 0.0


def test_perfect_prediction(table):
    perfect = table.assign(tp=table["truth_px"], fp=0, fn=0, pred_px=table["truth_px"])
    m = summarize(perfect)
    assert m["patient_dice_mean"] == 1.0 and m["tumor_slice_dice_mean"] == 1.0
    assert m["empty_slice_fp_rate"] == 0.0 and m["global_dice"] == 1.0
    assert smoothed_slice_dice(perfect) == 1.0


def test_no_tumor_anywhere_gives_nan_means_with_zero_counts():
    slices = pd.DataFrame({"patient": ["P", "P"], "tp": [0, 0], "fp": [0, 2], "fn": [0, 0],
                           "truth_px": [0, 0], "pred_px": [0, 2]})
    m = summarize(slices)
    assert math.isnan(m["patient_dice_mean"]) and m["n_patients"] == 0
    assert math.isnan(m["tumor_slice_dice_mean"]) and m["n_tumor_slices"] == 0
    assert m["empty_slice_fp_rate"] == 0.5 and m["n_patients_empty_truth"] == 1
    assert math.isnan(smoothed_slice_dice(slices.iloc[:0]))
