"""Losses and metrics by name, composed from segmentation-models objects (they add and scale)."""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401

import segmentation_models as sm
import tensorflow as tf

LOSS_NAMES = ("bce", "dice", "jaccard", "focal", "tversky")


class TverskyLoss(sm.base.Loss):
    """1 - TI, TI = TP / (TP + alpha FP + beta FN); alpha = beta = 0.5 is the Dice loss.

    segmentation-models has no Tversky loss; this one subclasses its ``Loss`` so it composes.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0):
        super().__init__(name="tversky_loss")
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)

    def __call__(self, gt, pr):
        gt = tf.cast(gt, pr.dtype)
        axes = [1, 2, 3]
        tp = tf.reduce_sum(gt * pr, axis=axes)
        fp = tf.reduce_sum((1 - gt) * pr, axis=axes)
        fn = tf.reduce_sum(gt * (1 - pr), axis=axes)
        ti = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return tf.reduce_mean(1 - ti)


def make_loss(weights: dict, tversky_alpha: float = 0.3, tversky_beta: float = 0.7):
    """``{"bce": 0.5, "dice": 1.0}`` -> 0.5 * BinaryCELoss + 1.0 * DiceLoss (zero weights dropped)."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError("loss: expected a mapping of loss name to weight, e.g. {bce: 0.5, dice: 1.0}")
    unknown = sorted(set(weights) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"loss: unknown name(s) {unknown}; known: {list(LOSS_NAMES)}")
    builders = {
        "bce": sm.losses.BinaryCELoss,
        "dice": sm.losses.DiceLoss,
        "jaccard": sm.losses.JaccardLoss,
        "focal": sm.losses.BinaryFocalLoss,
        "tversky": lambda: TverskyLoss(tversky_alpha, tversky_beta),
    }
    total = None
    for name in LOSS_NAMES:
        w = float(weights.get(name, 0) or 0)
        if w < 0:
            raise ValueError(f"loss: weight of {name} is negative ({w})")
        if w == 0:
            continue
        term = w * builders[name]()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("loss: all weights are zero")
    return total


def make_metrics(threshold: float = 0.5) -> list:
    """Batch Dice (F1) and IoU, named ``dice`` and ``iou`` in Keras logs."""
    return [sm.metrics.FScore(threshold=threshold, name="dice"),
            sm.metrics.IOUScore(threshold=threshold, name="iou")]
