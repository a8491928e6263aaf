"""Validate every image/mask pair and build the manifest: one row per usable slice."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from brainseg.data import clinical, imageio
from brainseg.data.layout import Layout, Problem, SliceRef, discover

MANIFEST_COLUMNS = ["patient", "patient_dir", "institution", "scan_date", "slice",
                    "image_path", "mask_path", "height", "width", "tumor_px"]


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


def _check_pair(ref: SliceRef) -> tuple[dict | None, Problem | None]:
    try:
        image, mask = imageio.read_pair(ref.image_path, ref.mask_path)
    except imageio.BadImage as exc:
        return None, Problem(exc.source, exc.problem)
    row = {"patient": ref.patient, "patient_dir": ref.patient_dir, "institution": ref.institution,
           "scan_date": ref.scan_date, "slice": ref.slice, "image_path": str(ref.image_path),
           "mask_path": str(ref.mask_path), "height": image.shape[0], "width": image.shape[1],
           "tumor_px": int(mask.sum())}
    return row, None


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
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_check_pair, layout.slices))
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
    return pd.read_csv(path, dtype={"scan_date": str})


def patients_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: institution, slices, tumor slices, tumor pixels."""
    return (manifest.groupby("patient")
            .agg(institution=("institution", "first"), slices=("slice", "size"),
                 tumor_slices=("tumor_px", lambda s: int((s > 0).sum())), tumor_px=("tumor_px", "sum"))
            .reset_index())
