"""Tumor features from binary masks: per slice (2-D) and per patient (the stacked volume).

Pure numpy / scikit-image; no tracking. The same functions serve truth masks, predicted masks and
the served model. Coordinates are in pixels: ``x`` is the column, ``y`` the row, ``z`` the slice
number. An empty mask is a valid input ("no tumor detected"): areas are 0, every geometric field
is NaN and nothing warns.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage import measure

SLICE_FEATURE_COLUMNS = [
    "tumor", "area_px", "area_pct", "area_pct_brain",
    "centroid_x", "centroid_y", "spread_x", "spread_y",
    "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1",
    "perimeter", "eccentricity", "solidity", "n_components",
]
_GEOMETRY = SLICE_FEATURE_COLUMNS[4:15]  # NaN on an empty mask

PATIENT_FEATURE_COLUMNS = [
    "tumor_volume_px", "tumor_slices", "largest_slice_area_px",
    "centroid_x", "centroid_y", "centroid_z", "extent_z",
    "bounding_ellipsoid_volume_ratio", "margin_fluctuation", "angular_std",
]
ANGULAR_SECTORS = 10
FLAIR_CHANNEL = 1  # kaggle_3m slices are (pre-contrast, FLAIR, post-contrast) in RGB order


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return mask.astype(bool)


def head_pixels(image: np.ndarray) -> int:
    """Pixels of the head in an (H, W, 3) or (H, W) uint8 slice: FLAIR channel > 0."""
    image = np.asarray(image)
    flair = image[..., FLAIR_CHANNEL] if image.ndim == 3 else image
    return int((flair > 0).sum())


def slice_features(mask: np.ndarray, image: np.ndarray | None = None) -> dict:
    """Features of one (H, W) bool mask, keyed as :data:`SLICE_FEATURE_COLUMNS`.

    - ``area_pct``: tumor pixels as a percent of the whole image (H * W).
    - ``area_pct_brain``: percent of head pixels (``image`` FLAIR > 0); NaN without ``image``.
    - ``centroid_x/y``: mean column / row of tumor pixels; ``spread_x/y``: their standard deviation
      (population, ddof=0) -- the seed article's "spread", taken on the mask, not on probabilities.
    - ``bbox_x0, bbox_y0, bbox_x1, bbox_y1``: half-open box, ``mask[y0:y1, x0:x1]`` holds the tumor.
    - ``perimeter``, ``eccentricity``, ``solidity``: scikit-image ``regionprops`` of all tumor
      pixels taken as one region (so a two-blob slice has a solidity well below 1).
    - ``n_components``: connected components with 8-connectivity.

    >>> m = np.zeros((4, 4), bool); m[1:3, 1:3] = True
    >>> f = slice_features(m); f["area_px"], f["centroid_x"], f["bbox_x1"], f["n_components"]
    (4, 1.5, 3, 1)
    """
    mask = _as_mask(mask)
    area = int(mask.sum())
    out = {"tumor": area > 0, "area_px": area, "area_pct": 100.0 * area / mask.size}
    brain = head_pixels(image) if image is not None else 0
    out["area_pct_brain"] = 100.0 * area / brain if brain else math.nan
    if area == 0:
        out.update({k: math.nan for k in _GEOMETRY})
        out["n_components"] = 0
        return {k: out[k] for k in SLICE_FEATURE_COLUMNS}
    rows, cols = np.nonzero(mask)
    region = measure.regionprops(mask.astype(np.uint8))[0]
    y0, x0, y1, x1 = region.bbox
    out.update({
        "centroid_x": float(cols.mean()), "centroid_y": float(rows.mean()),
        "spread_x": float(cols.std()), "spread_y": float(rows.std()),
        "bbox_x0": int(x0), "bbox_y0": int(y0), "bbox_x1": int(x1), "bbox_y1": int(y1),
        "perimeter": float(region.perimeter), "eccentricity": float(region.eccentricity),
        "solidity": float(region.solidity),
        "n_components": int(measure.label(mask, connectivity=2).max()),
    })
    return {k: out[k] for k in SLICE_FEATURE_COLUMNS}


def _boundary_polar(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radius and angle of the boundary pixels of a 2-D mask around its tumor centroid.

    Boundary pixels are tumor pixels with a 4-neighbour outside the tumor (inner boundary).
    """
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)
    by, bx = np.nonzero(boundary)
    return np.hypot(bx - cx, by - cy), np.arctan2(by - cy, bx - cx)


