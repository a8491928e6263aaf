"""A whole scanner volume through the served segmenter: the ``volume`` column, decoded and checked,
segmented by the path of ``brainseg predict --flair``, answered per patient.

Request: a table whose rows are patients, with a column ``volume`` (a base64 NIfTI file, ``.nii``
or ``.nii.gz`` bytes: the FLAIR), optionally ``pre_volume`` and ``post_volume`` (pre- and
post-contrast T1 on the FLAIR's grid, for 3-channel models) and ``patient`` (a name for the
answer). The params are the slice request's (``threshold``, ``return_mask``).

Checks, before any voxel is decoded: the table's columns and rows (``BRAINSEG_SERVE_MAX_ROWS``),
each cell's type and encoded size (``BRAINSEG_SERVE_MAX_IMAGE_BYTES``), each header's dimensions
against the request's pixel budget (``BRAINSEG_SERVE_MAX_PIXELS``: the FLAIR's voxels count as the
pixels of its slices) and against the volume reader's limits
(:class:`brainseg.data.scan.VolumeLimits`, ``BRAINSEG_MAX_VOXELS``); then the reader of
``brainseg predict`` (:func:`brainseg.data.volumes.read_scan`) decompresses exactly the bytes the
header declares, plus one, so a gzip bomb is never inflated. A bad volume (truncated, 4-D, NaN,
oblique, no orientation, over a limit, a sequence on another grid) is a
:class:`~brainseg.serving.request.RequestError` (a 400) naming the row, the column and the problem.

Answer, one row per patient (:data:`VOLUME_OUTPUT_COLUMNS`): the per-patient pixel features and
physical columns of :func:`brainseg.outcome.volume_features.volume_rows` (``tumor_volume_ml``,
RAS centroid and extent in mm, ``spacing_mm``), ``slice_rows`` (per slice, most inferior first:
``slice``, the slice features of the slice answer and ``area_mm2``, ``centroid_*_mm``), ``mask_nifti``
(base64 ``.nii.gz``, uint8 0/1, in the input's shape, affine and header; null with ``return_mask``
false), the params applied, ``model_run_id`` and ``data_version``.
"""

from __future__ import annotations

import base64
import math
import tempfile
from pathlib import Path

import nibabel as nib
import pandas as pd

from brainseg.data.scan import BadScan, VolumeLimits
from brainseg.data.volumes import read_scan, write_mask
from brainseg.inference.volume import ScanRefused, check_channels, patient_scans, segment_scans
from brainseg.outcome.features import PATIENT_FEATURE_COLUMNS
from brainseg.outcome.physical import PHYSICAL_PATIENT_COLUMNS
from brainseg.outcome.volume_features import volume_rows
from brainseg.serving.limits import RequestLimits
from brainseg.serving.request import PARAMS, PATIENT_COLUMN, bad_request, base64_cell, json_value, names, value_kind

VOLUME_COLUMN, PRE_COLUMN, POST_COLUMN = "volume", "pre_volume", "post_volume"
VOLUME_COLUMNS = (VOLUME_COLUMN, PRE_COLUMN, POST_COLUMN)
SEQUENCE_OF = {VOLUME_COLUMN: "flair", PRE_COLUMN: "pre", POST_COLUMN: "post"}
GZIP_MAGIC = b"\x1f\x8b"
NO_RESAMPLE = "send it resampled onto the FLAIR's grid (co-registered), or use brainseg predict --resample"
VOLUME_OUTPUT_COLUMNS = ["patient", "slices", *PATIENT_FEATURE_COLUMNS, *PHYSICAL_PATIENT_COLUMNS, "coordinates",
                         "spacing_mm", "slice_rows", "mask_nifti", *PARAMS, "model_run_id", "data_version"]


def is_volume_request(model_input) -> bool:
    """True when the table carries a volume column (the slice path answers everything else)."""
    return isinstance(model_input, pd.DataFrame) and any(c in model_input.columns for c in VOLUME_COLUMNS)


def check_table(model_input: pd.DataFrame, limits: RequestLimits) -> None:
    """The columns and the row count of a volume request, or a 400 naming them."""
    extra = [str(c) for c in model_input.columns if c not in (*VOLUME_COLUMNS, PATIENT_COLUMN)]
    if extra:
        raise bad_request(f"unknown column(s) {names(extra)} in a volume request; the columns are "
                          f"{VOLUME_COLUMN!r} and, optionally, {PRE_COLUMN!r}, {POST_COLUMN!r} and "
                          f"{PATIENT_COLUMN!r} (slices go in a separate request, column 'image')")
    if VOLUME_COLUMN not in model_input.columns:
        raise bad_request(f"{PRE_COLUMN!r} / {POST_COLUMN!r} without the FLAIR: add a column {VOLUME_COLUMN!r}")
    n = len(model_input)
    if n == 0:
        raise bad_request("the request holds no rows; send one base64 NIfTI volume per row")
    if n > limits.max_rows:
        raise bad_request(f"{n} rows exceed the limit of {limits.max_rows} rows per request "
                          f"({RequestLimits.ENV['max_rows']}); split the request")


