"""The page's scanner volumes: a NIfTI upload (FLAIR, optionally pre- and post-contrast T1) read,
segmented as one patient by the path of ``brainseg predict --flair`` and shown slice by slice.

- :func:`parse_volume_uploads`: uploaded ``.nii`` / ``.nii.gz`` bytes -> a :class:`VolumeUpload`
  (the reader of ``brainseg predict --flair``, with its checks and limits, and the sequences put on
  the FLAIR's grid), or one problem line naming the uploaded file;
- :func:`analyse_volume`: the backend's masks (``segment_volume`` of the in-process or REST backend,
  else its slice interface with the volume as one patient), the per-slice and per-patient rows of
  :func:`brainseg.outcome.volume_features.volume_rows` (mm^2, mL, RAS mm);
- :func:`volume_views`, :func:`volume_line`, :func:`mask_download`: what the page shows and offers.

Nothing here imports Streamlit.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.app.backends import SegmentError
from brainseg.data.nifti import nifti_stem
from brainseg.data.scan import BadScan
from brainseg.data.volumes import read_scan, scan_name, write_mask
from brainseg.inference.volume import PatientScans, patient_scans, segment_scans
from brainseg.outcome.volume_features import UNKNOWN, volume_rows

VOLUME_TYPES = ["nii", "nii.gz"]  # what the volume pickers offer
SEQUENCE_LABELS = {"flair": "FLAIR", "pre": "pre-contrast T1", "post": "post-contrast T1"}
GRID_HINT = "upload sequences co-registered on the FLAIR's grid (or use brainseg predict --resample)"


@dataclasses.dataclass
class VolumeUpload:
    scans: PatientScans
    files: dict[str, tuple[str, bytes]]  # sequence -> (uploaded name, bytes), for a REST backend


@dataclasses.dataclass
class VolumeResult:
    upload: VolumeUpload
    images: list[np.ndarray]  # (H, W, 3) uint8 per slice, most inferior first
    masks: np.ndarray         # (Z, H, W) bool, model orientation
    slices: pd.DataFrame      # per slice: slice, features, area_mm2, RAS centroid
    patient: dict             # PATIENT_FEATURE_COLUMNS, tumor_volume_ml, spacing_mm, ...

    @property
    def name(self) -> str:
        return self.upload.scans.name


def parse_volume_uploads(files: dict[str, tuple[str, bytes] | None]) -> tuple[VolumeUpload | None, list[str]]:
    """``{"flair": (name, bytes), "pre": ..., "post": ...}`` (None: not uploaded) -> (upload or None,
    problems). A bad file is one line naming it as uploaded; nothing raises."""
    given = {k: v for k, v in files.items() if v is not None}
    if "flair" not in given:
        return None, (["a pre- or post-contrast volume needs its FLAIR: upload the FLAIR too"] if given else [])
    with tempfile.TemporaryDirectory(prefix="brainseg-upload-") as tmp:
        shown, scans = {}, {}
        for sequence, (name, data) in given.items():
            suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
            path = Path(tmp) / f"{sequence}{suffix}"
            path.write_bytes(data)
            shown[str(path)] = name
            try:
                scans[sequence] = read_scan(path)
            except BadScan as exc:
                return None, [_named(str(exc), shown)]
        name = scan_name(Path(nifti_stem(Path(given["flair"][0])) + ".nii"))
        try:
            patient = patient_scans(name, scans["flair"], scans.get("pre"), scans.get("post"), hint=GRID_HINT)
        except BadScan as exc:
            return None, [_named(str(exc), shown)]
    return VolumeUpload(patient, given), []


def _named(message: str, shown: dict[str, str]) -> str:
    for path, name in shown.items():
        message = message.replace(path, name)
    return message


def _masks(backend, upload: VolumeUpload) -> tuple[list[np.ndarray], np.ndarray]:
    """(slices, masks) by the backend's own volume path, else its slices as one patient."""
    if hasattr(backend, "segment_volume"):
        return backend.segment_volume(upload.scans, upload.files)

    def by_slices(images, groups):
        return [mask for mask, _ in backend.segment([(f"{upload.scans.name} slice {z + 1}", image)
                                                     for z, image in enumerate(images)], groups=groups)]

    return segment_scans(by_slices, upload.scans)


def analyse_volume(upload: VolumeUpload, backend) -> tuple[VolumeResult | None, list[str]]:
    """Segment an uploaded volume; (result, problems) with one problem line when the backend refuses."""
    try:
        images, masks = _masks(backend, upload)
    except SegmentError as exc:
        return None, [f"segmenter: {exc}"]
    slices, patient = volume_rows(upload.scans, images, masks)
    table = pd.DataFrame(slices).drop(columns="patient")
    return VolumeResult(upload, images, np.asarray(masks, bool), table, patient), []


def volume_metric(patient: dict) -> str:
    """The headline figure: ``12.35 mL``, or ``spacing unknown``."""
    ml = patient.get("tumor_volume_ml")
    known = patient.get("spacing_mm") != UNKNOWN and ml is not None and not math.isnan(ml)
    return f"{ml:.2f} mL" if known else "spacing unknown"


def volume_line(patient: dict) -> str:
    """The tumour's size as the page states it: mL where the spacing is known, else voxels and why.

    >>> volume_line({"tumor_volume_ml": 12.345, "tumor_volume_px": 9000, "spacing_mm": "0.9x0.9x3.3"})
    '12.35 mL (9,000 voxels of 0.9x0.9x3.3 mm)'
    >>> volume_line({"tumor_volume_ml": float("nan"), "tumor_volume_px": 9000, "spacing_mm": "unknown"})
    'spacing unknown: 9,000 voxels (no mL)'
    """
    voxels = f"{int(patient['tumor_volume_px']):,} voxels"
    if volume_metric(patient) == "spacing unknown":
        return f"spacing unknown: {voxels} (no mL)"
    return f"{volume_metric(patient)} ({voxels} of {patient['spacing_mm']} mm)"


def default_volume_slice(result: VolumeResult) -> int:
    """Index of the slice to open on: the largest predicted tumour, else the middle slice."""
    areas = result.masks.sum(axis=(1, 2))
    return int(np.argmax(areas)) if areas.any() else len(result.masks) // 2


def volume_views(result: VolumeResult, z: int) -> list[tuple[str, np.ndarray]]:
    """(caption, picture) of slice index ``z``: the FLAIR and the predicted overlay with its area."""
    from brainseg.evaluation.plots import overlay

    row = result.slices.iloc[z]
    area = f"{row['area_mm2']:.1f} mm²" if not math.isnan(row["area_mm2"]) else "spacing unknown"
    return [(f"{result.name} slice {z + 1} of {len(result.masks)}: FLAIR", result.images[z][:, :, 1]),
            (f"predicted tumor (red): {int(result.masks[z].sum())} px, {area}",
             overlay(result.images[z], result.masks[z]))]


def mask_download(result: VolumeResult) -> bytes:
    """The mask as ``.nii.gz`` in the FLAIR upload's geometry (shape, affine, header): opens over the scan."""
    with tempfile.TemporaryDirectory(prefix="brainseg-mask-") as tmp:
        return write_mask(result.masks, result.upload.scans.flair.geometry, Path(tmp) / "mask.nii.gz").read_bytes()
