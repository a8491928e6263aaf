"""Boundary and lesion-wise figures of one patient volume: HD95, normalised surface Dice, lesions found.

Implementation: DeepMind's ``surface-distance`` library (pinned ``surface-distance==0.1``; the code with
which Nikolov et al. 2021 defined the normalised surface Dice). Its conventions, kept here:

- **Surface**: the surface elements ("surfels") of a mask are the corners of its voxel grid whose 2x2x2
  neighbourhood is neither empty nor full (marching-cubes style); each carries its area in the unit of
  the spacing squared (the library's lookup table), so a figure does not depend on how many voxels a
  face happens to have.
- **Distances**: from every surfel of one surface to the nearest surfel of the other, with the spacing.
- **HD95**: per direction, the area-weighted 95th percentile (the first distance at which the
  cumulative surfel area reaches 95%, no interpolation); the **larger of the two directed values** (not
  the percentile of the pooled distances, as medpy's ``hd95`` takes, nor MONAI's per-voxel percentile).
- **NSD at tolerance t**: surfel area within ``t`` (``<=``) of the other surface, both surfaces
  together, over the total surfel area of both.

Here the library's nearest-surface step, a Euclidean distance transform over the bounding box of both
masks (a second per volume when a false positive sits far from the tumor), is computed with a KD-tree
over the surfels: the same distances, checked against the library's ``compute_surface_distances`` and
its published test cases in ``tests/evaluation/test_surface.py``. The percentile and NSD are the
library's own functions.

**Empty masks** (stated once with the Dice policy in :mod:`brainseg.evaluation.metrics`): one side empty
-> HD95 ``inf``, NSD 0 (the library's values); both empty -> HD95 and NSD NaN (undefined, never 0 or
1, as Dice; the library says HD ``inf`` there). The library's own functions are not called on an empty
side (version 0.1 still spells ``np.Inf``, gone in NumPy 2).

**Lesions**: the 26-connected 3-D components of a volume (as the segmenter's 3-D post-processing); a
true lesion is found when any predicted voxel overlaps it; a false lesion is a predicted component that
overlaps no true voxel.

**Units**: distances and the tolerance are in the spacing's unit: voxel units with spacing (1, 1, 1)
where the spacing is unknown (the Kaggle TIFFs: one step along z, the slice axis, counts as one, like a
pixel step in-plane), mm with a (z, y, x) spacing in mm.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage, spatial
from surface_distance import lookup_tables
from surface_distance import metrics as deepmind

VOXEL_SPACING = (1.0, 1.0, 1.0)  # (z, y, x) where the data give none: figures in voxel units
NSD_TOLERANCE = 2.0              # in the spacing's unit: 2 voxels (about 2 mm in-plane on TCGA-LGG FLAIR)
HD_PERCENT = 95.0


@functools.lru_cache(maxsize=32)
def _area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Surfel area (3-D) or contour length (2-D) of each neighbourhood code at ``spacing``."""
    if len(spacing) == 3:
        return lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
    return lookup_tables.create_table_neighbour_code_to_contour_length(spacing)


def _surfels(mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Surfels of a non-empty mask: (K, ndim) corner positions in the spacing's unit and (K,) areas.

    As the library: the mask cropped to its bounding box with one empty voxel after it on every axis,
    the neighbourhood code of each grid corner by correlation with the library's 2x2(x2) kernel.
    """
    kernel = (lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL if mask.ndim == 3
              else lookup_tables.ENCODE_NEIGHBOURHOOD_2D_KERNEL)
    full = 2 ** (2 ** mask.ndim) - 1
    nonzero = np.nonzero(mask)
    lo = np.array([int(i.min()) for i in nonzero])
    hi = np.array([int(i.max()) for i in nonzero])
    crop = np.zeros(hi - lo + 2, np.uint8)
    crop[tuple(slice(0, -1) for _ in lo)] = mask[tuple(slice(a, b + 1) for a, b in zip(lo, hi))]
    code = ndimage.correlate(crop, kernel, mode="constant", cval=0)
    border = (code != 0) & (code != full)
    return (np.argwhere(border) + lo) * np.asarray(spacing, float), _area_table(spacing)[code[border]]


def _nearest(points: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Distance from each of ``points`` to the nearest of ``other`` (``inf`` when ``other`` is empty)."""
    if not len(points):
        return np.zeros(0)
    if not len(other):
        return np.full(len(points), np.inf)
    return spatial.cKDTree(other).query(points)[0]


def surface_distances(truth: np.ndarray, pred: np.ndarray, spacing=VOXEL_SPACING) -> dict:
    """The library's ``compute_surface_distances(truth, pred, spacing)`` dict, same values.

    ``truth``, ``pred``: 2-D or 3-D masks of one shape; ``spacing``: one length per axis.
    Keys ``distances_gt_to_pred``, ``distances_pred_to_gt`` (sorted), ``surfel_areas_gt``,
    ``surfel_areas_pred``; an empty side has empty lists and the other side's distances are ``inf``.

    >>> gt, pr = np.zeros((1, 5), bool), np.zeros((1, 5), bool)
    >>> gt[0, 1], pr[0, 3] = True, True
    >>> surface_distances(gt, pr, (1, 1))["distances_gt_to_pred"].tolist()
    [1.0, 1.0, 2.0, 2.0]
    """
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    spacing = tuple(float(s) for s in spacing)
    if truth.shape != pred.shape or truth.ndim not in (2, 3) or len(spacing) != truth.ndim:
        raise ValueError(f"surface distances need two 2-D or 3-D masks of one shape and a spacing per axis: "
                         f"got {truth.shape}, {pred.shape} and spacing {spacing}")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing}: every step must be a positive length")
    empty = (np.zeros((0, truth.ndim)), np.zeros(0))
    (gt_points, gt_areas), (pred_points, pred_areas) = (
        _surfels(m, spacing) if m.any() else empty for m in (truth, pred))
    gt_dist, pred_dist = _nearest(gt_points, pred_points), _nearest(pred_points, gt_points)
    gt_order, pred_order = np.lexsort((gt_areas, gt_dist)), np.lexsort((pred_areas, pred_dist))  # as the library
    return {"distances_gt_to_pred": gt_dist[gt_order], "distances_pred_to_gt": pred_dist[pred_order],
            "surfel_areas_gt": gt_areas[gt_order], "surfel_areas_pred": pred_areas[pred_order]}


