"""Honest evaluation at the original slice size: per-patient volume Dice first, counts beside.

Scoring only: masks come from :class:`brainseg.inference.segmenter.Segmenter`, the path every consumer
uses, so what is evaluated is what is served. Post-processing is chosen here on validation
patients (never test) and stored with the model.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd

from brainseg.evaluation.metrics import (
    boundary_table,
    empty_baseline,
    patient_table,
    slice_table,
    smoothed_slice_dice,
    summarize,
)
from brainseg.evaluation.surface import NSD_TOLERANCE
from brainseg.inference.segmenter import InferenceSettings, Segmenter, final_masks


@dataclasses.dataclass
class EvalResult:
    slices: pd.DataFrame    # one row per slice (manifest columns + tp/fp/fn/...)
    patients: pd.DataFrame  # one row per patient
    summary: dict           # headline metrics with counts
    baseline: dict          # the all-empty predictor's metrics
    preds: list[np.ndarray]

    def metrics(self) -> dict:
        """Flat dict for metrics.json / MLflow: the summary and ``baseline_empty_*`` beside it."""
        out = dict(self.summary)
        out["smoothed_slice_dice_all"] = smoothed_slice_dice(self.slices)
        out.update({f"baseline_empty_{k}": v for k, v in self.baseline.items() if not k.startswith("n_")})
        out["baseline_empty_smoothed_slice_dice_all"] = smoothed_slice_dice(
            self.slices.assign(tp=0, fp=0, fn=self.slices["truth_px"]))
        return out


def score(manifest: pd.DataFrame, preds: list[np.ndarray], truths: list[np.ndarray], *, boundary: bool = True,
          spacing=None, nsd_tolerance: float = NSD_TOLERANCE) -> EvalResult:
    """Score final (H, W) bool masks against full-size truth masks, one per manifest row.

    ``boundary``: also HD95, NSD at ``nsd_tolerance`` and lesion-wise detection per patient volume
    (a patient's slices stacked by the manifest's ``slice``; about a tenth of a second a patient);
    False for Dice and counts only (the post-processing candidates). ``spacing``: None (voxel units),
    one (z, y, x) in mm, or {patient: (z, y, x)} (see :func:`brainseg.evaluation.metrics.boundary_table`).
    """
    st = slice_table(manifest["patient"].tolist(), preds, truths)
    slices = pd.concat([manifest.reset_index(drop=True)[["patient", "patient_dir", "slice", "image_path"]],
                        st.drop(columns="patient")], axis=1)
    bt = (boundary_table(manifest["patient"].tolist(), preds, truths, order=manifest["slice"].to_numpy(),
                         spacing=spacing, tolerance=nsd_tolerance) if boundary else None)
    return EvalResult(slices, patient_table(st, bt), summarize(st, bt), empty_baseline(st, bt), preds)


def evaluate(segmenter: Segmenter, manifest: pd.DataFrame, images: list[np.ndarray],
             truths: list[np.ndarray], *, boundary: bool = True, spacing=None,
             nsd_tolerance: float = NSD_TOLERANCE) -> EvalResult:
    """Segment the manifest's slices (patients' slices grouped, in slice order) and score them."""
    masks = segmenter.segment(images, groups=manifest["patient"].tolist()).masks
    return score(manifest, masks, truths, boundary=boundary, spacing=spacing, nsd_tolerance=nsd_tolerance)


# Candidates, simplest first: ties go to the simpler setting.
# component_confidence: keep a patient's 3-D components whose peak probability reaches it (0: all);
# the largest-3-D-component step is no longer a candidate (it dropped small true tumors).
# threshold None = the model's own (the training threshold); lower ones answer the under-segmentation
# of large tumors (issue 24), and are kept only where they raise the validation per-patient Dice
POSTPROCESS_GRID = {"tta": (False, True), "min_component_px": (0, 64), "component_confidence": (0.0, 0.8, 0.9, 0.95),
                    "threshold": (None, 0.4, 0.3)}


def postprocess_candidates(base: InferenceSettings, grid: dict | None = None) -> list[InferenceSettings]:
    """Every combination of ``grid`` values on top of ``base`` (order: simplest first)."""
    grid = POSTPROCESS_GRID if grid is None else grid
    keys = list(grid)
    return [base.replace(**{k: v for k, v in zip(keys, values) if v is not None})
            for values in itertools.product(*(grid[k] for k in keys))]


def select_postprocessing(segmenter: Segmenter, manifest: pd.DataFrame, images: list[np.ndarray],
                          truths: list[np.ndarray], grid: dict | None = None
                          ) -> tuple[InferenceSettings, pd.DataFrame]:
    """Choose TTA and post-processing by mean per-patient Dice on these (validation) slices.

    The network runs once per TTA value; each candidate only re-thresholds and post-processes.
    Returns the best settings and a table of every candidate's scores (for the run's record).
    """
    groups = manifest["patient"].tolist()
    X, boxes = segmenter.prepare(images)
    shapes = [im.shape[:2] for im in images]
    probs_by_tta: dict[bool, np.ndarray] = {}
    rows, best, best_score = [], None, -np.inf
    for cand in postprocess_candidates(segmenter.settings, grid):
        if cand.tta not in probs_by_tta:
            probs_by_tta[cand.tta] = segmenter.with_settings(tta=cand.tta).probs(X)
        masks = final_masks(probs_by_tta[cand.tta], shapes, boxes, cand, groups)
        s = score(manifest, masks, truths, boundary=False).summary  # Dice decides; boundary costs time
        rows.append({"tta": cand.tta, "min_component_px": cand.min_component_px,
                     "component_confidence": cand.component_confidence, "largest_3d": cand.largest_3d,
                     "keep_largest": cand.keep_largest, "threshold": cand.threshold,
                     "patient_dice_mean": s["patient_dice_mean"], "patient_dice_median": s["patient_dice_median"],
                     "empty_slice_fp_rate": s["empty_slice_fp_rate"]})
        value = s["patient_dice_mean"] if s["patient_dice_mean"] == s["patient_dice_mean"] else -1.0
        if value > best_score + 1e-9:
            best, best_score = cand, value
    return best, pd.DataFrame(rows)
