"""Scanner volumes for the segmenter: the API that predict, the served model and import call.

- :func:`read_scan` (a ``.nii``/``.nii.gz`` file or a folder with one DICOM series) -> a
  :class:`~brainseg.data.scan.Scan`: the (Z, H, W) array in the model's slice orientation
  (:data:`~brainseg.data.scan.MODEL_AXCODES`) and the :class:`~brainseg.data.scan.Geometry` that
  puts a mask back; :class:`~brainseg.data.scan.BadScan` (one line naming the file) otherwise.
- :func:`write_mask`: a (Z, H, W) mask -> a NIfTI in the input's shape, affine and header.
- :func:`check_same_grid` / :func:`resample_onto`: the sequences of one patient on one grid.
- :func:`to_uint8` and :func:`rgb_slices`: a volume's slices as the (H, W, 3) uint8 slices the
  Kaggle TIFF path gives the segmenter (pre-contrast, FLAIR, post-contrast).

Everything here is numpy and nibabel / pydicom: no TensorFlow, no model.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to

from brainseg.data.dicom import read_dicom_series
from brainseg.data.nifti import is_nifti, nifti_stem, read_nifti, write_nifti
from brainseg.data.scan import BadScan, Geometry, Scan, VolumeLimits, make_scan

GRID_TOLERANCE_MM = 0.1  # two grids are one when they place every voxel within this distance
WINDOW_PERCENTILE = 99.5  # to_uint8: the intensity mapped to 255 (percentile of the positive voxels)


def read_scan(path: Path, limits: VolumeLimits | None = None) -> Scan:
    """A NIfTI file or a folder holding one DICOM series -> :class:`Scan` (model orientation)."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, limits)
    if not path.exists():
        raise BadScan(str(path), "no such file or folder")
    if is_nifti(path):
        return read_nifti(path, limits)
    raise BadScan(str(path), "not a .nii / .nii.gz file or a folder holding a DICOM series")


def scan_name(path: Path) -> str:
    """A patient name from an input path: ``BRATS_001_0000.nii.gz`` -> ``BRATS_001`` (nnU-Net's
    channel suffix dropped), ``sub-01_FLAIR.nii`` -> ``sub-01``, a DICOM folder -> its name."""
    name = Path(path).name if Path(path).is_dir() else nifti_stem(Path(path))
    name = re.sub(r"_\d{4}$", "", name)
    return re.sub(r"[_-](flair|t2f|t1|t1ce|t1c|t1gd|pre|post)$", "", name, flags=re.IGNORECASE) or name


def write_mask(mask: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Write a (Z, H, W) bool mask (model orientation) as uint8 0/1 NIfTI in ``geometry``'s
    stored shape and affine (for a NIfTI input its header too), whole or not at all."""
    return write_nifti(np.asarray(mask, bool), geometry, path, np.uint8)


def write_volume(array: np.ndarray, geometry: Geometry, path: Path) -> Path:
    """Write a (Z, H, W) model-oriented volume of any number type in ``geometry`` (the export's images)."""
    array = np.asarray(array)
    return write_nifti(array, geometry, path, array.dtype)


def grid_difference(a: Geometry, b: Geometry) -> str | None:
    """None when ``a`` and ``b`` put their model-oriented voxels in the same places (same shape,
    every voxel within GRID_TOLERANCE_MM: a volume stored in another axis order is on the same
    grid), else what differs first: shape, spacing, or origin."""
    sa, sb = a.model_shape, b.model_shape
    if sa != sb:
        return f"shape {'x'.join(map(str, sa))} vs {'x'.join(map(str, sb))} (slices x rows x columns)"
    ma, mb = a.model_affine, b.model_affine
    corners = np.array([[i, j, k, 1] for i in (0, sa[0] - 1) for j in (0, sa[1] - 1) for k in (0, sa[2] - 1)],
                       float).T
    if np.abs((ma - mb) @ corners)[:3].max() <= GRID_TOLERANCE_MM:
        return None
    za, zb = np.linalg.norm(ma[:3, :3], axis=0), np.linalg.norm(mb[:3, :3], axis=0)
    if np.abs(za - zb).max() * max(sa) > GRID_TOLERANCE_MM:
        return f"spacing {'x'.join(f'{v:.4g}' for v in za)} vs {'x'.join(f'{v:.4g}' for v in zb)} mm"
    shift = float(np.linalg.norm(ma[:3, 3] - mb[:3, 3]))
    return f"origin {shift:.3g} mm apart" if shift > GRID_TOLERANCE_MM else "axes rotated"


def check_same_grid(reference: Geometry, other: Geometry) -> None:
    """:class:`BadScan` naming both files when ``other`` is not on ``reference``'s grid."""
    diff = grid_difference(other, reference)
    if diff:
        raise BadScan(other.source, f"not on the grid of {reference.source} ({diff}); co-register them, or pass "
                                    "--resample to resample it onto the FLAIR's grid")


def resample_onto(scan: Scan, target: Geometry) -> Scan:
    """``scan`` resampled (trilinear, nibabel.processing, 0 outside) onto ``target``'s model grid;
    integer voxels stay integers of their type (rounded, as ITK keeps the input's pixel type)."""
    src = nib.Nifti1Image(scan.array.astype(np.float32), scan.geometry.model_affine)
    out = resample_from_to(src, (target.model_shape, target.model_affine), order=1, mode="constant", cval=0.0)
    array = np.asarray(out.dataobj, np.float32)
    if scan.array.dtype.kind in "biu":
        info = np.iinfo(scan.array.dtype) if scan.array.dtype.kind != "b" else np.iinfo(np.uint8)
        array = np.clip(np.round(array), info.min, info.max).astype(scan.array.dtype)
    resampled = Geometry(scan.source, scan.geometry.kind, target.affine, target.shape, None, ())
    return make_scan(resampled.to_stored(array), resampled)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """A volume's intensities as uint8, one rule per volume (the Kaggle slices are 8-bit, scaled per volume).

    Whole numbers within 0..255 (8-bit data, the TIFF slices, ``brainseg data export``) are taken
    as they are, so a volume made from slices gives the segmenter exactly those slices. Anything
    else is windowed linearly: 0 and below -> 0 (background stays 0, as the head box and the
    z-score over the head expect), the 99.5th percentile of the positive voxels -> 255, clipped.
    The z-score normalisation downstream removes any remaining linear scale.
    """
    array = np.asarray(array)
    if array.size and array.min() >= 0 and array.max() <= 255 and (
            array.dtype.kind in "bui" or np.array_equal(array, np.round(array))):
        return array.astype(np.uint8)
    positive = array[array > 0]
    if positive.size == 0:
        return np.zeros(array.shape, np.uint8)
    top = float(np.percentile(positive, WINDOW_PERCENTILE)) or float(positive.max())
    return np.round(np.clip(array.astype(np.float64), 0, top) / top * 255).astype(np.uint8)


def rgb_slices(flair: Scan, pre: Scan | None = None, post: Scan | None = None) -> list[np.ndarray]:
    """(H, W, 3) uint8 slices (pre-contrast, FLAIR, post-contrast: the Kaggle channel order), one per
    z of the model-oriented volumes (all on the FLAIR's grid); a missing sequence is filled with
    FLAIR, as a 1-channel slice is (:func:`brainseg.data.imageio.check_image`)."""
    f = to_uint8(flair.array)
    channels = [to_uint8(pre.array) if pre is not None else f, f, to_uint8(post.array) if post is not None else f]
    return list(np.stack(channels, axis=-1))