def _sides(distances: dict) -> tuple[bool, bool]:
    return len(distances["distances_gt_to_pred"]) > 0, len(distances["distances_pred_to_gt"]) > 0


def hd95(distances: dict, percent: float = HD_PERCENT) -> float:
    """Robust Hausdorff distance (the larger directed area-weighted percentile); ``inf`` when one
    surface is empty, NaN when both are.

    >>> hd95(surface_distances(np.eye(4, dtype=bool), np.eye(4, dtype=bool), (1, 1)))
    0.0
    >>> hd95(surface_distances(np.eye(4, dtype=bool), np.zeros((4, 4), bool), (1, 1)))
    inf
    """
    has_gt, has_pred = _sides(distances)
    if not (has_gt or has_pred):
        return float("nan")
    return float(deepmind.compute_robust_hausdorff(distances, percent)) if has_gt and has_pred else math.inf


def nsd(distances: dict, tolerance: float = NSD_TOLERANCE) -> float:
    """Normalised surface Dice at ``tolerance``; 0 when one surface is empty, NaN when both are."""
    has_gt, has_pred = _sides(distances)
    if not (has_gt or has_pred):
        return float("nan")
    return float(deepmind.compute_surface_dice_at_tolerance(distances, tolerance))


def lesion_counts(truth: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """True lesions (26-connected 3-D components), found / missed, and false (predicted) lesions.

    >>> truth = np.zeros((1, 1, 7), bool); truth[0, 0, [0, 3]] = True   # two lesions
    >>> pred = np.zeros((1, 1, 7), bool); pred[0, 0, [0, 6]] = True    # one found, one false
    >>> lesion_counts(truth, pred)
    {'lesions_true': 2, 'lesions_found': 1, 'lesions_missed': 1, 'lesions_false': 1}
    """
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    structure = ndimage.generate_binary_structure(truth.ndim, truth.ndim)
    truth_labels, n_true = ndimage.label(truth, structure)
    pred_labels, n_pred = ndimage.label(pred, structure)
    both = truth & pred
    found = int(np.count_nonzero(np.unique(truth_labels[both])))
    hit = int(np.count_nonzero(np.unique(pred_labels[both])))
    return {"lesions_true": int(n_true), "lesions_found": found, "lesions_missed": int(n_true) - found,
            "lesions_false": int(n_pred) - hit}


def volume_figures(truth: np.ndarray, pred: np.ndarray, spacing=None, tolerance: float = NSD_TOLERANCE) -> dict:
    """HD95, NSD at ``tolerance`` and lesion counts of one patient volume.

    ``truth``, ``pred``: (Z, H, W) bool, slices in slice order; ``spacing``: (z, y, x) in mm, or None
    for voxel units (1, 1, 1); ``tolerance`` in the same unit.

    >>> truth = np.zeros((3, 4, 4), bool); truth[1, 1:3, 1:3] = True
    >>> volume_figures(truth, truth)
    {'hd95': 0.0, 'nsd': 1.0, 'lesions_true': 1, 'lesions_found': 1, 'lesions_missed': 0, 'lesions_false': 0}
    >>> f = volume_figures(truth, np.zeros_like(truth)); f["hd95"], f["nsd"], f["lesions_missed"]
    (inf, 0.0, 1)
    """
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    if truth.ndim != 3:
        raise ValueError(f"a patient volume is (slices, H, W): got shape {truth.shape}")
    distances = surface_distances(truth, pred, VOXEL_SPACING if spacing is None else spacing)
    return {"hd95": hd95(distances), "nsd": nsd(distances, tolerance), **lesion_counts(truth, pred)}
