"""Which architectures (``train.arch``) take an encoder (``train.encoder``), by name: no TensorFlow here
(:mod:`brainseg.models.factory` builds them; a test keeps the two lists the same).

Records name what ran: the project's own U-Nets (``plain_unet``, ``unetpp``) have no encoder, so an
encoder setting, which every profile carries, appears in no run name, param or model card of theirs.
"""

from __future__ import annotations

ENCODER_ARCHS = ("unet", "linknet", "fpn", "pspnet")  # segmentation-models' builders, on an encoder backbone
ENCODER_KEYS = ("encoder", "encoder_weights", "freeze_encoder_epochs")  # train settings that only they read


def has_encoder(arch: str | None) -> bool:
    return arch in ENCODER_ARCHS


def model_name(arch: str | None, encoder: str | None, sep: str = "-") -> str:
    """The architecture, and its encoder where it has one.

    >>> model_name("plain_unet", "resnet18")
    'plain_unet'
    >>> model_name("unet", "resnet18", " / ")
    'unet / resnet18'
    """
    return f"{arch}{sep}{encoder}" if has_encoder(arch) and encoder else str(arch)


def without_unused_encoder(train: dict) -> dict:
    """``train`` settings (or params) without the encoder keys when ``train["arch"]`` takes no encoder.

    >>> without_unused_encoder({"arch": "plain_unet", "encoder": "resnet18", "size": 64})
    {'arch': 'plain_unet', 'size': 64}
    """
    return train if has_encoder(train.get("arch")) else {k: v for k, v in train.items() if k not in ENCODER_KEYS}
