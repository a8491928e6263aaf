"""Pure-NumPy slice preparation: the one path used by training, evaluation, predict and serving."""

from __future__ import annotations

import cv2
import numpy as np

from brainseg.settings.config import PrepConfig

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


HEAD_LEVEL = 10         # a pixel belongs to the head when any channel exceeds this (uint8)
HEAD_MARGIN = 8         # pixels added around the head's bounding box
MIN_BOX_FRACTION = 0.5  # the box is at least this share of the slice side (limits magnification to 2x)

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, in slice pixels


def head_box(image: np.ndarray) -> Box:
    """Square box around the head of an (H, W, C) uint8 slice, clipped to the slice.

    The head is every row/column with at least 3 pixels above ``HEAD_LEVEL`` in any channel;
    the box is its bounding box plus ``HEAD_MARGIN``, made square (the longer side), at least
    ``MIN_BOX_FRACTION`` of the shorter slice side, and shifted to lie inside the slice.
    A slice without head gives the whole slice (square or not). Per slice, so a single served
    slice is cropped exactly as in training.

    >>> im = np.zeros((100, 100, 3), np.uint8); im[40:60, 30:70] = 200
    >>> head_box(im)
    (22, 78, 22, 78)
    """
    h, w = image.shape[:2]
    head = (image.reshape(h, w, -1) > HEAD_LEVEL).any(axis=2)
    rows, cols = np.flatnonzero(head.sum(1) >= 3), np.flatnonzero(head.sum(0) >= 3)
    if rows.size == 0 or cols.size == 0:
        return 0, h, 0, w
    y0, y1 = rows[0] - HEAD_MARGIN, rows[-1] + 1 + HEAD_MARGIN
    x0, x1 = cols[0] - HEAD_MARGIN, cols[-1] + 1 + HEAD_MARGIN
    side = int(min(max(y1 - y0, x1 - x0, round(MIN_BOX_FRACTION * min(h, w))), h, w))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    y0 = int(min(max(round(cy - side / 2), 0), h - side))
    x0 = int(min(max(round(cx - side / 2), 0), w - side))
    return y0, y0 + side, x0, x0 + side


def slice_box(image: np.ndarray, prep: PrepConfig) -> Box:
    """The region of the slice the network sees: the head box with ``crop: head``, else all."""
    return head_box(image) if prep.crop == "head" else (0, image.shape[0], 0, image.shape[1])


def prepare_image(image: np.ndarray, prep: PrepConfig, box: Box | None = None) -> np.ndarray:
    """(H, W, 3) uint8 slice -> (S, S, C) float32 network input (C = 1 for FLAIR, 3 for all).

    Crops to ``box`` (default :func:`slice_box`), resizes with area interpolation, optionally
    sharpens, then normalises: ``unit`` scales to [0, 1]; ``zscore`` standardises each channel
    over the head (pixels > 0), background stays 0.
    """
    y0, y1, x0, x1 = box if box is not None else slice_box(image, prep)
    x = image[y0:y1, x0:x1]
    x = x[:, :, FLAIR:FLAIR + 1] if prep.channels == "flair" else x
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


def prepare_mask(mask: np.ndarray, size: int, box: Box | None = None) -> np.ndarray:
    """(H, W) bool mask -> (S, S, 1) uint8 in {0, 1}: cropped to ``box``, resized nearest-neighbour."""
    m = mask.astype(np.uint8)
    if box is not None:
        m = m[box[0]:box[1], box[2]:box[3]]
    if m.shape != (size, size):
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
    return m[:, :, None]


def probability_to_original(prob: np.ndarray, shape: tuple[int, int], box: Box | None = None) -> np.ndarray:
    """(S, S) or (S, S, 1) probabilities -> (H, W) float32 at the original slice size.

    Probabilities are resized bilinearly to the ``box`` they were cropped from (default: the
    whole slice) and pasted into a zero (H, W) map.
    """
    y0, y1, x0, x1 = box if box is not None else (0, shape[0], 0, shape[1])
    p = np.asarray(prob, np.float32).reshape(prob.shape[0], prob.shape[1])
    if p.shape != (y1 - y0, x1 - x0):
        p = cv2.resize(p, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    out = np.zeros(tuple(shape), np.float32)
    out[y0:y1, x0:x1] = p
    return out


def probability_to_mask(prob: np.ndarray, shape: tuple[int, int], threshold: float,
                        box: Box | None = None) -> np.ndarray:
    """(S, S) or (S, S, 1) probabilities -> (H, W) bool mask at the original slice size
    (:func:`probability_to_original`, thresholded once)."""
    return probability_to_original(prob, shape, box) > threshold
