"""Build a segmentation model by name from a :class:`~brainseg.settings.config.Train`."""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401

from pathlib import Path

import segmentation_models as sm
import tf_keras as keras

from brainseg.models.unets import plain_unet, unet_plus_plus
from brainseg.settings.config import Train

SM_ARCHS = {"unet": sm.Unet, "linknet": sm.Linknet, "fpn": sm.FPN, "pspnet": sm.PSPNet}
OWN_ARCHS = ("unetpp", "plain_unet")
ARCHS = tuple(SM_ARCHS) + OWN_ARCHS
ENCODERS = tuple(sm.get_available_backbone_names())


def check_names(arch: str, encoder: str | None) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    if arch in SM_ARCHS and encoder not in ENCODERS:
        raise ValueError(f"encoder: unknown encoder {encoder!r}; known include resnet18, resnet34, "
                         f"resnet50, efficientnetb0..b3, mobilenetv2 (all: {len(ENCODERS)})")


BN_MOMENTUM = 0.9  # Keras' 0.99 leaves the moving statistics near their init after a short schedule


def build_model(cfg: Train, variable_size: bool = False) -> keras.Model:
    """The network of ``cfg``; ``variable_size`` leaves its height and width open (progressive
    resizing trains one set of weights at several sizes; the saved model has ``cfg.size``)."""
    model = _build(cfg, variable_size)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    return model


def _build(cfg: Train, variable_size: bool = False) -> keras.Model:
    """(None, S, S, C) float32 -> (None, S, S, 1) sigmoid probabilities.

    ``encoder_weights`` is None or the path of a local .h5 file of encoder weights (for 3 input
    channels, as ImageNet weights are); nothing is downloaded.
    """
    check_names(cfg.arch, cfg.encoder)
    shape = (None, None, cfg.prep.n_channels) if variable_size else (cfg.size, cfg.size, cfg.prep.n_channels)
    if cfg.arch == "plain_unet":
        return plain_unet(shape, base_filters=cfg.base_filters)
    if cfg.arch == "unetpp":
        return unet_plus_plus(shape, base_filters=cfg.base_filters, deep_supervision=cfg.deep_supervision)
    weights = cfg.encoder_weights
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"encoder_weights: {weights} is not a file (only local weights "
                                    "files are used; nothing is downloaded)")
        if shape[2] != 3:
            raise ValueError("encoder_weights: pretrained encoders need channels: all (3 channels)")
    kwargs = {"input_shape": shape, "classes": 1, "activation": "sigmoid",
              "encoder_weights": str(weights) if weights else None,
              "encoder_freeze": cfg.freeze_encoder_epochs > 0}
    if cfg.arch == "pspnet":
        if variable_size:
            raise ValueError("pspnet has a fixed input size: it cannot train with progressive_size")
        if cfg.size % 48:
            raise ValueError(f"pspnet needs an input size divisible by 48 (got {cfg.size})")
    return SM_ARCHS[cfg.arch](cfg.encoder, **kwargs)


def set_encoder_trainable(model: keras.Model, trainable: bool) -> None:
    """Unfreeze (or freeze) a segmentation-models model; frozen, its BatchNormalization layers stay
    trainable, as segmentation-models' own ``encoder_freeze`` leaves them."""
    for layer in model.layers:  # what segmentation-models' private _utils.freeze_model does, with Keras' public API
        layer.trainable = trainable or isinstance(layer, keras.layers.BatchNormalization)
