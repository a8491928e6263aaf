"""A folder holding one DICOM series -> a :class:`~brainseg.data.scan.Scan` (pydicom).

Every file's header is read first (no pixel data): one series, single-frame grey images, one
orientation, pixel spacing and size, slices sorted by their position along the slice normal
(ImagePositionPatient projected on the cross product of ImageOrientationPatient's two
directions, as dcm2niix and nibabel's nicom do) and evenly spaced; a gap of a missing slice, two
slices at one position, two series or an oblique series are refused naming the folder and the
file. Only then is the pixel data decoded (RescaleSlope / RescaleIntercept applied) and stacked
as (column, row, slice) with the affine of the DICOM standard (C.7.6.2.1.1), converted from the
patient's LPS to RAS+ millimetres.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from brainseg.data.scan import BadScan, Geometry, Scan, VolumeLimits, make_scan

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_TOLERANCE = 0.01  # slice steps may differ from the median step by this share (more: a gap)
REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def _headers(folder: Path, limits: VolumeLimits) -> list[tuple[Path, pydicom.Dataset]]:
    found = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if f.name.upper() == "DICOMDIR":
            continue
        if f.stat().st_size > limits.max_file_bytes:
            raise BadScan(str(f), f"{f.stat().st_size:,} bytes is over the {limits.max_file_bytes:,}-byte limit "
                                  "for one file (BRAINSEG_MAX_IMAGE_BYTES)")
        try:
            found.append((f, pydicom.dcmread(f, stop_before_pixels=True)))
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
            continue  # not DICOM (a README, a thumbnail): the series is what is DICOM
    return found


def _one_series(folder: Path, found: list[tuple[Path, pydicom.Dataset]]) -> list[tuple[Path, pydicom.Dataset]]:
    if not found:
        raise BadScan(str(folder), "no DICOM files found in this folder")
    series: dict[str, list] = {}
    for f, ds in found:
        series.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append((f, ds))
    if len(series) > 1:
        desc = "; ".join(f"{uid} ({items[0][1].get('SeriesDescription', 'no description')}, {len(items)} files)"
                         for uid, items in sorted(series.items()))
        raise BadScan(str(folder), f"{len(series)} DICOM series ({desc}): put one series per folder")
    return next(iter(series.values()))


def _check_slices(folder: Path, items: list[tuple[Path, pydicom.Dataset]]) -> None:
    for f, ds in items:
        missing = [k for k in REQUIRED if k not in ds]
        if missing:
            raise BadScan(str(f), f"no {', '.join(missing)}: not an image with a position in the scanner")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise BadScan(str(f), "a multi-frame (enhanced) DICOM image: export the series as single-frame images")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise BadScan(str(f), f"{ds.SamplesPerPixel} samples per pixel: a grey MR image is expected")
    f0, d0 = items[0]
    iop0 = np.asarray(d0.ImageOrientationPatient, float)
    for f, ds in items[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop0, atol=1e-4):
            raise BadScan(str(folder), f"{f.name} and {f0.name} have different orientations (ImageOrientationPatient)")
        if (int(ds.Rows), int(ds.Columns)) != (int(d0.Rows), int(d0.Columns)):
            raise BadScan(str(folder), f"{f.name} is {ds.Rows}x{ds.Columns} pixels, {f0.name} {d0.Rows}x{d0.Columns}")
        if not np.allclose(np.asarray(ds.PixelSpacing, float), np.asarray(d0.PixelSpacing, float), atol=1e-4):
            raise BadScan(str(folder), f"{f.name} and {f0.name} have different pixel spacings")
    if len(items) < 2:
        raise BadScan(str(folder), "a single slice (a 2-D image), not a volume")


def _sorted_positions(folder: Path, items: list) -> tuple[list, np.ndarray]:
    """Slices sorted along the normal; :class:`BadScan` for repeated positions or uneven steps (a gap)."""
    iop = np.asarray(items[0][1].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    where = np.array([float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for _, ds in items])
    order = np.argsort(where, kind="stable")
    items, where = [items[i] for i in order], where[order]
    steps = np.diff(where)
    same = np.flatnonzero(steps < 1e-3)
    if same.size:
        a, b = items[same[0]][0].name, items[same[0] + 1][0].name
        raise BadScan(str(folder), f"{a} and {b} are at the same position: two slices in one place (a repeated "
                                   "acquisition or two series with one UID)")
    median = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - median) > SPACING_TOLERANCE * median)
    if off.size:
        i = int(off[0])
        what = "a slice is missing" if steps[i] > median else "the slices are unevenly spaced"
        raise BadScan(str(folder), f"the slice spacing is {median:.4g} mm but {steps[i]:.4g} mm between "
                                   f"{items[i][0].name} and {items[i + 1][0].name}: {what}")
    return items, where


def _pixels(f: Path, rows: int, cols: int) -> np.ndarray:
    try:
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array
    except Exception as exc:  # pydicom's decoders raise many types (a missing codec, damaged data)
        raise BadScan(str(f), f"pixel data cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if arr.shape != (rows, cols):
        raise BadScan(str(f), f"pixel data is {'x'.join(map(str, arr.shape))}, the header says {rows}x{cols}")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return arr


def dicom_affine(first: pydicom.Dataset, last: pydicom.Dataset, n: int) -> np.ndarray:
    """(4, 4) RAS+ affine of a stack stored as (column, row, slice), ``first`` and ``last`` its end slices.

    DICOM: pixel (row r, column c) of a slice sits at ImagePositionPatient + c * PixelSpacing[1] *
    (row direction) + r * PixelSpacing[0] * (column direction), in LPS mm.
    """
    iop = np.asarray(first.ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    p0, p1 = np.asarray(first.ImagePositionPatient, float), np.asarray(last.ImagePositionPatient, float)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing
    lps[:3, 1] = iop[3:] * row_spacing
    lps[:3, 2] = (p1 - p0) / (n - 1)
    lps[:3, 3] = p0
    return LPS_TO_RAS @ lps


def read_dicom_series(folder: Path, limits: VolumeLimits | None = None) -> Scan:
    """A folder holding one DICOM series -> :class:`Scan`; :class:`BadScan` naming the folder or file."""
    folder = Path(folder)
    limits = limits or VolumeLimits.from_env()
    items = _one_series(folder, _headers(folder, limits))
    _check_slices(folder, items)
    items, _ = _sorted_positions(folder, items)
    rows, cols = int(items[0][1].Rows), int(items[0][1].Columns)
    limits.check((cols, rows, len(items)), str(folder))
    stored = np.stack([_pixels(f, rows, cols).T for f, _ in items], axis=2)  # (column, row, slice)
    affine = dicom_affine(items[0][1], items[-1][1], len(items))
    geometry = Geometry(str(folder), "dicom", affine, stored.shape, None, tuple(str(f) for f, _ in items))
    return make_scan(stored, geometry)
