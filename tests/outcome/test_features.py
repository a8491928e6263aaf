"""Slice and patient features on tiny hand-made masks (values computed by hand)."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from brainseg.outcome.features import (
    PATIENT_FEATURE_COLUMNS,
    SLICE_FEATURE_COLUMNS,
    angular_std,
    ellipsoid_volume_ratio,
    features_for_manifest,
    margin_fluctuation,
    patient_features_from_masks,
    slice_features,
)


def box(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def disc(size, radius, lobes=0, depth=0.0):
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2
    r = np.hypot(xx - c, yy - c)
    return r <= radius * (1 + depth * np.cos(lobes * np.arctan2(yy - c, xx - c)))


RECT = box((10, 10), 2, 5, 3, 8)  # rows 2-4, columns 3-7: 3 x 5 pixels


@pytest.mark.parametrize("key, expected", [
    ("tumor", True), ("area_px", 15), ("area_pct", 15.0),
    ("centroid_x", 5.0), ("centroid_y", 3.0),
    ("spread_x", math.sqrt(2)),        # std of 3, 4, 5, 6, 7
    ("spread_y", math.sqrt(2 / 3)),    # std of 2, 3, 4
    ("bbox_x0", 3), ("bbox_y0", 2), ("bbox_x1", 8), ("bbox_y1", 5),
    ("perimeter", 12.0),               # through boundary pixel centres: 2 * 4 + 2 * 2
    ("eccentricity", math.sqrt(1 - (2 / 3) / 2)),  # sqrt(1 - var_min / var_max)
    ("solidity", 1.0), ("n_components", 1),
])
def test_rectangle_features(key, expected):
    assert slice_features(RECT)[key] == pytest.approx(expected)


def test_rectangle_is_addressed_by_half_open_bbox():
    f = slice_features(RECT)
    assert RECT[f["bbox_y0"]:f["bbox_y1"], f["bbox_x0"]:f["bbox_x1"]].all()
    assert RECT.sum() == (f["bbox_y1"] - f["bbox_y0"]) * (f["bbox_x1"] - f["bbox_x0"])


@pytest.mark.parametrize("mask, components", [
    (box((10, 10), 1, 3, 1, 3) | box((10, 10), 6, 9, 6, 9), 2),
    (box((10, 10), 1, 3, 1, 3) | box((10, 10), 3, 5, 3, 5), 1),  # corners touch: 8-connected
    (box((10, 10), 0, 1, 0, 1), 1),
])
def test_components(mask, components):
    f = slice_features(mask)
    assert f["n_components"] == components
    assert f["area_px"] == mask.sum()


def test_two_blobs_are_one_region_for_shape():
    two = box((10, 10), 1, 3, 1, 3) | box((10, 10), 6, 9, 6, 9)
    f = slice_features(two)
    assert f["solidity"] < 0.6  # the convex hull spans the gap
    assert f["centroid_x"] == pytest.approx((4 * 1.5 + 9 * 7) / 13)


def test_empty_mask_gives_zero_area_nan_geometry_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = slice_features(np.zeros((8, 8), bool), image=np.full((8, 8, 3), 50, np.uint8))
    assert list(f) == SLICE_FEATURE_COLUMNS
    assert f["tumor"] is False and f["area_px"] == 0 and f["n_components"] == 0
    assert f["area_pct"] == 0.0 and f["area_pct_brain"] == 0.0
    for key in ("centroid_x", "spread_y", "bbox_x0", "bbox_y1", "perimeter", "eccentricity",
                "solidity"):
        assert math.isnan(f[key]), key


def test_columns_are_fixed_and_ordered():
    assert list(slice_features(RECT)) == SLICE_FEATURE_COLUMNS


def test_area_pct_brain_uses_flair_head_pixels():
    image = np.zeros((10, 10, 3), np.uint8)
    image[:5, :, 1] = 90   # 50 head pixels in FLAIR
    image[5:, :, 0] = 90   # other channels do not count
    assert slice_features(RECT, image)["area_pct_brain"] == pytest.approx(30.0)
    assert math.isnan(slice_features(RECT)["area_pct_brain"])
    assert math.isnan(slice_features(RECT, np.zeros((10, 10, 3), np.uint8))["area_pct_brain"])


def test_non_2d_mask_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        slice_features(np.zeros((2, 4, 4), bool))


# ---- patient volume -----------------------------------------------------------------------

SHAPE = (6, 6)
SQUARE4 = box(SHAPE, 1, 5, 1, 5)   # 16 px, centre (2.5, 2.5)
SQUARE2 = box(SHAPE, 2, 4, 2, 4)   # 4 px, same centre


def test_three_slice_volume():
    # given out of order: slice 3 holds the big square, slice 2 the small one, slice 1 nothing
    f = patient_features_from_masks("P1", [3, 1, 2], [SQUARE4, np.zeros(SHAPE, bool), SQUARE2])
    assert f["patient"] == "P1"
    assert f["tumor_volume_px"] == 20 and f["tumor_slices"] == 2
    assert f["largest_slice_area_px"] == 16
    assert f["centroid_x"] == pytest.approx(2.5) and f["centroid_y"] == pytest.approx(2.5)
    assert f["centroid_z"] == pytest.approx((4 * 2 + 16 * 3) / 20)
    assert f["extent_z"] == 2
    # margin fluctuation on the 4x4 square: 4 corner pixels at sqrt(1.5^2 + 1.5^2) and
    # 8 edge pixels at sqrt(1.5^2 + 0.5^2) from the centre
    d = np.array([math.hypot(1.5, 1.5)] * 4 + [math.hypot(1.5, 0.5)] * 8)
    assert f["margin_fluctuation"] == pytest.approx(d.std() / d.mean())
    assert set(f) == {"patient", *PATIENT_FEATURE_COLUMNS}


def test_extent_counts_gaps_between_tumor_slices():
    f = patient_features_from_masks("P", [1, 2, 3, 4], [SQUARE2, np.zeros(SHAPE, bool),
                                                        np.zeros(SHAPE, bool), SQUARE2])
    assert f["extent_z"] == 4 and f["tumor_slices"] == 2
    assert f["centroid_z"] == pytest.approx(2.5)


def test_empty_volume():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = patient_features_from_masks("P", [1, 2], [np.zeros(SHAPE, bool)] * 2)
    assert f["tumor_volume_px"] == 0 and f["tumor_slices"] == 0 and f["largest_slice_area_px"] == 0
    for key in PATIENT_FEATURE_COLUMNS[3:]:
        assert math.isnan(f[key]), key


def test_mismatched_slices_and_masks_refused():
    with pytest.raises(ValueError, match="2 slice numbers but 1 masks"):
        patient_features_from_masks("P", [1, 2], [SQUARE2])


def test_ellipsoid_ratio_near_one_for_ellipsoid_lower_for_cube_and_fragments():
    zz, yy, xx = np.mgrid[0:24, 0:40, 0:40]
    ellipsoid = ((xx - 20) / 14) ** 2 + ((yy - 20) / 9) ** 2 + ((zz - 12) / 7) ** 2 <= 1
    cube = np.zeros((12, 12, 12), bool)
    cube[1:11, 1:11, 1:11] = True
    apart = np.zeros((6, 40, 40), bool)
    apart[1:5, 2:6, 2:6] = apart[1:5, 34:38, 34:38] = True
    assert ellipsoid_volume_ratio(ellipsoid) == pytest.approx(1.0, abs=0.03)
    # cube of side s: variance s^2/12 -> semi-axes sqrt(5/12) s -> ratio 1 / (4/3 pi (5/12)^1.5)
    expected_cube = 1 / (4 / 3 * math.pi * (5 / 12) ** 1.5)
    assert ellipsoid_volume_ratio(cube) == pytest.approx(expected_cube, rel=1e-6)
    assert ellipsoid_volume_ratio(apart) < 0.3
    single = np.zeros((3, 3, 3), bool)
    single[1, 1, 1] = True
    assert ellipsoid_volume_ratio(single) == pytest.approx(expected_cube)  # a unit cube
    assert math.isnan(ellipsoid_volume_ratio(np.zeros((2, 3, 3), bool)))


def test_lobulated_outline_scores_higher_than_disc():
    round_, star = disc(64, 14), disc(64, 14, lobes=5, depth=0.4)
    assert margin_fluctuation(round_) < 0.1 < margin_fluctuation(star)
    assert angular_std(round_) < 0.1 < angular_std(star)
    assert math.isnan(margin_fluctuation(np.zeros((4, 4), bool)))
    assert math.isnan(angular_std(np.zeros((4, 4), bool)))


# ---- manifest -----------------------------------------------------------------------------

def _manifest(rows):
    return pd.DataFrame(rows, columns=["patient", "patient_dir", "slice"])


def test_features_for_manifest_tables():
    manifest = _manifest([("TCGA_AA_0002", "TCGA_AA_0002_20000101", 2),
                          ("TCGA_AA_0002", "TCGA_AA_0002_20000101", 1),
                          ("TCGA_AA_0001", "TCGA_AA_0001_20000101", 1)])
    masks = [SQUARE4, SQUARE2, np.zeros(SHAPE, bool)]
    slices, patients = features_for_manifest(manifest, masks)
    assert list(slices.columns) == ["patient", "patient_dir", "slice"] + SLICE_FEATURE_COLUMNS
    assert slices["area_px"].tolist() == [16, 4, 0]  # aligned with manifest rows
    assert list(patients.columns) == ["patient"] + PATIENT_FEATURE_COLUMNS
    assert patients["patient"].tolist() == ["TCGA_AA_0001", "TCGA_AA_0002"]
    assert patients["tumor_volume_px"].tolist() == [0, 20]
    assert patients.loc[1, "centroid_z"] == pytest.approx((4 * 1 + 16 * 2) / 20)


def test_features_for_manifest_refuses_misaligned_or_split_patients():
    manifest = _manifest([("TCGA_AA_0001", "TCGA_AA_0001_20000101", 1),
                          ("TCGA_AA_0001", "TCGA_AA_0001_20010101", 1)])
    with pytest.raises(ValueError, match="2 manifest rows but 1 masks"):
        features_for_manifest(manifest, [SQUARE2])
    with pytest.raises(ValueError, match="several scan folders: TCGA_AA_0001"):
        features_for_manifest(manifest, [SQUARE2, SQUARE2])
