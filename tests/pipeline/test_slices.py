"""Slice naming and per-patient aggregation shared by ``brainseg predict`` and the page."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg.pipeline import slices


@pytest.mark.parametrize("name, expected", [
    ("TCGA_CS_4941_19960909_12.tif", ("TCGA_CS_4941", "TCGA_CS_4941_19960909", 12)),
    ("/data/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_3.PNG", ("TCGA_CS_4941", "TCGA_CS_4941_19960909", 3)),
    ("scan.zip/TCGA_DU_5855_19951217/TCGA_DU_5855_19951217_20.tiff", ("TCGA_DU_5855", "TCGA_DU_5855_19951217", 20)),
    ("scans/week2/img_4.tif", ("week2", "week2", 4)),
    ("lonely.png", ("lonely", "lonely", 0)),
    ("C:\\mri\\TCGA_CS_4941_19960909\\TCGA_CS_4941_19960909_7.tif", ("TCGA_CS_4941", "TCGA_CS_4941_19960909", 7)),
])
def test_identify(name, expected):
    assert slices.identify(name) == expected


def test_slices_sort_by_folder_then_number():
    names = ["b/x_10.tif", "a/x_2.tif", "b/x_2.tif", "a/x_1.png"]
    assert sorted(names, key=slices.slice_sort_key) == ["a/x_1.png", "a/x_2.tif", "b/x_2.tif", "b/x_10.tif"]


def square(size: int, lo: int, hi: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_patient_rows_aggregate_each_volume_once():
    items = [("P", 2, square(8, 2, 4)), ("Q", 1, square(8, 0, 0)), ("P", 1, square(8, 1, 4))]
    rows, problems = slices.patient_rows(items)
    assert problems == []
    assert [(r["patient"], r["slices"], r["tumor_volume_px"], r["tumor_slices"], r["largest_slice_area_px"])
            for r in rows] == [("P", 2, 13, 2, 9), ("Q", 1, 0, 0, 0)]


@pytest.mark.parametrize("items, problem", [
    ([("P", 1, square(8, 1, 2)), ("P", 2, square(16, 1, 2))], "patient P: slices of different sizes"),
    ([("P", 0, square(8, 1, 2)), ("P", 0, square(8, 1, 2))], "patient P: slice numbers repeat"),
])
def test_patient_rows_refuse_volumes_that_cannot_be_assembled(items, problem):
    rows, problems = slices.patient_rows(items)
    assert rows == [] and len(problems) == 1 and problems[0].startswith(problem)
