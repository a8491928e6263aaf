"""A mask as a DICOM Segmentation object referencing its source series (highdicom).

One binary segment, "FLAIR abnormality" (SNOMED CT: category Morphologically abnormal structure,
type Neoplasm), algorithm type AUTOMATIC; one frame per source slice (empty ones kept), so a PACS
viewer or 3D Slicer (QuantitativeReporting) shows it over the series it was computed from.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from brainseg.data.scan import Geometry

SEGMENT_LABEL = "FLAIR abnormality"


def segment_description(version: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="brainseg", version=version, family=codes.DCM.ArtificialIntelligence),
        tracking_uid=hd.UID(), tracking_id=SEGMENT_LABEL)


def write_dicom_seg(mask: np.ndarray, geometry: Geometry, path: Path, version: str = "0") -> Path:
    """Write a (Z, H, W) model-oriented bool ``mask`` of a DICOM input as a SEG file at ``path``
    (written beside it, then renamed). ValueError when ``geometry`` is not a DICOM series."""
    if geometry.kind != "dicom" or not geometry.dicom_files:
        raise ValueError(f"{geometry.source}: a DICOM SEG needs a DICOM series as input")
    stored = geometry.to_stored(np.asarray(mask, bool))  # (column, row, slice) of the series
    frames = np.ascontiguousarray(np.transpose(stored, (2, 1, 0))).astype(np.uint8)  # (slice, row, column)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in geometry.dicom_files]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(version)], series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="brainseg", manufacturer_model_name="brainseg",
        software_versions=version, device_serial_number="0", series_description=f"brainseg {SEGMENT_LABEL}",
        omit_empty_frames=False)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        seg.save_as(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
