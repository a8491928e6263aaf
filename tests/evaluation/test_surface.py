"""HD95, normalised surface Dice and lesion-wise detection (brainseg.evaluation.surface).

First the published test cases of DeepMind's surface-distance (its surface_distance_test.py, every
case: 2-D and 3-D, same inputs, spacings and expected values), reproduced through our
``surface_distances`` and the library's own metric functions; then equality with the library's
``compute_surface_distances``; then hand-made volumes and the empty-mask policy.
"""

import math

import numpy as np
import pytest
import surface_distance as deepmind

from brainseg.evaluation.surface import hd95, lesion_counts, nsd, surface_distances, volume_figures

NAN, INF = math.nan, math.inf
DIAG_2x1 = 0.5 * math.sqrt(2 ** 2 + 1 ** 2)   # the published 2-D case's surfel length at spacing (2, 1)


def _points(shape, *where):
    mask = np.zeros(shape, bool)
    for index in where:
        mask[index] = True
    return mask


def _same(expected, actual, places=3):
    if math.isnan(expected):
        return math.isnan(actual)
    return actual == pytest.approx(expected, abs=0.5 * 10 ** -places)


SQUARE_GT = np.zeros((6, 6), bool)
SQUARE_GT[1:3, 1:3] = True
SQUARE_PRED = np.zeros((6, 6), bool)
SQUARE_PRED[1:4, 1:3] = True
SLAB_GT = np.zeros((100, 100, 100), bool)
SLAB_GT[0:50] = True
SLAB_PRED = np.zeros((100, 100, 100), bool)
SLAB_PRED[0:51] = True

# name, gt, pred, spacing, (average surface distance gt->pred, pred->gt), HD100, HD95,
# (surface overlap at 1 mm gt, pred), surface Dice at 1 mm: the library's published expectations.
# Its both-empty cases expect HD inf: our policy says NaN (undefined, as Dice): see test_both_empty_policy.
PUBLISHED = [
    ("2d_2_pixels_2mm_away", _points((128, 128), (50, 70)), _points((128, 128), (50, 72)), (2, 1),
     (1.5, 1.5), 2.0, 2.0, (0.5, 0.5), 0.5),
    ("2d_empty_prediction", _points((128, 128), (50, 60)), _points((128, 128)), (3, 2),
     (INF, NAN), INF, INF, (0.0, NAN), 0.0),
    ("2d_empty_ground_truth", _points((128, 128)), _points((128, 128), (50, 60)), (3, 2),
     (NAN, INF), INF, INF, (NAN, 0.0), 0.0),
    ("3d_2_pixels_2mm_away", _points((128, 128, 128), (50, 60, 70)), _points((128, 128, 128), (50, 60, 72)),
     (3, 2, 1), (1.5, 1.5), 2.0, 2.0, (0.5, 0.5), 0.5),
    ("3d_two_cubes_shifted_by_one_pixel", SLAB_GT, SLAB_PRED, (2, 1, 1),
     (0.322, 0.339), 2.0, 2.0, (0.842, 0.830), 0.836),
    ("3d_empty_prediction", _points((128, 128, 128), (50, 60, 70)), _points((128, 128, 128)), (3, 2, 1),
     (INF, NAN), INF, INF, (0.0, NAN), 0.0),
    ("3d_empty_ground_truth", _points((128, 128, 128)), _points((128, 128, 128), (50, 60, 72)), (3, 2, 1),
     (NAN, INF), INF, INF, (NAN, 0.0), 0.0),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the library's 0/0 = NaN
@pytest.mark.parametrize("name, gt, pred, spacing, asd, hd100, hd_95, overlap, surface_dice", PUBLISHED,
                         ids=[case[0] for case in PUBLISHED])
def test_published_cases_of_deepminds_surface_distance(name, gt, pred, spacing, asd, hd100, hd_95, overlap,
                                                       surface_dice):
    d = surface_distances(gt, pred, spacing)
    got_asd = deepmind.compute_average_surface_distance(d)
    got_overlap = deepmind.compute_surface_overlap_at_tolerance(d, 1)
    assert all(_same(e, float(a)) for e, a in zip(asd, got_asd)), got_asd
    assert all(_same(e, float(a)) for e, a in zip(overlap, got_overlap)), got_overlap
    assert _same(hd100, hd95(d, 100)) and _same(hd_95, hd95(d))
    assert _same(surface_dice, nsd(d, 1))


def test_published_2d_case_surfels_and_distances():
    d = surface_distances(_points((128, 128), (50, 70)), _points((128, 128), (50, 72)), (2, 1))
    assert {k: v.tolist() for k, v in d.items()} == {
        "surfel_areas_gt": [DIAG_2x1] * 4, "surfel_areas_pred": [DIAG_2x1] * 4,
        "distances_gt_to_pred": [1.0, 1.0, 2.0, 2.0], "distances_pred_to_gt": [1.0, 1.0, 2.0, 2.0]}


def test_published_two_squares_shifted_by_one_pixel():
    """The published contour walk (clockwise from the top left) of two squares, spacing (2, 1)."""
    vertical, horizontal = 2, 1
    diag = 0.5 * math.sqrt(horizontal ** 2 + vertical ** 2)
    areas_gt = [diag, horizontal, diag, vertical, diag, horizontal, diag, vertical]
    areas_pred = [diag, horizontal, diag, vertical, vertical, diag, horizontal, diag, vertical, vertical]
    dist_gt = [0] * 5 + [horizontal] + [0] * 2
    dist_pred = [0] * 5 + [vertical] * 3 + [0] * 2
    d = surface_distances(SQUARE_GT, SQUARE_PRED, (vertical, horizontal))
    assert sorted(zip(d["distances_gt_to_pred"], d["surfel_areas_gt"])) == sorted(zip(dist_gt, areas_gt))
    assert sorted(zip(d["distances_pred_to_gt"], d["surfel_areas_pred"])) == sorted(zip(dist_pred, areas_pred))
    expected = {"distances_gt_to_pred": np.sort(dist_gt).astype(float), "distances_pred_to_gt": np.sort(dist_pred),
                "surfel_areas_gt": np.array(areas_gt)[np.argsort(dist_gt, kind="stable")],
                "surfel_areas_pred": np.array(areas_pred)[np.argsort(dist_pred, kind="stable")]}
    assert hd95(d, 100) == deepmind.compute_robust_hausdorff(expected, 100) == 2.0  # the larger direction
    assert hd95(d) == deepmind.compute_robust_hausdorff(expected, 95) == 2.0
    assert nsd(d, 1) == pytest.approx(deepmind.compute_surface_dice_at_tolerance(expected, 1))
    assert deepmind.compute_average_surface_distance(d) == pytest.approx(
        deepmind.compute_average_surface_distance(expected))


@pytest.mark.parametrize("gt, pred, spacing", [
    (np.zeros((2, 2, 2), bool), np.zeros((2, 2), bool), (1, 1)),
    (np.zeros((2, 2), bool), np.zeros((2, 2, 2), bool), (1, 1)),
    (np.zeros((2, 2), bool), np.zeros((2, 2), bool), (1, 1, 1)),
    (np.zeros(2, bool), np.zeros(2, bool), (1,)),                           # only 2-D and 3-D
    (np.zeros((2, 2, 2, 2), bool), np.zeros((2, 2, 2, 2), bool), (1, 1, 1, 1)),
])
def test_published_shape_errors(gt, pred, spacing):
    with pytest.raises(ValueError, match="2-D or 3-D masks of one shape and a spacing per axis"):
        surface_distances(gt, pred, spacing)


@pytest.mark.parametrize("spacing", [(0, 1, 1), (1, -2, 1), (1, 1, math.nan)])
def test_spacing_must_be_positive_lengths(spacing):
    with pytest.raises(ValueError, match="positive length"):
        surface_distances(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), spacing)