def margin_fluctuation(mask: np.ndarray) -> float:
    """Std / mean of the boundary-to-centroid distance of an (H, W) mask (0 for a circle-like
    outline, larger for lobulated margins). NaN when empty or when every distance is 0."""
    mask = _as_mask(mask)
    if not mask.any():
        return math.nan
    radius, _ = _boundary_polar(mask)
    mean = radius.mean()
    return float(radius.std() / mean) if mean > 0 else math.nan


def angular_std(mask: np.ndarray, sectors: int = ANGULAR_SECTORS) -> float:
    """Angular irregularity of an (H, W) mask, after Czarnek et al. (2017)'s angular std.

    The plane around the tumor centroid is cut into ``sectors`` equal angles; in each sector the
    standard deviation of the boundary pixels' distances to the centroid is taken; the result is
    the mean of those per-sector stds divided by the mean boundary distance (scale-free). A disc
    scores near 0; a star or a ragged outline scores higher. (The std of the raw pixel angles is
    not used: it is about pi/sqrt(3) for every roughly centred shape and carries no information.)
    NaN when empty or when every distance is 0.
    """
    mask = _as_mask(mask)
    if not mask.any():
        return math.nan
    radius, angle = _boundary_polar(mask)
    if radius.mean() == 0:
        return math.nan
    sector = np.minimum(((angle + np.pi) / (2 * np.pi) * sectors).astype(int), sectors - 1)
    stds = [radius[sector == s].std() for s in range(sectors) if (sector == s).any()]
    return float(np.mean(stds) / radius.mean())


def ellipsoid_volume_ratio(volume: np.ndarray, z_scale: float = 1.0) -> float:
    """Tumor volume / volume of the ellipsoid with the tumor's second moments, for (Z, H, W) bool.

    A stand-in for Buda et al. (2019)'s bounding-ellipsoid volume ratio that is cheap and stable:
    a solid ellipsoid with semi-axes a, b, c has coordinate variances a^2/5, b^2/5, c^2/5, so the
    ellipsoid's semi-axes are sqrt(5 * eigenvalues) of the covariance of the tumor voxel
    coordinates (each voxel taken as a unit cube: 1/12 is added to each variance, which keeps a
    one-slice tumor finite). About 1 for a solid ellipsoid, 0.89 for a cube, lower for elongated
    or fragmented tumors. ``z_scale`` is the slice spacing in pixel units (1: isotropic voxels).
    """
    z, y, x = np.nonzero(volume)
    if len(z) == 0:
        return math.nan
    coords = np.stack([x, y, z * z_scale], axis=1).astype(float)
    cov = np.cov(coords, rowvar=False, bias=True) + np.diag([1 / 12, 1 / 12, z_scale ** 2 / 12])
    det = max(float(np.linalg.det(cov)), 0.0)
    ellipsoid = 4 / 3 * math.pi * math.sqrt(125 * det)
    return float(len(z) * z_scale / ellipsoid) if ellipsoid > 0 else math.nan


