"""Slice naming and per-patient aggregation, shared by ``brainseg predict`` and the web page.

Which patient and slice number a file is, and how a patient's predicted masks become one row of
volume features, must be the same wherever slices are segmented; both live here once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import PurePath, PurePosixPath

import numpy as np

from brainseg.data.layout import SLICE_RE, parse_folder
from brainseg.outcome.features import patient_features_from_masks

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def slice_number(name: str) -> int:
    """The ``<n>`` of ``<folder>_<n>.tif`` / ``.png`` (case-insensitive), else 0.

    >>> slice_number("TCGA_CS_4941_19960909_12.PNG"), slice_number("scan.tif"), slice_number("scan_3.tif\\n")
    (12, 0, 0)
    """
    m = SLICE_RE.match(re.sub(r"\.png\Z", ".tif", PurePosixPath(str(name)).name, flags=re.IGNORECASE))
    return int(m["n"]) if m else 0


def identify(name: str | PurePath) -> tuple[str, str, int]:
    """(patient, patient folder, slice number) of a slice file path or uploaded name, using the
    public naming (``<folder>/<folder>_<n>.tif``); a file named after a patient folder works alone;
    otherwise the file's folder (or its stem) stands for the patient.

    >>> identify("TCGA_CS_4941_19960909_12.tif")
    ('TCGA_CS_4941', 'TCGA_CS_4941_19960909', 12)
    >>> identify("/data/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_3.png")
    ('TCGA_CS_4941', 'TCGA_CS_4941_19960909', 3)
    >>> identify("scans/week2/img_4.tif")
    ('week2', 'week2', 4)
    """
    path = PurePosixPath(str(name).replace("\\", "/"))
    m = SLICE_RE.match(re.sub(r"\.png\Z", ".tif", path.name, flags=re.IGNORECASE))
    stem = m["stem"] if m else path.stem
    for folder in (path.parent.name, stem):  # a patient folder, else a file named after one
        meta = parse_folder(folder)
        if meta:
            return meta["patient"], folder, slice_number(path.name)
    folder = path.parent.name or stem
    return folder, folder, slice_number(path.name)


def slice_sort_key(name: str | PurePath) -> tuple[str, int, str]:
    """Sort slice files by folder, then slice number (``_2`` before ``_10``), then name."""
    path = PurePosixPath(str(name).replace("\\", "/"))
    return str(path.parent), slice_number(path.name), path.name


def volume_chunks(items: list, key: Callable, limit: int) -> list[list]:
    """Consecutive items with the same ``key`` (one patient volume, in slice order) as one chunk,
    at most ``limit`` long: what predict and the page send the segmenter together, so per-volume
    post-processing sees the whole volume.

    >>> volume_chunks([1, 1, 2, 1], key=lambda x: x, limit=5)
    [[1, 1], [2], [1]]
    """
    chunks: list[list] = []
    for item in items:
        if chunks and key(chunks[-1][0]) == key(item) and len(chunks[-1]) < limit:
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


def patient_rows(items: Iterable[tuple[str, int, np.ndarray]]) -> tuple[list[dict], list[str]]:
    """Per-patient volume features from (patient, slice number, (H, W) bool mask) items.

    Returns (one row per patient: ``patient``, ``slices`` and the PATIENT_FEATURE_COLUMNS, in
    first-seen order; problems). A patient whose slices differ in size or repeat a slice number
    gets a problem line instead of a row (its volume cannot be assembled).
    """
    groups: dict[str, list[tuple[int, np.ndarray]]] = {}
    for patient, number, mask in items:
        groups.setdefault(patient, []).append((int(number), np.asarray(mask, bool)))
    rows, problems = [], []
    for patient, group in groups.items():
        numbers = [n for n, _ in group]
        shapes = sorted({m.shape for _, m in group})
        if len(shapes) > 1:
            problems.append(f"patient {patient}: slices of different sizes {shapes}; no volume features")
            continue
        if len(set(numbers)) < len(numbers):
            problems.append(f"patient {patient}: slice numbers repeat (name slices <folder>_<n>.tif); "
                            "no volume features")
            continue
        rows.append({"patient": patient, "slices": len(group),
                     **patient_features_from_masks(patient, numbers, [m for _, m in group])})
    return rows, problems
