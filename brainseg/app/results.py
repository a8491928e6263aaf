"""The page's results: segment the parsed slices, tabulate, summarise per patient, pictures, downloads.

The data has no pixel spacing, so every length is in pixels and every area in pixels (px); the
glossary (:data:`SLICE_GLOSSARY`, :data:`PATIENT_GLOSSARY`) gives each column its unit and a
one-line meaning, shown with the tables.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import zipfile
from collections.abc import Callable
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from brainseg.app.backends import SegmentError
from brainseg.app.uploads import SliceInput
from brainseg.data import imageio
from brainseg.evaluation.metrics import confusion, dice_from_counts
from brainseg.outcome.features import SLICE_FEATURE_COLUMNS
from brainseg.pipeline.slices import patient_rows, volume_chunks

MAX_VOLUME = 256  # slices of one patient sent together (predict's chunk), so the 3-D post-processing sees the volume

# column -> (unit, one-line meaning). No pixel spacing in the data: lengths and areas are pixels.
SLICE_GLOSSARY = {
    "file": ("", "the uploaded file (or archive/member)"),
    "patient": ("", "patient id from the public folder naming, else the folder name"),
    "slice": ("number", "slice number from <folder>_<n>.tif (0 when the name has none)"),
    "tumor": ("yes/no", "the model predicts at least one tumor pixel"),
    "area_px": ("px", "predicted tumor area in pixels (no pixel spacing in the data, so not mm²)"),
    "area_pct": ("%", "tumor pixels as a percent of the whole image"),
    "area_pct_brain": ("%", "tumor pixels as a percent of the head (FLAIR > 0)"),
    "centroid_x": ("px", "tumor centre, column (from the left edge)"),
    "centroid_y": ("px", "tumor centre, row (from the top edge)"),
    "spread_x": ("px", "standard deviation of the tumor's columns (its width scale)"),
    "spread_y": ("px", "standard deviation of the tumor's rows (its height scale)"),
    "bbox_x0": ("px", "bounding box, first column"),
    "bbox_y0": ("px", "bounding box, first row"),
    "bbox_x1": ("px", "bounding box, column after the last"),
    "bbox_y1": ("px", "bounding box, row after the last"),
    "perimeter": ("px", "outline length of the tumor region"),
    "eccentricity": ("0-1", "0 for a circle, towards 1 for an elongated shape"),
    "solidity": ("0-1", "area / convex-hull area: 1 for a convex shape, lower for ragged or split ones"),
    "n_components": ("count", "separate tumor blobs (8-connected)"),
    "truth_area_px": ("px", "tumor area in the uploaded *_mask file"),
    "dice_vs_truth": ("0-1", "overlap of prediction and uploaded mask, 2|A∩B|/(|A|+|B|); blank if both empty"),
}
PATIENT_GLOSSARY = {
    "patient": ("", "patient id"),
    "slices": ("count", "slices uploaded for the patient"),
    "tumor_volume_px": ("px", "predicted tumor pixels summed over all slices (pixel-slices; no spacing, so not mm³)"),
    "tumor_slices": ("count", "slices with predicted tumor"),
    "largest_slice_area_px": ("px", "tumor area on the slice with the most tumor"),
    "centroid_x": ("px", "tumor centre over the volume, column"),
    "centroid_y": ("px", "tumor centre over the volume, row"),
    "centroid_z": ("slice", "tumor centre over the volume, slice number"),
    "extent_z": ("slices", "from the first to the last tumor slice, both counted"),
    "bounding_ellipsoid_volume_ratio": ("0-1", "tumor volume / its moment ellipsoid: ~1 solid, lower elongated "
                                               "or split"),
    "margin_fluctuation": ("ratio", "std / mean of the outline's distance to the centre (largest slice): 0 round"),
    "angular_std": ("ratio", "irregularity of the outline by angle sector (largest slice): 0 round"),
    "truth_volume_px": ("px", "tumor pixels in the uploaded masks, all slices"),
    "volume_dice": ("0-1", "overlap of the predicted and uploaded tumor volumes"),
}


def glossary_table(columns: list[str], glossary: dict) -> pd.DataFrame:
    """``column``, ``unit``, ``meaning`` for the columns of a shown table (unknown ones left out)."""
    rows = [{"column": c, "unit": glossary[c][0], "meaning": glossary[c][1]} for c in columns if c in glossary]
    return pd.DataFrame(rows, columns=["column", "unit", "meaning"])


def column_label(column: str, glossary: dict) -> str:
    """``area_px`` -> ``area_px (px)``: the header with its unit."""
    unit = glossary.get(column, ("", ""))[0]
    return f"{column} ({unit})" if unit and unit not in ("yes/no",) else column


@dataclasses.dataclass
class SliceResult:
    item: SliceInput
    mask: np.ndarray   # (H, W) bool, predicted
    features: dict     # keyed as SLICE_FEATURE_COLUMNS

    @property
    def dice(self) -> float:
        """Dice of prediction vs truth; NaN without a truth mask or when both are empty."""
        if self.item.truth is None:
            return math.nan
        return dice_from_counts(*confusion(self.mask, self.item.truth))


def _segment(backend, chunk: list[SliceInput]) -> list[tuple[np.ndarray, dict]]:
    outputs = backend.segment([(s.name, s.model_input()) for s in chunk], groups=[s.patient for s in chunk])
    if len(outputs) != len(chunk):
        raise SegmentError(f"segmenter returned {len(outputs)} results for {len(chunk)} slices",
                           per_item=False)
    for s, (mask, _) in zip(chunk, outputs):
        if mask.shape != s.image.shape[:2]:
            raise SegmentError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the slice is "
                               f"{s.image.shape[1]}x{s.image.shape[0]}")
    return outputs


def volumes(slices: list[SliceInput], limit: int = MAX_VOLUME) -> list[list[SliceInput]]:
    """Consecutive slices of one patient (slices arrive sorted by patient, slice) as one chunk, at
    most ``limit`` long: what ``brainseg predict`` sends the segmenter together."""
    return volume_chunks(slices, lambda s: s.patient, limit)


def request_chunks(slices: list[SliceInput], limits=None) -> list[list[SliceInput]]:
    """:func:`volumes`, each cut further to what one call of the backend may hold (``limits``: a
    :class:`brainseg.serving.limits.RequestLimits`, rows and total pixels; None: no limit)."""
    if limits is None:
        return volumes(slices)
    out = []
    for chunk in volumes(slices, min(MAX_VOLUME, limits.max_rows)):
        part, pixels = [], 0
        for s in chunk:
            size = s.image.shape[0] * s.image.shape[1]
            if part and pixels + size > limits.max_pixels:
                out.append(part)
                part, pixels = [], 0
            part.append(s)
            pixels += size
        out.append(part)
    return out


def _one_by_one(backend, chunk: list[SliceInput], problems: list[str]):
    """Each slice of a refused chunk alone: (accepted slices, their outputs); the refused ones are
    added to ``problems``. SegmentError (not per item) when the backend itself fails."""
    good, outputs = [], []
    for s in chunk:
        try:
            outputs += _segment(backend, [s])
            good.append(s)
        except SegmentError as one:
            if not one.per_item:
                raise
            problems.append(f"{s.name}: {one}")
    return good, outputs


def _split_note(chunk: list[SliceInput], why: str) -> str:
    return (f"patient {chunk[0].patient}: {len(chunk)} slices were not segmented together ({why}); "
            "the per-volume post-processing (largest 3-D component) saw only part of the volume")


def _refused(backend, chunk: list[SliceInput], exc: SegmentError, problems: list[str]):
    """A chunk refused as input: each slice alone finds the refused ones (a problem line each); the
    rest goes again together, or keeps its one-by-one masks with a problem line when the segmenter
    refuses it together (e.g. a request limit). Returns (slices, outputs); SegmentError (not per
    item) when the backend itself fails."""
    good, outputs = _one_by_one(backend, chunk, problems)
    if good and len(good) < len(chunk):
        try:
            return good, _segment(backend, good)
        except SegmentError as again:
            if not again.per_item:
                raise
            exc = again
    if good:
        problems.append(_split_note(good, f"refused together: {exc}"))
    return good, outputs


def analyse(slices: list[SliceInput], backend, progress: Callable[[int, int], None] | None = None
            ) -> tuple[list[SliceResult], list[str]]:
    """Segment ``slices`` a patient volume at a time, cut to the backend's ``limits`` per call
    (with a problem line when a patient is cut). Refused slices cost only themselves
    (:func:`_refused`); a failing backend stops with one problem line."""
    results, problems, done = [], [], 0
    chunks = request_chunks(slices, getattr(backend, "limits", None))
    cut = dict.fromkeys(a[0].patient for a, b in itertools.pairwise(chunks) if a[0].patient == b[0].patient)
    problems += [_split_note([s for s in slices if s.patient == p], "the segmenter's request limits") for p in cut]
    for chunk in chunks:
        try:
            try:
                outputs = _segment(backend, chunk)
            except SegmentError as exc:
                if not exc.per_item:
                    raise
                chunk, outputs = _refused(backend, chunk, exc, problems)
        except SegmentError as failed:
            return results, problems + [f"segmenter: {failed}"]
        results += [SliceResult(s, *out) for s, out in zip(chunk, outputs)]
        done += len(chunk)
        if progress:
            progress(min(done, len(slices)), len(slices))
    return results, problems


def slice_table(results: list[SliceResult]) -> pd.DataFrame:
    """One row per slice: file, patient, slice, the features, and truth area / Dice where known."""
    with_truth = any(r.item.truth is not None for r in results)
    rows = []
    for r in results:
        row = {"file": r.item.name, "patient": r.item.patient, "slice": r.item.slice, **r.features}
        if with_truth:
            row["truth_area_px"] = int(r.item.truth.sum()) if r.item.truth is not None else math.nan
            row["dice_vs_truth"] = r.dice
        rows.append(row)
    columns = ["file", "patient", "slice"] + SLICE_FEATURE_COLUMNS
    if with_truth:
        columns += ["truth_area_px", "dice_vs_truth"]
    return pd.DataFrame(rows, columns=columns)


def by_patient(results: list[SliceResult]) -> dict[str, list[SliceResult]]:
    """Results grouped by patient (in slice order, as parsed)."""
    groups: dict[str, list[SliceResult]] = {}
    for r in results:
        groups.setdefault(r.item.patient, []).append(r)
    return groups


def patient_table(results: list[SliceResult]) -> tuple[pd.DataFrame, list[str]]:
    """Per patient: slices, volume features of the predicted masks (:func:`brainseg.pipeline.slices.patient_rows`,
    as ``brainseg predict`` computes them), and the volume Dice against the truth when every slice
    has one. Patients whose volume cannot be assembled get a problem line instead."""
    rows, problems = patient_rows((r.item.patient, r.item.slice, r.mask) for r in results)
    groups = by_patient(results)
    for row in rows:
        group = groups[row["patient"]]
        if all(r.item.truth is not None for r in group):
            tp, fp, fn = np.sum([confusion(r.mask, r.item.truth) for r in group], axis=0)
            row["truth_volume_px"] = int(tp + fn)
            row["volume_dice"] = dice_from_counts(tp, fp, fn)
    return pd.DataFrame(rows), problems


def area_by_slice(group: list[SliceResult]) -> pd.DataFrame:
    """Tumor area (pixels) per slice number: ``predicted`` and, where known, ``truth``."""
    frame = pd.DataFrame({"slice": [r.item.slice for r in group],
                          "predicted": [int(r.mask.sum()) for r in group]})
    if all(r.item.truth is not None for r in group):
        frame["truth"] = [int(r.item.truth.sum()) for r in group]
    return frame.set_index("slice")


def with_provenance(table: pd.DataFrame, provenance: dict) -> pd.DataFrame:
    """``table`` plus the columns saying which model and data version produced it."""
    return table.assign(model=provenance.get("model", ""),
                        model_version=provenance.get("version", ""),
                        model_run_id=provenance.get("run_id", ""),
                        data_version=provenance.get("data_version", ""),
                        data_kind=provenance.get("data_kind", ""))


def default_slice(group: list[SliceResult]) -> int:
    """Index of the slice to show first: the largest predicted tumor, else the largest true one,
    else the middle slice."""
    for areas in ([int(r.mask.sum()) for r in group],
                  [int(r.item.truth.sum()) if r.item.truth is not None else 0 for r in group]):
        if any(areas):
            return int(np.argmax(areas))
    return len(group) // 2


def slice_views(r: SliceResult) -> list[tuple[str, np.ndarray]]:
    """(caption, picture) to show for a slice: FLAIR, predicted overlay, truth overlay if known."""
    from brainseg.evaluation.plots import overlay

    views = [(f"{r.item.name}: FLAIR", r.item.image[:, :, 1]),
             (f"predicted tumor (red): {int(r.mask.sum())} px", overlay(r.item.image, r.mask))]
    if r.item.truth is not None:
        dice = "n/a (both empty)" if math.isnan(r.dice) else f"{r.dice:.3f}"
        views.append((f"truth (green): {int(r.item.truth.sum())} px, Dice {dice}",
                      overlay(r.item.image, r.item.truth, (0, 255, 0))))
    return views


def csv_bytes(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False).encode()


def masks_zip(results: list[SliceResult]) -> bytes:
    """The predicted masks as ``<patient folder>/<stem>_pred.png`` (0/255) in a zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for r in results:
            stem = PurePosixPath(r.item.name).stem
            zf.writestr(f"{r.item.patient_dir}/{stem}_pred.png",
                        imageio.encode_png(r.mask.astype(np.uint8) * 255))
    return buf.getvalue()
