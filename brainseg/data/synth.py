"""Synthetic data in the kaggle_3m layout, so every stage runs without the download.

Each patient is a head (an ellipsoid with smooth texture) with one FLAIR-bright lesion (an
ellipsoid of random size and place). The lesion is consistent from slice to slice, and the
top and bottom slices of each volume are empty. ``death01`` depends on lesion volume and age,
so the survival stage has signal to find.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from brainseg.data import clinical, imageio

INSTITUTIONS = ("DU", "HT", "CS", "FG", "EZ")


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    small = rng.normal(0, 1, (max(size // 8, 2), max(size // 8, 2))).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC) * scale


def synth_patient(rng: np.random.Generator, slices: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One volume: images (Z, S, S, 3) uint8 and masks (Z, S, S) uint8 in {0, 255}."""
    z = np.arange(slices)[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    zc = (slices - 1) / 2
    head_r = 0.42 * size * np.sqrt(np.clip(1 - ((z - zc) / (0.62 * slices)) ** 2, 0.05, 1))
    head = ((xx - size / 2) ** 2 / 1.0 + (yy - size / 2) ** 2 / 1.25) <= head_r ** 2
    # lesion: inside the middle half of the volume, so the first and last slices stay empty
    lz = rng.uniform(0.38, 0.62) * (slices - 1)
    rz = rng.uniform(0.12, 0.25) * slices
    ly, lx = rng.uniform(0.35, 0.65, 2) * size
    ry, rx = rng.uniform(0.06, 0.16, 2) * size
    d = ((z - lz) / rz) ** 2 + ((yy - ly) / ry) ** 2 + ((xx - lx) / rx) ** 2
    lesion = (d <= 1.0) & head
    edge = np.clip(1.3 - d, 0, 1)  # soft halo around the lesion in FLAIR
    images = np.zeros((slices, size, size, 3), np.float32)
    for k in range(slices):
        tissue = 95 + _smooth_noise(rng, size, 12)
        for c, (gain, lesion_gain) in enumerate([(0.9, -10), (1.0, 75), (1.05, 25)]):
            ch = tissue * gain + lesion_gain * edge[k] + rng.normal(0, 4, (size, size))
            images[k, :, :, c] = np.where(head[k], ch, rng.normal(3, 1.5, (size, size)))
    images = np.clip(images, 0, 255).astype(np.uint8)
    masks = (lesion * 255).astype(np.uint8)
    return images, masks


SYNTH_MARKER = "SYNTHETIC"  # brainseg.data.importer writes it beside the synthetic default
SYNTH_ID = re.compile(r"^TCGA_[A-Z]{2}_S\d{3}$")  # generate() names patients TCGA_<inst>_S<nnn>


def is_synthetic(root: Path, patients: Sequence[str] = ()) -> bool:
    """True when ``root`` is the synthetic generator's output: the importer's marker beside it, or
    every patient named as :func:`generate` names them."""
    root = Path(root)
    if (root.parent / SYNTH_MARKER).exists() or (root / SYNTH_MARKER).exists():
        return True
    patients = [str(p) for p in patients]
    return bool(patients) and all(SYNTH_ID.match(p) for p in patients)


def generate(out: Path, *, patients: int = 12, slices: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``patients`` synthetic patients and a data.csv into ``out`` (the kaggle_3m folder)."""
    if patients < 1 or slices < 4 or size < 16:
        raise ValueError("synth: need patients >= 1, slices >= 4 and size >= 16")
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(patients):
        inst = INSTITUTIONS[i % len(INSTITUTIONS)]
        patient = f"TCGA_{inst}_S{i:03d}"
        folder = out / f"{patient}_{20000101 + i}"
        images, masks = synth_patient(rng, slices, size)
        for k in range(slices):
            imageio.write_tiff(folder / f"{folder.name}_{k + 1}.tif", images[k])
            imageio.write_tiff(folder / f"{folder.name}_{k + 1}_mask.tif", masks[k])
        volume = float((masks > 0).sum()) / (size * size)
        age = float(np.clip(rng.normal(45, 13), 18, 85))
        rows.append({"Patient": patient, "_volume": volume, "age_at_initial_pathologic": round(age)})
    df = pd.DataFrame(rows)
    vz = (df["_volume"] - df["_volume"].mean()) / (df["_volume"].std() or 1)
    az = (df["age_at_initial_pathologic"] - df["age_at_initial_pathologic"].mean()) / (
        df["age_at_initial_pathologic"].std() or 1)
    p = 1 / (1 + np.exp(-(1.5 * vz + 1.2 * az - 0.6)))
    df[clinical.TARGET] = (rng.random(len(df)) < p).astype(int)
    for col in clinical.CLINICAL_COLUMNS:
        if col in df:
            continue
        codes = rng.integers(1, 4, len(df)).astype(float)
        codes[rng.random(len(df)) < 0.15] = np.nan  # missing values, as in the real file
        df[col] = codes
    df = df[["Patient"] + clinical.CLINICAL_COLUMNS + [clinical.TARGET]]
    df.to_csv(out / "data.csv", index=False, float_format="%g")
    return out