def _header_voxels(path: Path) -> int | None:
    """Spatial voxels a NIfTI header declares (None when the header does not read: the reader says why)."""
    try:
        shape = nib.load(path).header.get_data_shape()
    except Exception:  # noqa: BLE001 - nibabel raises many types; read_scan names the problem
        return None
    return math.prod(int(n) for n in shape[:3]) if len(shape) >= 3 else None


def decode_volumes(model_input: pd.DataFrame, limits: RequestLimits, volume_limits: VolumeLimits, workdir: Path):
    """The request's patients as :class:`brainseg.inference.volume.PatientScans` (FLAIR's grid), or a
    400 naming the row, the column and the problem (nothing is decoded past a limit)."""
    check_table(model_input, limits)
    columns = [c for c in VOLUME_COLUMNS if c in model_input.columns]
    files, budget = [], 0
    for i, row in enumerate(model_input[columns].itertuples(index=False)):
        cells = {}
        for column, value in zip(columns, row):
            source = f"row {i}, column {column!r}"
            if column != VOLUME_COLUMN and value_kind(value) == "null":
                continue  # no pre / post for this patient
            data = base64_cell(value, source, "NIfTI (.nii or .nii.gz)", limits, noun="volume file")
            path = workdir / f"r{i}-{column}.nii{'.gz' if data[:2] == GZIP_MAGIC else ''}"
            path.write_bytes(data)
            cells[column] = (path, source)
        voxels = _header_voxels(cells[VOLUME_COLUMN][0]) or 0
        budget += voxels
        if budget > limits.max_pixels:
            raise bad_request(f"row {i}, column {VOLUME_COLUMN!r}: the request's volumes hold more than the limit of "
                              f"{limits.max_pixels:,} pixels per request ({RequestLimits.ENV['max_pixels']}; this "
                              f"volume: {voxels:,} voxels); send fewer or smaller volumes")
        files.append(cells)
    names_ = _patient_names(model_input)
    return [_read_patient(names_[i], cells, volume_limits) for i, cells in enumerate(files)]


def _patient_names(model_input: pd.DataFrame) -> list[str]:
    if PATIENT_COLUMN not in model_input.columns:
        return [f"row {i}" for i in range(len(model_input))]
    out = []
    for i, v in enumerate(model_input[PATIENT_COLUMN].tolist()):
        if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v).strip() == "":
            got = "an empty string" if isinstance(v, str) else value_kind(v)
            raise bad_request(f"row {i}, column {PATIENT_COLUMN!r}: got {got}; expected a patient name (string)")
        out.append(str(v))
    return out


def _read_patient(name: str, cells: dict, volume_limits: VolumeLimits):
    """Read one row's volumes (the reader's checks) and put them on the FLAIR's grid; a 400 naming the cells."""
    shown = {str(path): source for path, source in cells.values()}

    def refusal(exc: BadScan) -> Exception:
        message = str(exc)
        for path, source in shown.items():
            message = message.replace(path, source)
        return bad_request(message)

    scans = {}
    for column, (path, _) in cells.items():
        try:
            scans[SEQUENCE_OF[column]] = read_scan(path, volume_limits)
        except BadScan as exc:
            raise refusal(exc) from None
    try:
        return patient_scans(name, scans["flair"], scans.get("pre"), scans.get("post"), hint=NO_RESAMPLE)
    except BadScan as exc:
        raise refusal(exc) from None


def mask_nifti(masks, geometry, workdir: Path) -> str:
    """(Z, H, W) bool masks -> base64 ``.nii.gz`` in ``geometry`` (the input's shape, affine, header)."""
    path = write_mask(masks, geometry, workdir / "mask.nii.gz")
    data = path.read_bytes()
    path.unlink()
    return base64.b64encode(data).decode("ascii")


def answer_volumes(model_input: pd.DataFrame, segment, channels: str, limits: RequestLimits,
                   volume_limits: VolumeLimits, threshold: float, return_mask: bool, meta: dict) -> pd.DataFrame:
    """Decode, segment (``segment(images, groups)`` -> final masks) and answer a volume request: one
    row per patient, columns :data:`VOLUME_OUTPUT_COLUMNS` (object dtype: None stays null)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="brainseg-volume-") as tmp:
        patients = decode_volumes(model_input, limits, volume_limits, Path(tmp))
        for i, scans in enumerate(patients):
            try:
                check_channels(channels, scans, "the served model",
                               given=(f"column {PRE_COLUMN!r}", f"column {POST_COLUMN!r}"))
            except ScanRefused as exc:
                raise bad_request(f"row {i}: {exc}") from None
        for scans in patients:
            images, masks = segment_scans(segment, scans)
            slice_rows, patient = volume_rows(scans, images, masks)
            patient["slice_rows"] = [{k: json_value(v) for k, v in r.items() if k != "patient"} for r in slice_rows]
            patient["mask_nifti"] = mask_nifti(masks, scans.flair.geometry, Path(tmp)) if return_mask else None
            patient |= {"threshold": threshold, "return_mask": return_mask,
                        "model_run_id": meta.get("run_id", ""), "data_version": meta.get("data_version", "")}
            out.append([json_value(patient.get(c)) if c != "slice_rows" else patient[c]
                        for c in VOLUME_OUTPUT_COLUMNS])
    return pd.DataFrame(out, columns=VOLUME_OUTPUT_COLUMNS, dtype=object)
