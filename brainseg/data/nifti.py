"""NIfTI volumes (``.nii``, ``.nii.gz``) in and out, with nibabel, checked before decoding.

Reading takes the header first (dimensions, voxel type, orientation codes) and checks it against
the :class:`~brainseg.data.scan.VolumeLimits`; then it decompresses exactly the bytes the header
declares, plus one: fewer means a truncated file or a header whose dimensions overstate the data,
more means dimensions that understate it. A gzip bomb is never decompressed past that.

Writing keeps the input's header (qform, sform and their codes, units) with only the voxel type
changed, so the output has the input's affine and shape exactly; files are written beside their
target and renamed into place, never left half-written.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from brainseg.data.scan import BadScan, Geometry, Scan, VolumeLimits, make_scan

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NO_SPACING = b"brainseg: slices without spacing, 1 mm written"  # the descrip of `brainseg data export`'s files


def is_nifti(path: Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """``scan.nii.gz`` -> ``scan``."""
    name = Path(path).name
    return name[:-7] if name.lower().endswith(".nii.gz") else name[:-4] if name.lower().endswith(".nii") else name


def _read_capped(path: Path, limit: int) -> bytes:
    """The decompressed bytes of ``path`` (gzip or plain), at most ``limit`` of them."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        return fh.read(limit)


def _spatial_shape(shape: tuple[int, ...], source: str) -> tuple[int, ...]:
    """3 spatial dimensions (a trailing singleton 4th accepted); :class:`BadScan` otherwise."""
    if len(shape) < 3:
        raise BadScan(source, f"a {len(shape)}-D image ({'x'.join(map(str, shape))}), not a 3-D volume")
    if len(shape) > 3 and math.prod(shape[3:]) != 1:
        raise BadScan(source, f"a {len(shape)}-D volume ({'x'.join(map(str, shape))}): one 3-D volume per file "
                              "is read (split the series, e.g. fslsplit, or pass a single time point)")
    if min(shape[:3]) < 1:
        raise BadScan(source, f"empty volume ({'x'.join(map(str, shape))})")
    return shape[:3]


def read_nifti(path: Path, limits: VolumeLimits | None = None) -> Scan:
    """A ``.nii`` / ``.nii.gz`` file -> :class:`Scan`; :class:`BadScan` naming the file otherwise."""
    path, source = Path(path), str(path)
    limits = limits or VolumeLimits.from_env()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadScan(source, f"cannot read file ({exc.strerror})") from exc
    if size == 0:
        raise BadScan(source, "zero-byte file")
    if size > limits.max_file_bytes:
        raise BadScan(source, f"{size:,} bytes is over the {limits.max_file_bytes:,}-byte limit for one file "
                              "(BRAINSEG_MAX_IMAGE_BYTES)")
    try:
        lazy = nib.load(path)  # the header only: no voxel is decoded here
    except Exception as exc:  # nibabel raises many types for a damaged or foreign file
        raise BadScan(source, f"not a readable NIfTI file (truncated or damaged header: {type(exc).__name__})") from exc
    if not isinstance(lazy, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadScan(source, f"a {type(lazy).__name__}, not a NIfTI image")
    header = lazy.header
    shape = tuple(int(n) for n in header.get_data_shape())
    spatial = _spatial_shape(shape, source)
    limits.check(spatial, source)
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise BadScan(source, f"voxel type {dtype} is not a number type (RGB and complex volumes are not read)")
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        raise BadScan(source, "no orientation in the header (sform_code and qform_code are both 0): "
                              "the voxels cannot be placed in the scanner's space")
    offset = int(getattr(lazy.dataobj, "offset", header.get_data_offset()))  # the file's (img.header: 0)
    expected = offset + math.prod(shape) * dtype.itemsize
    try:
        raw = _read_capped(path, expected + 1)
    except (EOFError, OSError, zlib.error) as exc:
        raise BadScan(source, f"truncated or damaged data ({type(exc).__name__}: {str(exc)[:120]})") from exc
    dims = f"header says {'x'.join(map(str, shape))} {dtype} voxels"
    if len(raw) < expected:
        raise BadScan(source, f"{dims} ({expected - offset:,} bytes) but the file holds {max(len(raw) - offset, 0):,}: "
                              "truncated, or dimensions that disagree with the data")
    if len(raw) > expected:
        raise BadScan(source, f"{dims} ({expected - offset:,} bytes) but the file holds more data: "
                              "dimensions that disagree with the data")
    try:
        img = type(lazy).from_bytes(raw)
        data = np.asanyarray(img.dataobj)  # scl_slope / scl_inter applied
    except Exception as exc:
        raise BadScan(source, f"unreadable voxel data ({type(exc).__name__}: {str(exc)[:120]})") from exc
    kind = "tiff" if bytes(header["descrip"].item()).startswith(NO_SPACING) else "nifti"  # no real spacing
    geometry = Geometry(source, kind, np.asarray(img.affine, float), shape, img.header.copy())
    return make_scan(data, geometry)


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    path = Path(path)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    tmp = path.with_name(f".{path.name}.part{suffix}")
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_nifti(model_array: np.ndarray, geometry: Geometry, path: Path, dtype=np.uint8) -> Path:
    """Write a (Z, H, W) model-oriented array into ``path`` in ``geometry``'s stored layout, shape and
    affine (the input's header copied for a NIfTI input; sform and qform codes 1, scanner, otherwise)."""
    stored = geometry.to_stored(np.asarray(model_array).astype(dtype))
    if geometry.header is not None:
        header = geometry.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(1, 0)
        header["cal_min"], header["cal_max"] = 0, 0
        cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = cls(stored, geometry.affine, header)
    else:  # DICOM: scanner coordinates (code 1); slices without spacing: only aligned (code 2)
        code = 2 if geometry.kind == "tiff" else 1
        img = nib.Nifti1Image(stored, geometry.affine)
        img.header.set_data_dtype(dtype)
        img.set_sform(geometry.affine, code=code)
        img.set_qform(geometry.affine, code=code)
        img.header.set_xyzt_units("mm")
        if geometry.kind == "tiff":
            img.header["descrip"] = NO_SPACING
    _atomic_save(img, Path(path))
    return Path(path)
