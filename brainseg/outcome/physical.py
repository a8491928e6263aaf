"""Tumor size and position in millimetres, where the voxel geometry is known.

Beside the pixel features of :mod:`brainseg.outcome.features` (whose column lists the survival
model reads, unchanged), a mask with an affine gets physical columns: area in mm^2 per slice,
volume in mL per patient, the centroid in scanner coordinates and the extent along each scanner
axis. Coordinates are RAS+ millimetres (NIfTI's and nibabel's convention: +r towards the
patient's right, +a anterior, +s superior; DICOM's LPS positions have r and a negated).

Without an affine (the Kaggle TIFF slices carry no spacing) every physical column is NaN: null in
the CSVs, never a pixel count presented as millimetres.

``affine`` is always the (4, 4) map from a model-oriented voxel index (z, row, column) to RAS+ mm
(:attr:`brainseg.data.scan.Geometry.model_affine`).
"""

from __future__ import annotations

import math

import numpy as np

COORDINATES = "RAS"
PHYSICAL_SLICE_COLUMNS = ["area_mm2", "centroid_r_mm", "centroid_a_mm", "centroid_s_mm"]
PHYSICAL_PATIENT_COLUMNS = ["tumor_volume_ml", "centroid_r_mm", "centroid_a_mm", "centroid_s_mm",
                            "extent_rl_mm", "extent_ap_mm", "extent_si_mm"]


def _world(affine: np.ndarray, zrc: np.ndarray) -> np.ndarray:
    """(N, 3) voxel indices (z, row, column) -> (N, 3) RAS mm."""
    affine = np.asarray(affine, float)
    return np.asarray(zrc, float) @ affine[:3, :3].T + affine[:3, 3]


def pixel_area_mm2(affine: np.ndarray) -> float:
    """The area of one in-plane pixel (row x column) in mm^2."""
    a = np.asarray(affine, float)
    return float(np.linalg.norm(np.cross(a[:3, 1], a[:3, 2])))


def voxel_volume_ml(affine: np.ndarray) -> float:
    """The volume of one voxel in mL (mm^3 / 1000)."""
    return abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0


def slice_physical(mask: np.ndarray, z: int, affine: np.ndarray | None) -> dict:
    """Physical features of slice ``z``'s (H, W) bool mask, keyed as :data:`PHYSICAL_SLICE_COLUMNS`.

    ``area_mm2``: tumor pixels x pixel area (0 on an empty slice); ``centroid_*_mm``: the tumor
    pixels' mean position in RAS mm (NaN when empty). All NaN without ``affine``.

    >>> m = np.zeros((4, 4), bool); m[1:3, 1:3] = True
    >>> f = slice_physical(m, 2, np.diag([3.0, 0.5, 0.5, 1.0])); f["area_mm2"], f["centroid_r_mm"]
    (1.0, 6.0)
    >>> math.isnan(slice_physical(m, 2, None)["area_mm2"])
    True
    """
    if affine is None:
        return dict.fromkeys(PHYSICAL_SLICE_COLUMNS, math.nan)
    mask = np.asarray(mask, bool)
    rows, cols = np.nonzero(mask)
    out = {"area_mm2": float(len(rows) * pixel_area_mm2(affine))}
    if len(rows) == 0:
        return out | dict.fromkeys(PHYSICAL_SLICE_COLUMNS[1:], math.nan)
    r, a, s = _world(affine, [[z, rows.mean(), cols.mean()]])[0]
    return out | {"centroid_r_mm": float(r), "centroid_a_mm": float(a), "centroid_s_mm": float(s)}


def patient_physical(volume: np.ndarray, affine: np.ndarray | None) -> dict:
    """Physical features of a (Z, H, W) bool volume, keyed as :data:`PHYSICAL_PATIENT_COLUMNS`.

    - ``tumor_volume_ml``: tumor voxels x voxel volume (0 when empty);
    - ``centroid_*_mm``: the tumor voxels' mean position, RAS mm;
    - ``extent_rl_mm`` / ``extent_ap_mm`` / ``extent_si_mm``: the size of the tumor's bounding box
      along the scanner's right-left, anterior-posterior and inferior-superior axes, voxel edges
      included (a single voxel's extent is its size).

    Position and extent are NaN when empty; everything is NaN without ``affine``.

    >>> v = np.zeros((3, 4, 4), bool); v[1, 1:3, 1:3] = True
    >>> f = patient_physical(v, np.diag([3.0, 0.5, 0.5, 1.0]))
    >>> round(f["tumor_volume_ml"], 6), f["extent_rl_mm"], f["extent_si_mm"]  # 4 voxels of 0.75 mm^3
    (0.003, 3.0, 1.0)
    """
    if affine is None:
        return dict.fromkeys(PHYSICAL_PATIENT_COLUMNS, math.nan)
    volume = np.asarray(volume, bool)
    count = int(volume.sum())
    out = {"tumor_volume_ml": float(count * voxel_volume_ml(affine))}
    if count == 0:
        return out | dict.fromkeys(PHYSICAL_PATIENT_COLUMNS[1:], math.nan)
    idx = np.argwhere(volume)
    r, a, s = _world(affine, idx.mean(axis=0)[None])[0]
    lo, hi = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5  # voxel edges
    corners = np.array([[z, y, x] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])])
    world = _world(affine, corners)
    extent = world.max(axis=0) - world.min(axis=0)
    return out | {"centroid_r_mm": float(r), "centroid_a_mm": float(a), "centroid_s_mm": float(s),
                  "extent_rl_mm": float(extent[0]), "extent_ap_mm": float(extent[1]),
                  "extent_si_mm": float(extent[2])}
