"""``brainseg predict --flair``: one patient given as volumes (NIfTI files or DICOM series folders).

The volumes are read in the model's slice orientation (:mod:`brainseg.data.volumes`), put on the
FLAIR's grid (refused when they are not, unless ``resample``), turned into the (H, W, 3) uint8
slices the TIFF path sees (pre-contrast, FLAIR, post-contrast: :mod:`brainseg.inference.volume`, the
path the served model's ``volume`` column and the page take too) and segmented by the same
:meth:`Segmenter.segment <brainseg.inference.segmenter.Segmenter.segment>` call as ``brainseg
predict`` on slice files, the volume's slices as one patient (so the stored 3-D post-processing
applies). Written: the mask as ``<name>_mask.nii.gz`` in the FLAIR's own geometry (and
``<name>_seg.dcm``, a DICOM SEG, for a DICOM FLAIR), the per-slice masks and overlays, and
features.csv / patients.csv with the physical columns of :mod:`brainseg.outcome.physical`
(:func:`brainseg.outcome.volume_features.volume_rows`).
Everything is written into a temporary folder inside ``out_dir`` and moved into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import brainseg
from brainseg.data import imageio
from brainseg.data.dicom_seg import write_dicom_seg
from brainseg.data.scan import BadScan
from brainseg.data.volumes import write_mask
from brainseg.evaluation import plots
from brainseg.inference.volume import PatientScans, ScanRefused, check_channels, load_scans, segment_scans
from brainseg.outcome.volume_features import volume_rows
from brainseg.pipeline.predict import ModelNotFound, write_atomic


@dataclasses.dataclass
class ScanPrediction:
    slices: pd.DataFrame    # one row per slice: identity, SLICE_FEATURE_COLUMNS, PHYSICAL_SLICE_COLUMNS, files
    patients: pd.DataFrame  # one row: PATIENT_FEATURE_COLUMNS, PHYSICAL_PATIENT_COLUMNS, spacing, mask files
    masks: np.ndarray       # (Z, H, W) bool, model orientation
    files: list[str]        # written into out_dir
    problems: list[str] = dataclasses.field(default_factory=list)  # e.g. a DICOM SEG that could not be made


def _tables(scans: PatientScans, images, masks: np.ndarray, files: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, patient = volume_rows(scans, images, masks)
    source = scans.flair.geometry.source
    table = [{"file": source, "patient": scans.name, "patient_dir": scans.name,
              **{k: v for k, v in r.items() if k != "patient"},
              "mask_file": files["pred"][z], "overlay_file": files["overlay"][z]} for z, r in enumerate(rows)]
    patient |= {"mask_file": files["mask"], "seg_file": files.get("seg", "")}
    return pd.DataFrame(table), pd.DataFrame([patient])


def write_prediction(scans: PatientScans, images, masks: np.ndarray, out_dir: Path) -> ScanPrediction:
    """Write every output into a temporary folder inside ``out_dir``, then move the files into place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = scans.name
    files = {"pred": [f"{name}_{z + 1}_pred.png" for z in range(len(masks))],
             "overlay": [f"{name}_{z + 1}_overlay.png" for z in range(len(masks))],
             "mask": f"{name}_mask.nii.gz"}
    if scans.flair.geometry.kind == "dicom":
        files["seg"] = f"{name}_seg.dcm"
    tmp = Path(tempfile.mkdtemp(prefix=".brainseg-predict-", dir=out_dir))
    try:
        for image, mask, pred, over in zip(images, masks, files["pred"], files["overlay"]):
            write_atomic(tmp / pred, imageio.encode_png(mask.astype(np.uint8) * 255))
            write_atomic(tmp / over, imageio.encode_png(plots.overlay(image, mask)))
        write_mask(masks, scans.flair.geometry, tmp / files["mask"])
        problems = []
        if "seg" in files:
            try:
                write_dicom_seg(masks, scans.flair.geometry, tmp / files["seg"], brainseg.__version__)
            except (ValueError, TypeError, AttributeError, KeyError) as exc:  # highdicom's refusals of a series
                problems.append(f"{scans.flair.source}: no DICOM SEG written ({str(exc)[:200]}); "
                                "the NIfTI mask and the rest are")
                del files["seg"]
        table, patients = _tables(scans, images, masks, files)
        write_atomic(tmp / "features.csv", table.to_csv(index=False).encode())
        write_atomic(tmp / "patients.csv", patients.to_csv(index=False).encode())
        written = sorted(p.name for p in tmp.iterdir())
        for f in written:
            os.replace(tmp / f, out_dir / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ScanPrediction(table, patients, masks, written, problems)


def predict_scan_to_folder(flair: Path, out_dir: Path, model_uri: str, *, pre: Path | None = None,
                           post: Path | None = None, resample: bool = False, name: str | None = None,
                           threshold: float | None = None, progress=None) -> ScanPrediction:
    """``brainseg predict --flair``: read the volumes (:class:`BadScan` before the model loads),
    load ``model_uri`` (:class:`ModelNotFound`), check its channels (:class:`ScanRefused`),
    segment and write into ``out_dir``. ``progress(total)`` as in :func:`predict_to_folder
    <brainseg.pipeline.predict.predict_to_folder>`."""
    from brainseg.registry.model_registry import load_segmenter  # TensorFlow and MLflow load here

    scans = load_scans(flair, pre, post, resample=resample, name=name)
    try:
        segmenter = load_segmenter(model_uri)
    except FileNotFoundError as exc:
        raise ModelNotFound(str(exc)) from exc
    check_channels(segmenter.cfg.channels, scans, model_uri)
    if threshold is not None:
        segmenter = segmenter.with_settings(threshold=threshold)
    total = scans.flair.array.shape[0]
    with (progress or (lambda n: contextlib.nullcontext(None)))(total) as advance:
        images, masks = segment_scans(lambda ims, groups: segmenter.segment(ims, groups=groups).masks, scans)
        if advance:
            advance(total)
    return write_prediction(scans, images, masks, out_dir)


__all__ = ["BadScan", "ModelNotFound", "PatientScans", "ScanPrediction", "ScanRefused", "load_scans",
           "predict_scan_to_folder"]