def patient_features_from_masks(patient: str, slice_numbers: list[int], masks: list[np.ndarray],
                                z_scale: float = 1.0) -> dict:
    """Volume features of one patient from its (H, W) bool masks, keyed as PATIENT_FEATURE_COLUMNS
    (plus ``patient``). Slices are sorted by number first.

    - ``tumor_volume_px``: tumor pixels over all slices; ``tumor_slices``: slices with tumor.
    - ``largest_slice_area_px``: tumor pixels on the slice with most tumor.
    - ``centroid_x/y``: mean column / row of all tumor voxels; ``centroid_z``: their mean slice
      number (the area-weighted mean of the tumor slices' numbers).
    - ``extent_z``: slices from the first to the last tumor slice, both counted (gaps included).
    - ``bounding_ellipsoid_volume_ratio``: see :func:`ellipsoid_volume_ratio`.
    - ``margin_fluctuation`` and ``angular_std``: on the largest slice (first one on ties),
      see :func:`margin_fluctuation` and :func:`angular_std`.

    An empty volume gives 0 for the three counts (volume, slices, largest area) and NaN for the
    position and shape fields (left to the survival model's imputer).
    """
    if len(slice_numbers) != len(masks):
        raise ValueError(f"{patient}: {len(slice_numbers)} slice numbers but {len(masks)} masks")
    if not masks:
        raise ValueError(f"{patient}: no slices")
    order = np.argsort(slice_numbers, kind="stable")
    numbers = np.asarray(slice_numbers)[order]
    volume = np.stack([_as_mask(masks[i]) for i in order])
    areas = volume.sum(axis=(1, 2))
    total = int(areas.sum())
    out = {"patient": patient, "tumor_volume_px": total, "tumor_slices": int((areas > 0).sum()),
           "largest_slice_area_px": int(areas.max())}
    if total == 0:
        out.update({k: math.nan for k in PATIENT_FEATURE_COLUMNS[3:]})
        return out
    z, y, x = np.nonzero(volume)
    on = np.flatnonzero(areas)
    largest = volume[int(np.argmax(areas))]
    out.update({
        "centroid_x": float(x.mean()), "centroid_y": float(y.mean()),
        "centroid_z": float(numbers[z].mean()),
        "extent_z": int(numbers[on[-1]] - numbers[on[0]] + 1),
        "bounding_ellipsoid_volume_ratio": ellipsoid_volume_ratio(volume, z_scale),
        "margin_fluctuation": margin_fluctuation(largest),
        "angular_std": angular_std(largest),
    })
    return out


def features_for_manifest(manifest: pd.DataFrame, masks: list[np.ndarray],
                          images: list[np.ndarray] | None = None
                          ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-slice and per-patient feature tables for manifest rows and their aligned masks.

    ``manifest`` needs columns patient, patient_dir, slice; ``masks[i]`` is the (H, W) bool mask of
    row ``i`` (truth or prediction); ``images`` (optional, aligned the same way) gives
    ``area_pct_brain``. Returns (slices: patient, patient_dir, slice + SLICE_FEATURE_COLUMNS;
    patients: patient + PATIENT_FEATURE_COLUMNS, one row per patient, sorted by patient).
    A patient spread over several scan folders is refused (its slice numbers would collide).
    """
    if len(manifest) != len(masks):
        raise ValueError(f"{len(manifest)} manifest rows but {len(masks)} masks")
    if images is not None and len(images) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(images)} images")
    dirs = manifest.groupby("patient")["patient_dir"].nunique()
    if (dirs > 1).any():
        split = ", ".join(dirs[dirs > 1].index[:5])
        raise ValueError(f"patient(s) with several scan folders: {split}")
    keys = manifest[["patient", "patient_dir", "slice"]].reset_index(drop=True)
    rows = [slice_features(m, None if images is None else images[i]) for i, m in enumerate(masks)]
    slices = pd.concat([keys, pd.DataFrame(rows, columns=SLICE_FEATURE_COLUMNS)], axis=1)
    patients = []
    for patient, idx in keys.groupby("patient").indices.items():
        patients.append(patient_features_from_masks(
            patient, keys["slice"].iloc[idx].astype(int).tolist(), [masks[i] for i in idx]))
    table = pd.DataFrame(patients, columns=["patient"] + PATIENT_FEATURE_COLUMNS)
    return slices, table.sort_values("patient").reset_index(drop=True)
