"""Segment slice files with a model: masks, overlays, per-slice and per-patient features."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data import imageio
from brainseg.evaluation import plots
from brainseg.outcome import features
from brainseg.outcome.client import survival_probabilities
from brainseg.pipeline import slices

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a temporary file beside it, then a rename): a full disk
    or a kill leaves the files written before complete and no truncated one."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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

    return sorted(set(files), key=slices.slice_sort_key), problems


def slice_identity(path: Path) -> dict:
    """Patient, patient folder and slice number (the page's naming rules, :mod:`brainseg.pipeline.slices`)."""
    patient, patient_dir, number = slices.identify(path)
    return {"file": str(path), "patient": patient, "patient_dir": patient_dir, "slice": number}


@dataclasses.dataclass
class Prediction:
    slices: pd.DataFrame     # one row per slice: identity + SLICE_FEATURE_COLUMNS + files written
    patients: pd.DataFrame   # one row per patient: PATIENT_FEATURE_COLUMNS
    problems: list[str]


def patient_chunks(files: list[Path], limit: int = 256) -> list[list[Path]]:
    """Consecutive files of one folder (a patient volume, in slice order) as one chunk."""
    return slices.volume_chunks(files, lambda f: f.parent, limit)


def predict_files(segmenter, files: list[Path], out_dir: Path, progress=None) -> Prediction:
    """Segment ``files`` (a patient folder at a time) with a :class:`brainseg.inference.segmenter.Segmenter`;
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
            write_atomic(pred_png, imageio.encode_png(mask.astype(np.uint8) * 255))
            write_atomic(overlay_png, imageio.encode_png(plots.overlay(image, mask)))
            rows.append({**ident, **features.slice_features(mask, image), "mask_file": pred_png.name,
                         "overlay_file": overlay_png.name})
            masks_by_patient.setdefault(ident["patient"], []).append((ident["slice"], mask))
        if progress:
            progress(len(group))
    patients, volume_problems = slices.patient_rows(
        (patient, number, mask) for patient, items in masks_by_patient.items() for number, mask in items)
    problems += volume_problems
    return Prediction(pd.DataFrame(rows), pd.DataFrame(patients), problems)


class ModelNotFound(FileNotFoundError):
    """The model to predict with cannot be resolved or loaded (nothing was written)."""


def predict_to_folder(files: list[Path], out_dir: Path, model_uri: str, *, threshold: float | None = None,
                      with_survival: bool = False, survival_model: str | None = None,
                      clinical_csv: Path | None = None, progress=None) -> Prediction:
    """``brainseg predict``: load ``model_uri`` (``threshold`` overrides its stored one), segment
    ``files`` into ``out_dir`` (:func:`predict_files`), add each patient's death01 probability from
    ``survival_model`` if ``with_survival`` (a failure there is one more problem), and write
    features.csv (per slice) and patients.csv (per patient).

    ``progress(total)``: a context manager yielding ``advance(n)``, entered once the model is loaded.
    Raises :class:`ModelNotFound` when the model cannot be loaded.
    """
    # TensorFlow and MLflow load only when a prediction is made
    from brainseg.registry.model_registry import load_segmenter

    try:
        segmenter = load_segmenter(model_uri)
    except FileNotFoundError as exc:
        raise ModelNotFound(str(exc)) from exc
    if threshold is not None:
        segmenter = segmenter.with_settings(threshold=threshold)
    with (progress or (lambda total: contextlib.nullcontext(None)))(len(files)) as advance:
        pred = predict_files(segmenter, files, out_dir, progress=advance)
    if with_survival and not pred.patients.empty:
        try:
            probs = survival_probabilities(survival_model, pred.patients, clinical_csv, files)
            pred.patients = pred.patients.merge(probs, on="patient", how="left")
        except (FileNotFoundError, ValueError) as exc:
            pred.problems.append(f"survival: {exc}")
    write_atomic(out_dir / "features.csv", pred.slices.to_csv(index=False).encode())
    write_atomic(out_dir / "patients.csv", pred.patients.to_csv(index=False).encode())
    return pred