def _blobs(seed: int, shape=(6, 14, 14)):
    """Two fixed, irregular non-empty volumes (a ball and a shifted, cut box) from a seed."""
    z, y, x = np.indices(shape)
    gt = (z - 2.5) ** 2 + ((y - 6 - seed % 3) / 1.5) ** 2 + (x - 6) ** 2 < 9 + seed
    pred = (abs(y - 7) < 3 + seed % 2) & (abs(x - 5 - seed) < 4) & (z > seed % 3)
    return gt, pred


@pytest.mark.parametrize("seed, spacing", [(0, (1, 1, 1)), (1, (3.0, 0.9, 0.9)), (2, (5.5, 0.5, 1.25)),
                                           (3, (1, 1, 1)), (1, (0.3, 2.0, 1.0))])
def test_same_distances_as_the_library(seed, spacing):
    """Our KD-tree nearest-surface step against the library's distance transform, both sides non-empty."""
    gt, pred = _blobs(seed)
    ours, theirs = surface_distances(gt, pred, spacing), deepmind.compute_surface_distances(gt, pred, spacing)
    for key in theirs:
        np.testing.assert_allclose(np.sort(ours[key]), np.sort(theirs[key]), rtol=0, atol=1e-9)
    assert hd95(ours) == pytest.approx(deepmind.compute_robust_hausdorff(theirs, 95), abs=1e-9)
    for tolerance in (0.5, 1, 2):
        assert nsd(ours, tolerance) == pytest.approx(deepmind.compute_surface_dice_at_tolerance(theirs, tolerance))


# ---------------------------------------------------------------------------- hand-made volumes
def _cube(shift=0, at=2, size=3, shape=(7, 7, 10)):
    """A size^3 cube of voxels from ``at``, moved ``shift`` voxels along x."""
    mask = np.zeros(shape, bool)
    mask[at:at + size, at:at + size, at + shift:at + size + shift] = True
    return mask


# a 3x3x3 cube's surfels (spacing 1): 8 corners of area sqrt(3)/8, 24 edge ones sqrt(2)/2, 24 face ones 1.
# Shifted by one voxel along x: its x=2 face (area sqrt(3)/2 + 4 sqrt(2) + 4) and the 4 face surfels
# inside the other cube's x=5 face lie 1 away, the rest 0 (both ways, by symmetry). Shifted by two:
# the x=2 face lies 2 away, the rest within 1.
CUBE_AREA = math.sqrt(3) + 12 * math.sqrt(2) + 24
FACE_AREA = math.sqrt(3) / 2 + 4 * math.sqrt(2) + 4


