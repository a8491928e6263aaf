"""Dice and IoU per slice and per patient volume, with an explicit empty-mask policy.

Policy (as in MONAI / nnU-Net reporting):
- **Per-patient volume Dice** (the headline, as in Buda et al. 2019): one Dice over all slices of
  a patient. Patients whose true volume is empty are left out of the mean and counted
  (``patients_empty_truth``); they show up in the false-positive rate instead.
- **Dice on tumor slices**: per-slice Dice over slices whose truth is not empty.
- **False-positive rate on empty slices**: share of empty-truth slices with any predicted pixel.
- No smoothing term anywhere: an empty prediction on an empty slice is not scored as Dice 1.

Boundary and lesion-wise figures per patient volume (:mod:`brainseg.evaluation.surface`: DeepMind's
``surface-distance``, its conventions there), beside Dice in every evaluation:
- **HD95**: the larger of the two directed, surfel-area-weighted 95th-percentile surface distances.
  One side empty -> ``inf``; both empty -> NaN. The summary's mean / median are over patients with
  tumor whose HD95 is finite (``n_patients_hd95``); ``n_patients_hd95_inf`` counts the tumor patients
  with an empty prediction, left out of the mean (they score NSD 0 and miss every lesion).
- **NSD** (normalised surface Dice) at ``nsd_tolerance``: one side empty -> 0; both empty -> NaN.
  Mean / median over patients with tumor (``n_patients``), as the volume Dice.
- **Lesions**: 26-connected 3-D components; ``lesion_detection_rate`` = true lesions overlapped by the
  prediction over all true lesions of all patients (``lesions_true``); ``false_lesions_per_patient`` =
  predicted components overlapping no truth, over all patient volumes (``n_patient_volumes``, empty
  truths included).
- **Units**: voxel units (spacing (1, 1, 1), a slice step counting as one) unless a (z, y, x) spacing in
  mm is given: the table's ``distance_unit`` says which, the summary's ``distances_in_mm`` is 1 or 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from brainseg.evaluation.surface import NSD_TOLERANCE, volume_figures

BOUNDARY_COLUMNS = ["hd95", "nsd", "lesions_true", "lesions_found", "lesions_missed", "lesions_false"]


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """TP, FP, FN pixel counts of two boolean masks of the same shape.

    >>> confusion(np.array([1, 1, 0], bool), np.array([1, 0, 1], bool))
    (1, 1, 1)
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def dice_from_counts(tp, fp, fn) -> float:
    """2TP / (2TP + FP + FN); NaN when both masks are empty (undefined, never 1)."""
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else float("nan")


def iou_from_counts(tp, fp, fn) -> float:
    denom = tp + fp + fn
    return float(tp / denom) if denom else float("nan")


def slice_table(patients: list[str], preds: list[np.ndarray], truths: list[np.ndarray]) -> pd.DataFrame:
    """One row per slice: patient, tp, fp, fn, truth_px, pred_px."""
    rows = []
    for patient, p, t in zip(patients, preds, truths, strict=True):
        tp, fp, fn = confusion(p, t)
        rows.append({"patient": patient, "tp": tp, "fp": fp, "fn": fn,
                     "truth_px": tp + fn, "pred_px": tp + fp})
    return pd.DataFrame(rows, columns=["patient", "tp", "fp", "fn", "truth_px", "pred_px"])


