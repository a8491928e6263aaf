"""Pure-NumPy slice preparation: the one path used by training, evaluation, predict and serving."""

from __future__ import annotations

import cv2
import numpy as np

from brainseg.config import PrepConfig

FLAIR = 1  # channel order in kaggle_3m: pre-contrast, FLAIR, post-contrast


def sharpen(image: np.ndarray, alpha: float = 1.0, lightness: float = 1.5) -> np.ndarray:
    """imgaug's ``Sharpen(alpha, lightness)`` (the seed article's choice) on a uint8 (H, W, C) image."""
    identity = np.zeros((3, 3), np.float32)
    identity[1, 1] = 1
    effect = -np.ones((3, 3), np.float32)
    effect[1, 1] = 8 + lightness
    kernel = (1 - alpha) * identity + alpha * effect
    out = cv2.filter2D(image.astype(np.float32), -1, kernel, borderType=cv2.BORDER_REFLECT)
    return np.clip(out, 0, 255).astype(np.uint8).reshape(image.shape)


def prepare_image(image: np.ndarray, prep: PrepConfig) -> np.ndarray:
    """(H, W, 3) uint8 slice -> (S, S, C) float32 network input (C = 1 for FLAIR, 3 for all).

    Resizes with area interpolation, optionally sharpens, then normalises: ``unit`` scales to
    [0, 1]; ``zscore`` standardises each channel over the head (pixels > 0), background stays 0.
    """
    x = image[:, :, FLAIR:FLAIR + 1] if prep.channels == "flair" else image
    if x.shape[0] != prep.size or x.shape[1] != prep.size:
        x = cv2.resize(x, (prep.size, prep.size), interpolation=cv2.INTER_AREA)
        x = x.reshape(prep.size, prep.size, -1)
    if prep.sharpen:
        x = sharpen(x)
    x = x.astype(np.float32)
    if prep.normalize == "unit":
        return x / 255.0
    head = x > 0
    out = np.zeros_like(x)
    for c in range(x.shape[2]):
        vals = x[:, :, c][head[:, :, c]]
        if vals.size > 1:
            out[:, :, c] = np.where(head[:, :, c], (x[:, :, c] - vals.mean()) / (vals.std() + 1e-6), 0)
    return out


def prepare_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool mask -> (S, S, 1) uint8 in {0, 1}, resized nearest-neighbour."""
    m = mask.astype(np.uint8)
    if m.shape != (size, size):
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
    return m[:, :, None]


def probability_to_mask(prob: np.ndarray, shape: tuple[int, int], threshold: float) -> np.ndarray:
    """(S, S) or (S, S, 1) probabilities -> (H, W) bool mask at the original slice size.

    Probabilities are resized bilinearly, then thresholded once.
    """
    p = np.asarray(prob, np.float32).reshape(prob.shape[0], prob.shape[1])
    if p.shape != tuple(shape):
        p = cv2.resize(p, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return p > threshold
