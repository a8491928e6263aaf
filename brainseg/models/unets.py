"""Own architectures: a plain U-Net in the style of Buda et al. 2019 and a U-Net++ (Zhou et al. 2018)."""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401

import tf_keras as keras
from tf_keras import layers


def _conv_block(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def plain_unet(input_shape: tuple[int, int, int], base_filters: int = 32, depth: int = 4) -> keras.Model:
    """Buda et al.'s U-Net: 4 poolings, double 3x3 conv + BN + ReLU, transposed-conv upsampling."""
    inputs = keras.Input(input_shape, name="image")
    skips, x = [], inputs
    for d in range(depth):
        x = _conv_block(x, base_filters * 2**d, f"enc{d}")
        skips.append(x)
        x = layers.MaxPooling2D(name=f"pool{d}")(x)
    x = _conv_block(x, base_filters * 2**depth, "bottleneck")
    for d in reversed(range(depth)):
        x = layers.Conv2DTranspose(base_filters * 2**d, 2, strides=2, name=f"up{d}")(x)
        x = layers.Concatenate(name=f"cat{d}")([x, skips[d]])
        x = _conv_block(x, base_filters * 2**d, f"dec{d}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    return keras.Model(inputs, outputs, name="plain_unet")


def unet_plus_plus(input_shape: tuple[int, int, int], base_filters: int = 16, depth: int = 4,
                   deep_supervision: bool = False) -> keras.Model:
    """U-Net++: nested dense skip pathways X[i][j] = conv([X[i][0..j-1], up(X[i+1][j-1])]).

    With ``deep_supervision`` the output is the mean of the sigmoid heads on X[0][1..depth]
    (one tensor, so losses and metrics stay the same as for other models).
    """
    inputs = keras.Input(input_shape, name="image")
    grid: dict[tuple[int, int], object] = {}
    x = inputs
    for i in range(depth + 1):
        if i > 0:
            x = layers.MaxPooling2D(name=f"pool{i}")(grid[(i - 1, 0)])
        grid[(i, 0)] = _conv_block(x, base_filters * 2**i, f"x{i}_0")
    for j in range(1, depth + 1):
        for i in range(depth + 1 - j):
            up = layers.Conv2DTranspose(base_filters * 2**i, 2, strides=2, name=f"up{i}_{j}")(grid[(i + 1, j - 1)])
            cat = layers.Concatenate(name=f"cat{i}_{j}")([grid[(i, k)] for k in range(j)] + [up])
            grid[(i, j)] = _conv_block(cat, base_filters * 2**i, f"x{i}_{j}")
    if deep_supervision:
        heads = [layers.Conv2D(1, 1, activation="sigmoid", name=f"head{j}")(grid[(0, j)])
                 for j in range(1, depth + 1)]
        outputs = layers.Average(name="mask")(heads)
    else:
        outputs = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(grid[(0, depth)])
    return keras.Model(inputs, outputs, name="unetpp")
