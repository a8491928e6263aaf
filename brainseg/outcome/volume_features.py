"""A segmented scanner volume as feature rows: per slice and per patient, pixel and physical.

The rows ``brainseg predict --flair`` writes into features.csv / patients.csv, the served model
answers for a ``volume`` and the page shows for a NIfTI upload: the pixel features of
:mod:`brainseg.outcome.features` (as for slice files) and, where the spacing is known, the physical
columns of :mod:`brainseg.outcome.physical` (area in mm^2, volume in mL, RAS centroid and extent).
A volume stacked from Kaggle slices (``Geometry.kind == "tiff"``: no real spacing) gets null
physical columns and ``spacing_mm`` ``unknown``.
"""

from __future__ import annotations

import numpy as np

from brainseg.outcome import features, physical

UNKNOWN = "unknown"


def spacing_text(geometry) -> str:
    """``row x column x slice`` spacing in mm (``0.9x0.9x3.3``), or ``unknown`` for slices without spacing."""
    if geometry.kind == "tiff":
        return UNKNOWN
    sz, sr, sc = geometry.spacing
    return f"{sr:.4g}x{sc:.4g}x{sz:.4g}"


def volume_rows(scans, images, masks: np.ndarray) -> tuple[list[dict], dict]:
    """(one row per slice, one patient row) of a segmented volume.

    ``scans``: a :class:`brainseg.inference.volume.PatientScans`; ``images``: its (H, W, 3) uint8
    slices; ``masks``: (Z, H, W) bool, model orientation. Slice ``1`` is the most inferior, as the
    Kaggle numbering. Slice rows: ``patient``, ``slice``, SLICE_FEATURE_COLUMNS,
    PHYSICAL_SLICE_COLUMNS. Patient row: ``patient``, ``slices``, PATIENT_FEATURE_COLUMNS,
    PHYSICAL_PATIENT_COLUMNS, ``coordinates`` (``RAS``, or empty), ``spacing_mm``, ``resampled``.
    """
    geometry = scans.flair.geometry
    known = geometry.kind != "tiff"
    affine = geometry.model_affine if known else None
    rows = [{"patient": scans.name, "slice": z + 1, **features.slice_features(mask, image),
             **physical.slice_physical(mask, z, affine)} for z, (image, mask) in enumerate(zip(images, masks))]
    numbers = list(range(1, len(masks) + 1))
    patient = {"patient": scans.name, "slices": len(masks),
               **features.patient_features_from_masks(scans.name, numbers, list(masks)),
               **physical.patient_physical(masks, affine),
               "coordinates": physical.COORDINATES if known else "", "spacing_mm": spacing_text(geometry),
               "resampled": ",".join(scans.resampled)}
    return rows, patient