def boundary_table(patients: list[str], preds: list[np.ndarray], truths: list[np.ndarray], order=None,
                   spacing=None, tolerance: float = NSD_TOLERANCE) -> pd.DataFrame:
    """One row per patient volume: HD95, NSD, lesion counts, ``distance_unit`` and ``nsd_tolerance``.

    ``patients``: the patient of each slice; ``preds``, ``truths``: (H, W) bool masks per slice;
    ``order``: each slice's number (a patient's slices are stacked in this order; default: as given);
    ``spacing``: None (voxel units), one (z, y, x) in mm for every patient, or {patient: (z, y, x)}.

    >>> t = [np.array([[1, 1], [0, 0]], bool), np.array([[0, 0], [0, 0]], bool)]
    >>> r = boundary_table(["a", "a"], [np.zeros((2, 2), bool)] * 2, t).iloc[0]  # tumor, nothing predicted
    >>> float(r["hd95"]), float(r["nsd"]), int(r["lesions_missed"]), r["distance_unit"]
    (inf, 0.0, 1, 'voxel')
    """
    order = np.arange(len(patients)) if order is None else np.asarray(order)
    by_patient: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        by_patient.setdefault(patient, []).append(i)
    rows = []
    for patient, idx in sorted(by_patient.items()):
        idx = sorted(idx, key=lambda i: order[i])
        step = spacing.get(patient) if isinstance(spacing, Mapping) else spacing
        if isinstance(spacing, Mapping) and step is None:
            raise ValueError(f"spacing: no (z, y, x) spacing for patient {patient}")
        try:
            truth, pred = np.stack([truths[i] for i in idx]), np.stack([preds[i] for i in idx])
        except ValueError as exc:
            raise ValueError(f"patient {patient}: slices of different shapes cannot form a volume ({exc})") from None
        rows.append({"patient": patient, **volume_figures(truth, pred, step, tolerance),
                     "distance_unit": "voxel" if step is None else "mm", "nsd_tolerance": float(tolerance)})
    return pd.DataFrame(rows, columns=["patient", *BOUNDARY_COLUMNS, "distance_unit", "nsd_tolerance"])


def empty_prediction_boundary(boundary: pd.DataFrame) -> pd.DataFrame:
    """The boundary table of the all-empty predictor, from the real one (no geometry needed)."""
    tumor = boundary["lesions_true"] > 0
    return boundary.assign(hd95=np.where(tumor, np.inf, np.nan), nsd=np.where(tumor, 0.0, np.nan),
                           lesions_found=0, lesions_missed=boundary["lesions_true"], lesions_false=0)


def boundary_summary(boundary: pd.DataFrame) -> dict:
    """HD95, NSD and lesion-wise detection over patients, with their counts (policy: module docstring)."""
    tumor = boundary[boundary["lesions_true"] > 0]
    hd = tumor["hd95"].to_numpy(float)
    finite = hd[np.isfinite(hd)]
    nsd = tumor["nsd"].to_numpy(float)
    true, found, false = (int(boundary[c].sum()) for c in ("lesions_true", "lesions_found", "lesions_false"))
    return {
        "hd95_mean": float(np.mean(finite)) if finite.size else float("nan"),
        "hd95_median": float(np.median(finite)) if finite.size else float("nan"),
        "n_patients_hd95": int(finite.size),
        "n_patients_hd95_inf": int(np.isinf(hd).sum()),
        "nsd_mean": float(np.mean(nsd)) if nsd.size else float("nan"),
        "nsd_median": float(np.median(nsd)) if nsd.size else float("nan"),
        "nsd_tolerance": float(boundary["nsd_tolerance"].iloc[0]) if len(boundary) else float(NSD_TOLERANCE),
        "distances_in_mm": float(len(boundary) > 0 and bool((boundary["distance_unit"] == "mm").all())),
        "lesion_detection_rate": found / true if true else float("nan"),
        "false_lesions_per_patient": false / len(boundary) if len(boundary) else float("nan"),
        "lesions_true": true, "lesions_found": found, "lesions_missed": true - found, "lesions_false": false,
        "n_patient_volumes": int(len(boundary)),
    }


