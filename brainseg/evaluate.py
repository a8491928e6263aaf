"""Honest evaluation at the original slice size: per-patient volume Dice first, counts beside."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from skimage import measure, morphology

from brainseg.config import TrainConfig
from brainseg.data.preprocess import prepare_image, probability_to_mask
from brainseg.metrics import empty_baseline, patient_table, slice_table, smoothed_slice_dice, summarize
from brainseg.train import predict_probs


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    threshold: float = 0.5
    min_component_px: int = 0
    keep_largest: bool = False
    tta: bool = False
    batch_size: int = 32

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def postprocess(mask: np.ndarray, min_component_px: int = 0, keep_largest: bool = False) -> np.ndarray:
    """Drop connected components under ``min_component_px`` pixels; optionally keep only the largest."""
    mask = np.asarray(mask, bool)
    if min_component_px > 0:
        mask = morphology.remove_small_objects(mask, max_size=int(min_component_px) - 1)
    if keep_largest and mask.any():
        labels = measure.label(mask, connectivity=2)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return mask


def masks_from_probs(probs: np.ndarray, shapes: list[tuple[int, int]], ev: EvalSettings) -> list[np.ndarray]:
    """(N, S, S) probabilities -> N bool masks at each slice's own (H, W), post-processed."""
    return [postprocess(probability_to_mask(p, shape, ev.threshold), ev.min_component_px, ev.keep_largest)
            for p, shape in zip(probs, shapes, strict=True)]


def segment_images(model, cfg: TrainConfig, images: list[np.ndarray], ev: EvalSettings
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """(H, W, 3) uint8 slices -> (bool masks at input size, (N, S, S) probabilities).

    The path of ``predict``, the served model and the web page.
    """
    if not images:
        return [], np.zeros((0, cfg.size, cfg.size), np.float32)
    # float16, as load_arrays stores training/evaluation inputs: served masks equal evaluate's
    X = np.stack([prepare_image(im, cfg.prep).astype(np.float16) for im in images])
    probs = predict_probs(model, X, ev.batch_size, ev.tta)
    return masks_from_probs(probs, [im.shape[:2] for im in images], ev), probs


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


def evaluate_probs(manifest: pd.DataFrame, probs: np.ndarray, truths: list[np.ndarray], ev: EvalSettings) -> EvalResult:
    """Score network probabilities for the manifest's slices against full-size truth masks."""
    shapes = [t.shape for t in truths]
    preds = masks_from_probs(probs, shapes, ev)
    st = slice_table(manifest["patient"].tolist(), preds, truths)
    slices = pd.concat([manifest.reset_index(drop=True)[["patient", "patient_dir", "slice", "image_path"]],
                        st.drop(columns="patient")], axis=1)
    return EvalResult(slices, patient_table(st), summarize(st), empty_baseline(st), preds)


def evaluate(model, cfg: TrainConfig, manifest: pd.DataFrame, X: np.ndarray, truths: list[np.ndarray],
             ev: EvalSettings) -> EvalResult:
    """Predict the prepared inputs ``X`` (N, S, S, C) and score them at the original size."""
    probs = predict_probs(model, X, ev.batch_size, ev.tta)
    return evaluate_probs(manifest, probs, truths, ev)
