"""Segment slice files with a model: masks, overlays, per-slice and per-patient features.

Outputs never collide: each slice's ``<stem>_pred.png`` and ``<stem>_overlay.png`` go into the
slice's own folder relative to the folder all inputs share (:func:`output_stems`: the slices of one
folder are written flat, those of ``A/`` and ``B/`` under ``A/`` and ``B/``), and two inputs that
would still write the same name (``scan_1.tif`` beside ``scan_1.png``) are both refused by name.
A file that cannot be used (unreadable, over or under the limits of one image that the served model
applies too, :class:`brainseg.serving.limits.RequestLimits`, a name with a control character, an
output name too long for the output folder's file system) is one problem line naming it; the others
are still segmented and written. Only a fault of the output folder itself (a full disk, no
permission) stops the batch.

Slice files carry no pixel spacing: the physical columns of :mod:`brainseg.outcome.physical`
(``area_mm2``, ``tumor_volume_ml``, ...) are written, empty (null), with ``spacing_mm`` ``unknown``,
and :data:`SPACING_UNKNOWN` is the note that says so; never a pixel count presented as millimetres.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data import imageio
from brainseg.evaluation import plots
from brainseg.outcome import features, physical
from brainseg.outcome.client import survival_probabilities
from brainseg.pipeline import slices
from brainseg.serving.limits import RequestLimits

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
OUTPUT_SUFFIXES = ("_pred.png", "_overlay.png")
LONGEST_WRITTEN = len(".") + len("_overlay.png") + len(".part")  # added to a stem: write_atomic's temporary file
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")  # a newline in a name would be read as a slice number, or split a line
PER_FILE_ERRNOS = {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ}  # a write fault of that file, not of the folder
SPACING_UNKNOWN = ("spacing unknown: slice files carry no pixel spacing, so the physical columns (area_mm2, "
                   "tumor_volume_ml, centroids and extents in mm) are empty, never pixels")


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
    named = {f: CONTROL_RE.search(str(f)) for f in files}
    problems += [f"{str(f)!r}: the name holds a control character ({m.group()!r}); rename it"
                 for f, m in named.items() if m]
    files = [f for f, m in named.items() if not m]
    return sorted(set(files), key=slices.slice_sort_key), problems


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) takes."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def output_stems(files: list[Path], out_dir: Path) -> tuple[dict[Path, Path], list[str]]:
    """Each file's output stem under ``out_dir`` (``<folder relative to the inputs' common folder>/<stem>``),
    and problems: files whose outputs would collide (both named, both left out) and files whose
    output names are too long for ``out_dir``'s file system.

    >>> stems, problems = output_stems([Path("/d/A/scan_1.tif"), Path("/d/B/scan_1.tif")], Path("/o"))
    >>> [str(s) for s in stems.values()], problems
    (['A/scan_1', 'B/scan_1'], [])
    >>> output_stems([Path("/d/A/s_1.tif"), Path("/d/A/s_1.png")], Path("/o"))[1]
    ['/d/A/s_1.tif, /d/A/s_1.png: both would be written as s_1_pred.png and s_1_overlay.png; rename one']
    """
    if not files:
        return {}, []
    base = Path(os.path.commonpath([str(f.absolute().parent) for f in files]))
    stems = {f: f.absolute().parent.relative_to(base) / f.stem for f in files}
    by_name: dict[str, list[Path]] = {}
    for f, stem in stems.items():  # casefold: the output folder may be on a case-insensitive file system
        by_name.setdefault(stem.as_posix().casefold(), []).append(f)
    problems, limit = [], name_max(out_dir)
    for same in (group for group in by_name.values() if len(group) > 1):
        stem = stems[same[0]]
        problems.append(f"{', '.join(map(str, same))}: both would be written as {stem}_pred.png and "
                        f"{stem}_overlay.png; rename one")
        for f in same:
            del stems[f]
    for f, stem in list(stems.items()):
        longest = len(os.fsencode(stem.name)) + LONGEST_WRITTEN
        if longest > limit:
            problems.append(f"{f}: its outputs' names ({stem.name}_overlay.png and a temporary name) would "
                            f"be {longest} bytes, over the {limit}-byte limit of {out_dir}'s file system; "
                            "give the file a shorter name")
            del stems[f]
    return stems, problems


def slice_identity(path: Path) -> dict:
    """Patient, patient folder and slice number (the page's naming rules, :mod:`brainseg.pipeline.slices`)."""
    patient, patient_dir, number = slices.identify(path)
    return {"file": str(path), "patient": patient, "patient_dir": patient_dir, "slice": number}


@dataclasses.dataclass
class Prediction:
    slices: pd.DataFrame     # per slice: identity, SLICE_FEATURE_COLUMNS, PHYSICAL_SLICE_COLUMNS (null), files
    patients: pd.DataFrame   # per patient: PATIENT_FEATURE_COLUMNS, PHYSICAL_PATIENT_COLUMNS (null), spacing_mm
    problems: list[str]
    notes: list[str] = dataclasses.field(default_factory=lambda: [SPACING_UNKNOWN])  # said once, not a problem


def patient_chunks(files: list[Path], limit: int = 256) -> list[list[Path]]:
    """Consecutive files of one folder (a patient volume, in slice order) as one chunk."""
    return slices.volume_chunks(files, lambda f: f.parent, limit)


def read_checked(f: Path, limits: RequestLimits) -> np.ndarray:
    """(H, W, 3) uint8 slice of ``f``, within the limits of one image the served model applies
    (:class:`imageio.BadImage` naming the file)."""
    try:
        too_big = limits.bytes_problem(f.stat().st_size)
    except OSError as exc:
        raise imageio.BadImage(str(f), f"cannot read file ({exc.strerror})") from exc
    if too_big:
        raise imageio.BadImage(str(f), too_big)
    image = imageio.read_image(f)
    too_small = limits.image_problem(image.shape[1], image.shape[0])
    if too_small:
        raise imageio.BadImage(str(f), too_small)
    return image


def write_outputs(f: Path, stem: Path, out_dir: Path, image: np.ndarray, mask: np.ndarray) -> str | None:
    """Write ``stem``'s mask and overlay under ``out_dir`` whole; a problem line naming ``f`` when only
    this file cannot be written (its name), else None. A fault of the folder (a full disk, no
    permission) is raised: it would stop every other file too."""
    pred_png, overlay_png = (out_dir / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES)
    try:
        pred_png.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(pred_png, imageio.encode_png(mask.astype(np.uint8) * 255))
        write_atomic(overlay_png, imageio.encode_png(plots.overlay(image, mask)))
    except OSError as exc:
        if exc.errno not in PER_FILE_ERRNOS:
            raise
        with contextlib.suppress(OSError):  # both or neither (its own name may be the one too long)
            pred_png.unlink(missing_ok=True)
        return f"{f}: cannot write its outputs as {stem}_pred.png ({exc.strerror}); the others are written"
    return None


def predict_files(segmenter, files: list[Path], out_dir: Path, progress=None,
                  limits: RequestLimits | None = None) -> Prediction:
    """Segment ``files`` (a patient folder at a time) with a :class:`brainseg.inference.segmenter.Segmenter`;
    write ``<stem>_pred.png`` and ``<stem>_overlay.png`` under ``out_dir``, each in its folder relative
    to the inputs' common folder (:func:`output_stems`). A file that cannot be used is a problem line;
    ``limits`` (default: from the environment, as the server reads them) bound each image."""
    limits = limits or RequestLimits.from_env()
    out_dir.mkdir(parents=True, exist_ok=True)
    stems, problems = output_stems(files, out_dir)
    rows, masks_by_patient = [], {}
    for group in patient_chunks(files):
        chunk, images = [], []
        for f in (f for f in group if f in stems):
            try:
                images.append(read_checked(f, limits))
                chunk.append(f)
            except imageio.BadImage as exc:
                problems.append(str(exc))
        idents = [slice_identity(f) for f in chunk]
        masks = segmenter.segment(images, groups=[i["patient"] for i in idents]).masks if images else []
        for f, ident, image, mask in zip(chunk, idents, images, masks):
            problem = write_outputs(f, stems[f], out_dir, image, mask)
            if problem:
                problems.append(problem)
                continue
            rows.append({**ident, **features.slice_features(mask, image), **physical.slice_physical(mask, 0, None),
                         **{f"{kind}_file": f"{stems[f].as_posix()}{suffix}"
                            for kind, suffix in zip(("mask", "overlay"), OUTPUT_SUFFIXES)}})
            masks_by_patient.setdefault(ident["patient"], []).append((ident["slice"], mask))
        if progress:
            progress(len(group))
    patients, volume_problems = slices.patient_rows(
        (patient, number, mask) for patient, items in masks_by_patient.items() for number, mask in items)
    problems += volume_problems
    patients = [row | physical.patient_physical(None, None) | {"spacing_mm": "unknown"} for row in patients]
    return Prediction(pd.DataFrame(rows), pd.DataFrame(patients), problems)


class ModelNotFound(FileNotFoundError):
    """The model to predict with cannot be resolved or loaded (nothing was written)."""


class LimitSettingRefused(ModelNotFound):
    """A ``BRAINSEG_SERVE_*`` limit that is not a whole number >= 1 (nothing was written). A kind of
    :class:`ModelNotFound` so that ``brainseg predict`` answers it as it answers a model it cannot
    load: one line, exit 2."""


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
        limits = RequestLimits.from_env()  # before the model loads: the same limits as the served model
    except ValueError as exc:
        raise LimitSettingRefused(f"{exc} (a limit of one image, read by brainseg predict as by the server)") from None
    try:
        segmenter = load_segmenter(model_uri)
    except FileNotFoundError as exc:
        raise ModelNotFound(str(exc)) from exc
    if threshold is not None:
        segmenter = segmenter.with_settings(threshold=threshold)
    with (progress or (lambda total: contextlib.nullcontext(None)))(len(files)) as advance:
        pred = predict_files(segmenter, files, out_dir, progress=advance, limits=limits)
    if with_survival and not pred.patients.empty:
        try:
            probs = survival_probabilities(survival_model, pred.patients, clinical_csv, files)
            pred.patients = pred.patients.merge(probs, on="patient", how="left")
        except (FileNotFoundError, ValueError) as exc:
            pred.problems.append(f"survival: {exc}")
    write_atomic(out_dir / "features.csv", pred.slices.to_csv(index=False).encode())
    write_atomic(out_dir / "patients.csv", pred.patients.to_csv(index=False).encode())
    return pred