@pytest.mark.parametrize("shift, tolerance, hd, surface_dice", [
    (0, 0.0, 0.0, 1.0),                               # perfect
    (1, 0.5, 1.0, 1 - (FACE_AREA + 4) / CUBE_AREA),   # one-voxel shift: ~0.660 within half a voxel
    (1, 1.0, 1.0, 1.0),
    (1, 2.0, 1.0, 1.0),
    (2, 1.0, 2.0, 1 - FACE_AREA / CUBE_AREA),         # two-voxel shift: ~0.754 within one voxel
    (2, 2.0, 2.0, 1.0),
])
def test_shifted_cube(shift, tolerance, hd, surface_dice):
    f = volume_figures(_cube(), _cube(shift), tolerance=tolerance)
    assert (f["hd95"], f["nsd"]) == (pytest.approx(hd), pytest.approx(surface_dice))
    assert (f["lesions_true"], f["lesions_found"], f["lesions_missed"], f["lesions_false"]) == (1, 1, 0, 0)


def test_spacing_in_mm_scales_distances_and_tolerance():
    """The same one-voxel shift along x with voxels 0.5 mm wide along x: HD95 0.5 mm."""
    f = volume_figures(_cube(), _cube(1), spacing=(3.0, 1.0, 0.5), tolerance=0.5)
    assert (f["hd95"], f["nsd"]) == (pytest.approx(0.5), pytest.approx(1.0))


def _with(*cubes):
    mask = np.zeros((9, 9, 16), bool)
    for z, y, x in cubes:
        mask[z:z + 2, y:y + 2, x:x + 2] = True
    return mask


EMPTY = _with()
A, B, C = (1, 1, 1), (5, 5, 8), (1, 5, 12)   # three 2x2x2 cubes apart from each other


@pytest.mark.parametrize("name, truth, pred, hd, surface_dice, lesions", [
    ("perfect", _with(A, B), _with(A, B), 0.0, 1.0, (2, 2, 0, 0)),
    ("empty prediction", _with(A), EMPTY, INF, 0.0, (1, 0, 1, 0)),
    ("empty truth, a false lesion", EMPTY, _with(A), INF, 0.0, (0, 0, 0, 1)),
    ("both empty", EMPTY, EMPTY, NAN, NAN, (0, 0, 0, 0)),
    ("a missed lesion", _with(A, B), _with(A), None, None, (2, 1, 1, 0)),
    ("a false lesion", _with(A), _with(A, C), None, None, (1, 1, 0, 1)),
    ("found, missed and false", _with(A, B), _with(A, C), None, None, (2, 1, 1, 1)),
])
def test_empty_policy_and_lesions(name, truth, pred, hd, surface_dice, lesions):
    f = volume_figures(truth, pred)
    assert (f["lesions_true"], f["lesions_found"], f["lesions_missed"], f["lesions_false"]) == lesions
    if hd is not None:
        assert _same(hd, f["hd95"], places=9) and _same(surface_dice, f["nsd"], places=9)
    else:  # a missed or false lesion: finite HD95 (the far surface), NSD strictly between 0 and 1
        assert math.isfinite(f["hd95"]) and f["hd95"] > 2 and 0 < f["nsd"] < 1


def test_both_empty_policy_differs_from_the_library_only_in_hd():
    """The library scores two empty masks HD inf; we say NaN (undefined, as Dice); NSD NaN in both."""
    d = surface_distances(EMPTY, EMPTY)
    assert all(len(v) == 0 for v in d.values())
    assert math.isnan(hd95(d)) and math.isnan(nsd(d))


@pytest.mark.parametrize("truth_voxels, pred_voxels, expected", [
    ([(0, 0, 0), (1, 1, 1)], [(0, 0, 0)], (1, 1, 0, 0)),                # diagonal neighbours: one lesion (26)
    ([(0, 0, 0), (2, 2, 2)], [(1, 1, 1)], (2, 0, 2, 1)),                # touching corners is not overlapping
    ([(0, 0, 0), (0, 0, 3)], [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3)], (2, 2, 0, 0)),  # one blob finds two
    ([(0, 0, 0)], [(0, 0, 0), (3, 3, 3), (0, 3, 0)], (1, 1, 0, 2)),
])
def test_lesion_counts(truth_voxels, pred_voxels, expected):
    truth, pred = _points((4, 4, 4), *truth_voxels), _points((4, 4, 4), *pred_voxels)
    c = lesion_counts(truth, pred)
    assert (c["lesions_true"], c["lesions_found"], c["lesions_missed"], c["lesions_false"]) == expected


def test_a_volume_must_be_3d():
    with pytest.raises(ValueError, match=r"\(slices, H, W\)"):
        volume_figures(np.ones((4, 4), bool), np.ones((4, 4), bool))
