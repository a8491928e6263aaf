"""A scanner volume in the model's slice orientation, and the geometry to put a mask back.

The network was trained on the Kaggle ``kaggle_3m`` slices: axial slices whose rows run from
anterior to posterior and whose columns run from the patient's right to left (radiological
display, as a DICOM axial slice with ImageOrientationPatient ``1\\0\\0\\0\\1\\0``), numbered from
inferior to superior. The row and slice directions are visible in the data (the eyes are at the
top, slice 1 is at the skull base); the right-left direction cannot be told from a brain's
symmetry, so it is an assumption (docs/scans.md says how to check it).

A volume is brought to that orientation by its own affine (nibabel's ``io_orientation`` and
``ornt_transform``, as nnU-Net's ``NibabelIOWithReorient`` and MONAI's ``Orientation`` do), never
from its array shape: a permutation and flips of the stored axes, no interpolation, so
:meth:`Geometry.to_stored` undoes it exactly and a mask goes back onto the stored voxels.

World coordinates are RAS+ millimetres (nibabel's and NIfTI's convention: +x towards the
patient's right, +y anterior, +z superior); DICOM's LPS positions are converted on reading.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import ClassVar

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from brainseg.data import imageio

# the (Z, H, W) array the model reads: slice inferior->superior, row anterior->posterior, column right->left
MODEL_AXCODES = ("S", "P", "L")
OBLIQUE_TOLERANCE_DEG = 1.0  # a stored axis may be this far off the scanner's axes (more: refused)


class BadScan(ValueError):
    """A scan that cannot be used. ``source`` names the file or folder, ``problem`` says why."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class VolumeLimits:
    """What one volume may hold, checked from headers before any voxel is decoded.

    ``max_voxels`` (``BRAINSEG_MAX_VOXELS``, default 512 x 512 x 256) bounds the decoded volume;
    ``max_slice_pixels`` and ``max_file_bytes`` are the slice decoder's limits
    (``BRAINSEG_MAX_PIXELS``, ``BRAINSEG_MAX_IMAGE_BYTES``: :mod:`brainseg.data.imageio`), per
    slice and per file.
    """

    max_voxels: int = 512 * 512 * 256
    max_slice_pixels: int = dataclasses.field(default_factory=imageio.pixel_limit)
    max_file_bytes: int = dataclasses.field(default_factory=imageio.byte_limit)

    ENV: ClassVar[str] = "BRAINSEG_MAX_VOXELS"

    @classmethod
    def from_env(cls, env=None) -> VolumeLimits:
        """Defaults, with ``BRAINSEG_MAX_VOXELS`` when set; ValueError naming it when not an int >= 1."""
        raw = ((os.environ if env is None else env).get(cls.ENV) or "").strip()
        if not raw:
            return cls()
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{cls.ENV}={raw!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"{cls.ENV}={raw!r} must be >= 1")
        return cls(max_voxels=value)

    def check(self, shape: tuple[int, ...], source: str) -> None:
        """:class:`BadScan` when a volume of ``shape`` (3 spatial axes) is over a limit (its largest
        plane counts as a slice: any axis may become the slice axis once reoriented)."""
        voxels = math.prod(int(n) for n in shape)
        if voxels > self.max_voxels:
            raise BadScan(source, f"{'x'.join(map(str, shape))} = {voxels:,} voxels is over the "
                                  f"{self.max_voxels:,}-voxel limit ({self.ENV})")
        plane = voxels // max(min(int(n) for n in shape), 1)
        if plane > self.max_slice_pixels:
            raise BadScan(source, f"slices of {plane:,} pixels are over the {self.max_slice_pixels:,}-pixel limit "
                                  "(BRAINSEG_MAX_PIXELS)")


def obliquity_deg(affine: np.ndarray) -> float:
    """The largest angle (degrees) between a stored axis and the nearest scanner axis (0: axis-aligned)."""
    rzs = np.asarray(affine, float)[:3, :3]
    norms = np.linalg.norm(rzs, axis=0)
    cosines = np.abs(rzs).max(axis=0) / np.where(norms > 0, norms, 1)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1, 1))))


