"""Segment slice files with a model: masks, overlays, per-slice and per-patient features."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg import plots
from brainseg.data import imageio
from brainseg.data.layout import SLICE_RE, parse_folder
from brainseg.outcome import features

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def collect_inputs(inputs: list[Path], exclude: list[Path] | None = None) -> tuple[list[Path], list[str]]:
    """Slice files from files and folders (any nesting); masks (``*_mask.*``) are skipped, and so
    is everything inside an ``exclude`` folder (predict's ``--out``: never read our own outputs).

    Returns (files sorted by folder then slice number, problems).
    """
    skip = [Path(e).resolve() for e in (exclude or [])]

    def excluded(p: Path) -> bool:
        r = p.resolve()
        return any(r == e or e in r.parents for e in skip)

    files, problems = [], []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            if excluded(item):
                problems.append(f"{item}: inside the output folder; not read")
                continue
            files += [p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not excluded(p)]
        elif item.is_file():
            if excluded(item):
                problems.append(f"{item}: inside the output folder; not read")
            else:
                files.append(item)
        else:
            problems.append(f"{item}: no such file or folder")
    files = [f for f in files if not f.stem.lower().endswith("_mask")]

    def key(p: Path):
        m = SLICE_RE.match(p.name.replace(".png", ".tif"))
        return (str(p.parent), int(m["n"]) if m else 0, p.name)

    return sorted(set(files), key=key), problems


def slice_identity(path: Path) -> dict:
    """Patient and slice number from the public naming, else the file's folder and 0."""
    meta = parse_folder(path.parent.name)
    m = SLICE_RE.match(path.name.replace(".png", ".tif"))
    return {"file": str(path), "patient": meta["patient"] if meta else path.parent.name,
            "patient_dir": path.parent.name, "slice": int(m["n"]) if m else 0}


@dataclasses.dataclass
class Prediction:
    slices: pd.DataFrame     # one row per slice: identity + SLICE_FEATURE_COLUMNS + files written
    patients: pd.DataFrame   # one row per patient: PATIENT_FEATURE_COLUMNS
    problems: list[str]


def patient_chunks(files: list[Path], limit: int = 256) -> list[list[Path]]:
    """Consecutive files of one folder (a patient volume, in slice order) as one chunk, so the
    per-volume post-processing sees the whole volume; folders over ``limit`` slices are split."""
    chunks: list[list[Path]] = []
    for f in files:
        if chunks and chunks[-1][0].parent == f.parent and len(chunks[-1]) < limit:
            chunks[-1].append(f)
        else:
            chunks.append([f])
    return chunks


def predict_files(segmenter, files: list[Path], out_dir: Path, progress=None) -> Prediction:
    """Segment ``files`` (a patient folder at a time) with a :class:`brainseg.inference.Segmenter`;
    write ``<stem>_pred.png`` and ``<stem>_overlay.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, masks_by_patient, problems = [], {}, []
    for group in patient_chunks(files):
        chunk, images = [], []
        for f in group:
            try:
                images.append(imageio.read_image(f))
                chunk.append(f)
            except imageio.BadImage as exc:
                problems.append(str(exc))
        idents = [slice_identity(f) for f in chunk]
        masks = segmenter.segment(images, groups=[i["patient"] for i in idents]).masks if images else []
        for f, ident, image, mask in zip(chunk, idents, images, masks):
            pred_png, overlay_png = out_dir / f"{f.stem}_pred.png", out_dir / f"{f.stem}_overlay.png"
            pred_png.write_bytes(imageio.encode_png(mask.astype(np.uint8) * 255))
            overlay_png.write_bytes(imageio.encode_png(plots.overlay(image, mask)))
            rows.append({**ident, **features.slice_features(mask, image), "mask_file": pred_png.name,
                         "overlay_file": overlay_png.name})
            masks_by_patient.setdefault(ident["patient"], []).append((ident["slice"], mask))
        if progress:
            progress(len(group))
    patient_rows = []
    for patient, items in masks_by_patient.items():
        shapes = {m.shape for _, m in items}
        if len(shapes) > 1:
            problems.append(f"patient {patient}: slices of different sizes {sorted(shapes)}; no volume features")
            continue
        patient_rows.append(features.patient_features_from_masks(patient, [n for n, _ in items], [m for _, m in items]))
    return Prediction(pd.DataFrame(rows), pd.DataFrame(patient_rows), problems)