def patient_table(slices: pd.DataFrame, boundary: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per patient: slices, tumor slices, volume Dice and IoU, mean Dice on tumor slices, FP slices;
    with ``boundary`` (:func:`boundary_table`), its HD95, NSD and lesion columns too."""
    s = slices.assign(tumor=slices["truth_px"] > 0, fp_slice=(slices["truth_px"] == 0) & (slices["pred_px"] > 0))
    s["slice_dice"] = [dice_from_counts(*r) if t else np.nan
                       for r, t in zip(s[["tp", "fp", "fn"]].to_numpy(), s["tumor"])]
    g = s.groupby("patient", sort=True)
    out = g.agg(slices=("tp", "size"), tumor_slices=("tumor", "sum"), empty_slices=("tumor", lambda x: int((~x).sum())),
                fp_empty_slices=("fp_slice", "sum"), tp=("tp", "sum"), fp=("fp", "sum"), fn=("fn", "sum"),
                tumor_slice_dice=("slice_dice", "mean")).reset_index()
    out["volume_dice"] = [dice_from_counts(*r) if r[0] + r[2] > 0 else np.nan
                          for r in out[["tp", "fp", "fn"]].to_numpy()]
    out["volume_iou"] = [iou_from_counts(*r) if r[0] + r[2] > 0 else np.nan
                         for r in out[["tp", "fp", "fn"]].to_numpy()]
    return out if boundary is None else out.merge(boundary, on="patient", how="left")


def bootstrap_ci(values, n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement, seeded).

    Over patients, this is the noise on a mean per-patient Dice: 13 patients give about +-0.05.

    >>> bootstrap_ci([0.8, 0.8, 0.8])
    (0.8, 0.8)
    >>> lo, hi = bootstrap_ci([0.2, 0.9, 0.7, 0.95, 0.85]); bool(lo < 0.72 < hi)
    True
    """
    v = np.asarray(values, float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(v, size=(n, v.size), replace=True).mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return round(float(lo), 12), round(float(hi), 12)


def summarize(slices: pd.DataFrame, boundary: pd.DataFrame | None = None) -> dict:
    """All headline metrics with the count behind each (see the module docstring for the policy);
    with ``boundary`` (:func:`boundary_table`), the HD95, NSD and lesion-wise figures too."""
    pt = patient_table(slices)
    with_tumor = pt[pt["tp"] + pt["fn"] > 0]
    tumor_slices = slices[slices["truth_px"] > 0]
    empty_slices = slices[slices["truth_px"] == 0]
    slice_dice = [dice_from_counts(*r) for r in tumor_slices[["tp", "fp", "fn"]].to_numpy()]
    tp, fp, fn = (int(slices[c].sum()) for c in ("tp", "fp", "fn"))

    def stat(values, fn_):
        v = np.asarray(values, float)
        return float(fn_(v)) if v.size else float("nan")

    ci_low, ci_high = bootstrap_ci(with_tumor["volume_dice"])

    return {
        "patient_dice_mean": stat(with_tumor["volume_dice"], np.mean),
        "patient_dice_median": stat(with_tumor["volume_dice"], np.median),
        "patient_dice_ci_low": ci_low,  # 95% bootstrap interval of the mean over patients
        "patient_dice_ci_high": ci_high,
        "patient_iou_mean": stat(with_tumor["volume_iou"], np.mean),
        "patient_iou_median": stat(with_tumor["volume_iou"], np.median),
        "n_patients": int(len(with_tumor)),
        "n_patients_empty_truth": int(len(pt) - len(with_tumor)),
        "tumor_slice_dice_mean": stat(slice_dice, np.mean),
        "n_tumor_slices": int(len(tumor_slices)),
        "empty_slice_fp_rate": stat((empty_slices["pred_px"] > 0).to_numpy(), np.mean),
        "n_empty_slices": int(len(empty_slices)),
        "global_dice": dice_from_counts(tp, fp, fn),
        "global_iou": iou_from_counts(tp, fp, fn),
        "n_slices": int(len(slices)),
        **({} if boundary is None else boundary_summary(boundary)),
    }


def empty_baseline(slices: pd.DataFrame, boundary: pd.DataFrame | None = None) -> dict:
    """The same metrics for a predictor that never predicts tumor (the null model)."""
    null = slices.assign(tp=0, fp=0, fn=slices["truth_px"], pred_px=0)
    out = summarize(null, None if boundary is None else empty_prediction_boundary(boundary))
    return {k: v for k, v in out.items() if k not in ("nsd_tolerance", "distances_in_mm")}


def smoothed_slice_dice(slices: pd.DataFrame, smooth: float = 1.0) -> float:
    """The flattering per-slice Dice with smoothing over all slices (empty vs empty scores 1).

    Reported only to show why it is not the headline: the all-empty predictor scores the share
    of empty slices on it.
    """
    v = (2 * slices["tp"] + smooth) / (2 * slices["tp"] + slices["fp"] + slices["fn"] + smooth)
    return float(v.mean()) if len(v) else float("nan")