def model_transform(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform from the stored axes to :data:`MODEL_AXCODES`."""
    return ornt_transform(io_orientation(affine), axcodes2ornt(MODEL_AXCODES))


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
    """Where a volume's voxels are: enough to read its model-oriented array and to write a mask
    with the same shape, affine and header.

    ``affine`` maps the stored voxel indices (i, j, k) to RAS+ mm; ``shape`` is the stored shape
    (a trailing singleton 4th dimension kept); ``header`` the NIfTI input's header (copied into
    the mask); ``dicom_files`` a DICOM series' files in stored slice order (k).
    """

    source: str
    kind: str  # "nifti" | "dicom" | "tiff" (slices without spacing: see brainseg.data.export)
    affine: np.ndarray
    shape: tuple[int, ...]
    header: nib.Nifti1Header | None = None
    dicom_files: tuple[str, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.shape[:3])

    @property
    def transform(self) -> np.ndarray:
        return model_transform(self.affine)

    @property
    def model_affine(self) -> np.ndarray:
        """(4, 4): model voxel (z, row, column) -> RAS+ mm."""
        return self.affine @ inv_ornt_aff(self.transform, self.spatial_shape)

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """(Z, H, W) of the model-oriented array."""
        order = self.transform[:, 0].astype(int)
        out = [0, 0, 0]
        for stored_axis, model_axis in enumerate(order):
            out[model_axis] = self.spatial_shape[stored_axis]
        return tuple(out)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing in mm, in the model's axes."""
        return tuple(float(v) for v in np.linalg.norm(self.model_affine[:3, :3], axis=0))

    @property
    def voxel_ml(self) -> float:
        """The volume of one voxel in millilitres (mm^3 / 1000)."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """The stored axes' directions (nibabel's codes: ``("L", "P", "S")`` is DICOM's LPS+)."""
        return tuple(nib.aff2axcodes(self.affine))

    def to_model(self, stored: np.ndarray) -> np.ndarray:
        """Stored array (i, j, k[, 1]) -> (Z, H, W) in the model's orientation (a permutation and flips)."""
        arr = np.asarray(stored).reshape(self.spatial_shape)
        return np.ascontiguousarray(apply_orientation(arr, self.transform))

    def to_stored(self, model: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_model`: (Z, H, W) -> the stored layout and shape, exactly."""
        model = np.asarray(model)
        if model.shape != self.model_shape:
            raise ValueError(f"array of shape {model.shape} does not fit {self.source} ({self.model_shape})")
        back = ornt_transform(axcodes2ornt(MODEL_AXCODES), io_orientation(self.affine))
        return np.ascontiguousarray(apply_orientation(model, back)).reshape(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class Scan:
    """A volume ready for the model: ``array`` (Z, H, W) in :data:`MODEL_AXCODES`, finite values."""

    array: np.ndarray
    geometry: Geometry

    @property
    def source(self) -> str:
        return self.geometry.source


def make_scan(stored: np.ndarray, geometry: Geometry) -> Scan:
    """Check a decoded volume (numeric, finite, axis-aligned within :data:`OBLIQUE_TOLERANCE_DEG`)
    and bring it to the model's orientation. Raises :class:`BadScan` naming ``geometry.source``."""
    source = geometry.source
    affine = np.asarray(geometry.affine, float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise BadScan(source, "the affine (voxel -> mm) is degenerate (zero or non-finite voxel size)")
    angle = obliquity_deg(affine)
    if angle > OBLIQUE_TOLERANCE_DEG:
        raise BadScan(source, f"oblique acquisition: a voxel axis is {angle:.1f} degrees off the scanner axes "
                              f"(at most {OBLIQUE_TOLERANCE_DEG:g} accepted); resample it onto an axis-aligned grid")
    stored = np.asarray(stored)
    if stored.dtype.kind not in "biuf":
        raise BadScan(source, f"voxel type {stored.dtype} is not a number type")
    if stored.dtype.kind == "f":
        bad = int(stored.size - np.isfinite(stored).sum())
        if bad:
            raise BadScan(source, f"{bad:,} voxels are NaN or infinite")
    return Scan(geometry.to_model(stored), geometry)
