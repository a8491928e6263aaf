"""tf.data input pipeline: tumor oversampling, batched GPU/CPU-friendly augmentation, prefetch."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


def _affine(batch: int, strength: float, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Per-sample rotation (up to 15 deg x strength) and scale (1 +- 0.1 x strength) about the centre."""
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    angle = tf.random.stateless_uniform([batch], s1, -1.0, 1.0) * (15.0 * math.pi / 180.0) * strength
    scale = 1.0 + tf.random.stateless_uniform([batch], s2, -1.0, 1.0) * 0.1 * strength
    c = (size - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    # output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2)
    a2 = c - cos * c + sin * c
    b2 = c - sin * c - cos * c
    zeros = tf.zeros_like(cos)
    return tf.stack([cos, -sin, a2, sin, cos, b2, zeros, zeros], axis=1)


def augment_batch(x: tf.Tensor, y: tf.Tensor, strength: float, seed: tf.Tensor):
    """Flips, rotation/scale and brightness/contrast on a batch. x (B,S,S,C) float32, y (B,S,S,1)."""
    b, size = tf.shape(x)[0], x.shape[1]
    k = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    flip = tf.random.stateless_uniform([b, 1, 1, 1], k[0]) < 0.5
    x, y = tf.where(flip, x[:, :, ::-1], x), tf.where(flip, y[:, :, ::-1], y)
    t = _affine(b, strength, size, k[1])
    shape = tf.constant([size, size])
    x = tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=t, output_shape=shape,
                                              fill_value=0.0, interpolation="BILINEAR")
    y = tf.raw_ops.ImageProjectiveTransformV3(images=y, transforms=t, output_shape=shape,
                                              fill_value=0.0, interpolation="NEAREST")
    contrast = 1.0 + tf.random.stateless_uniform([b, 1, 1, 1], k[2], -0.15, 0.15) * strength
    shift = tf.random.stateless_uniform([b, 1, 1, 1], k[3], -0.1, 0.1) * strength
    return x * contrast + shift, y


def area_weights(tumor_px: np.ndarray, uniform_share: float) -> np.ndarray:
    """Sampling probability per slice: ``uniform_share`` spread evenly over all slices, the rest in
    proportion to each slice's tumor area (Buda et al. 2019). (N,) pixel counts -> (N,) summing to 1.

    >>> area_weights(np.array([0, 10, 30]), 0.5).round(4).tolist()
    [0.1667, 0.2917, 0.5417]
    """
    area = np.asarray(tumor_px, np.float64)
    n = len(area)
    if n == 0:
        return area
    if area.sum() <= 0:
        return np.full(n, 1.0 / n)
    return uniform_share / n + (1.0 - uniform_share) * area / area.sum()


def train_dataset(X: np.ndarray, Y: np.ndarray, *, batch_size: int, tumor_fraction: float,
                  augment: float, seed: int, weights: np.ndarray | None = None,
                  out_size: int | None = None) -> tf.data.Dataset:
    """Endless batches ((B,S,S,C) float32, (B,S,S,1) float32) with ``tumor_fraction`` tumor slices.

    Arrays are held once as tensors and gathered by index, so the graph stays small whatever
    the dataset size. ``tumor_fraction`` < 0 keeps the natural proportion. ``weights`` (N,)
    (e.g. :func:`area_weights`) replaces the tumor/empty mix: each slice is drawn with that
    probability, with replacement. ``out_size`` shrinks each batch to that square size before
    augmentation (progressive resizing): images by area averaging, masks by area then >= 0.5.
    """
    tumor = np.asarray(Y).reshape(len(Y), -1).max(axis=1) > 0
    Xt, Yt = tf.constant(np.asarray(X)), tf.constant(np.asarray(Y))
    idx_t, idx_e = np.flatnonzero(tumor), np.flatnonzero(~tumor)

    def endless(idx: np.ndarray, s: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(idx.astype(np.int64)).shuffle(
            max(len(idx), 1), seed=s, reshuffle_each_iteration=True).repeat()

    if weights is not None:
        logits = tf.constant(np.log(np.maximum(np.asarray(weights, np.float64), 1e-12))[None], tf.float32)
        idx = tf.data.Dataset.random(seed=seed).map(
            lambda r: tf.random.stateless_categorical(
                logits, 1, tf.stack([tf.cast(r % (2**31 - 1), tf.int32), seed]), dtype=tf.int64)[0, 0])
    elif 0 <= tumor_fraction and len(idx_t) and len(idx_e):
        idx = tf.data.Dataset.sample_from_datasets(
            [endless(idx_t, seed), endless(idx_e, seed + 1)], [tumor_fraction, 1 - tumor_fraction],
            seed=seed)
    else:
        idx = endless(np.arange(len(X)), seed)
    ds = idx.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda i: (tf.cast(tf.gather(Xt, i), tf.float32), tf.cast(tf.gather(Yt, i), tf.float32)),
                num_parallel_calls=tf.data.AUTOTUNE)
    if out_size is not None:
        ds = ds.map(lambda x, y: (tf.image.resize(x, [out_size, out_size], method="area"),
                                  tf.cast(tf.image.resize(y, [out_size, out_size], method="area") >= 0.5, tf.float32)),
                    num_parallel_calls=tf.data.AUTOTUNE)
    if augment > 0:
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: augment_batch(xy[0], xy[1], float(augment), tf.cast(s, tf.int32) % (2**31 - 1)),
            num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
