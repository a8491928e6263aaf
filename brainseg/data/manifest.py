"""Validate every image/mask pair and build the manifest: one row per usable slice.

``spacing_mm`` is the slices' voxel spacing ``"z,y,x"`` in mm where it is known: a patient folder
made by ``brainseg data import`` from volumes holds a :data:`SIDECAR` (JSON) with it; the Kaggle
slices carry none (empty). :func:`patient_spacing` gives the evaluation its per-patient spacing
(HD95 in mm) and :func:`with_volumes_ml` the volumes in mL.
"""

from __future__ import annotations

import dataclasses
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data import clinical, imageio
from brainseg.data.layout import Layout, Problem, SliceRef, discover

MANIFEST_COLUMNS = ["patient", "patient_dir", "institution", "scan_date", "slice",
                    "image_path", "mask_path", "height", "width", "tumor_px", "spacing_mm"]
SIDECAR = "brainseg_import.json"  # in a patient folder made from volumes: {"spacing_mm": [z, y, x], ...}


@dataclasses.dataclass
class Scan:
    root: Path
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, sorted by patient then slice number
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        m = self.manifest
        per_inst = (m.groupby("institution").agg(patients=("patient", "nunique"), slices=("slice", "size"))
                    if len(m) else pd.DataFrame(columns=["patients", "slices"]))
        return {
            "root": str(self.root),
            "patients": int(m["patient"].nunique()) if len(m) else 0,
            "slices": int(len(m)),
            "tumor_slices": int((m["tumor_px"] > 0).sum()) if len(m) else 0,
            "institutions": {k: {"patients": int(r.patients), "slices": int(r.slices)}
                             for k, r in per_inst.iterrows()},
            "problems": len(self.problems),
        }


def _check_pair(ref: SliceRef, spacing: str = "") -> tuple[dict | None, Problem | None]:
    try:
        image, mask = imageio.read_pair(ref.image_path, ref.mask_path)
    except imageio.BadImage as exc:
        return None, Problem(exc.source, exc.problem)
    row = {"patient": ref.patient, "patient_dir": ref.patient_dir, "institution": ref.institution,
           "scan_date": ref.scan_date, "slice": ref.slice, "image_path": str(ref.image_path),
           "mask_path": str(ref.mask_path), "height": image.shape[0], "width": image.shape[1],
           "tumor_px": int(mask.sum()), "spacing_mm": spacing}
    return row, None


def folder_spacing(folder: Path) -> tuple[str, Problem | None]:
    """A patient folder's ``"z,y,x"`` spacing in mm from its :data:`SIDECAR` ("" without one, or when
    it records none), or a problem naming the sidecar when it does not hold three positive numbers."""
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return "", None
    try:
        recorded = json.loads(path.read_text())["spacing_mm"]
        if recorded is None:  # volumes stacked from slices without spacing (`brainseg data export`'s)
            return "", None
        values = [float(v) for v in recorded]
    except (ValueError, KeyError, TypeError) as exc:
        return "", Problem(str(path), f"unreadable spacing_mm ({type(exc).__name__}: {exc})")
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        return "", Problem(str(path), f"spacing_mm {values} is not three positive lengths (z, y, x in mm)")
    return ",".join(f"{v:g}" for v in values), None


def _check_clinical(layout: Layout) -> list[Problem]:
    if layout.data_csv is None:
        return [Problem(str(layout.root / "data.csv"), "data.csv is missing")]
    try:
        clinical.read_clinical(layout.data_csv)
    except clinical.ClinicalError as exc:
        return [Problem(str(layout.data_csv), str(exc).split(": ", 1)[-1])]
    return []


def scan(root: Path, workers: int = 4) -> Scan:
    """Decode every pair under ``root`` (see :func:`brainseg.data.layout.discover`) and check it."""
    layout = discover(Path(root))
    problems = list(layout.problems)
    spacings = {}
    for folder in sorted({ref.image_path.parent for ref in layout.slices}):
        spacings[folder], problem = folder_spacing(folder)
        problems += [problem] if problem else []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda ref: _check_pair(ref, spacings[ref.image_path.parent]), layout.slices))
    rows = [r for r, _ in results if r is not None]
    problems += [p for _, p in results if p is not None]
    problems += _check_clinical(layout)
    if not layout.slices and not layout.problems:
        problems.append(Problem(str(root), "no TCGA_* patient folders with slices found"))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values(["patient", "slice"])
    return Scan(Path(root), manifest.reset_index(drop=True), problems)


def read_manifest(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run `brainseg data manifest` first)")
    return pd.read_csv(path, dtype={"scan_date": str, "spacing_mm": str})


def patient_spacing(manifest: pd.DataFrame) -> dict[str, tuple[float, float, float]] | None:
    """{patient: (z, y, x) mm} when every patient of ``manifest`` has a ``spacing_mm``, else None
    (voxel units for all: one evaluation never mixes mm and voxels).

    >>> patient_spacing(pd.DataFrame({"patient": ["a", "a"], "spacing_mm": ["3.3,0.9,0.9"] * 2}))
    {'a': (3.3, 0.9, 0.9)}
    >>> patient_spacing(pd.DataFrame({"patient": ["a", "b"], "spacing_mm": ["3.3,0.9,0.9", None]})) is None
    True
    """
    if "spacing_mm" not in manifest.columns or manifest.empty:
        return None
    first = manifest.groupby("patient", sort=True)["spacing_mm"].first()
    if first.isna().any() or (first.astype(str).str.strip() == "").any():
        return None
    return {p: tuple(float(v) for v in str(text).split(",")) for p, text in first.items()}


def with_volumes_ml(patients: pd.DataFrame, spacing: dict | None) -> pd.DataFrame:
    """A per-patient evaluation table (``tp``, ``fp``, ``fn`` voxel counts) with ``truth_volume_ml``
    and ``pred_volume_ml`` (voxels x the patient's voxel volume); unchanged when ``spacing`` is None.

    >>> t = pd.DataFrame({"patient": ["a"], "tp": [800], "fp": [200], "fn": [0]})
    >>> with_volumes_ml(t, {"a": (2.0, 0.5, 0.5)})[["truth_volume_ml", "pred_volume_ml"]].values.tolist()
    [[0.4, 0.5]]
    """
    if not spacing:
        return patients
    voxel_ml = patients["patient"].map(lambda p: float(np.prod(spacing[p])) / 1000.0)
    return patients.assign(truth_volume_ml=(patients["tp"] + patients["fn"]) * voxel_ml,
                           pred_volume_ml=(patients["tp"] + patients["fp"]) * voxel_ml)


def patients_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: institution, slices, tumor slices, tumor pixels."""
    return (manifest.groupby("patient")
            .agg(institution=("institution", "first"), slices=("slice", "size"),
                 tumor_slices=("tumor_px", lambda s: int((s > 0).sum())), tumor_px=("tumor_px", "sum"))
            .reset_index())
