"""Architecture factory and losses by name."""

import brainseg.settings.keras_env  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf

from brainseg.models.factory import ARCHS, OWN_ARCHS, SM_ARCHS, build_model, check_names, set_encoder_trainable
from brainseg.models.losses import TverskyLoss, make_loss
from brainseg.settings.architectures import ENCODER_ARCHS, has_encoder
from brainseg.settings.config import Train


@pytest.mark.parametrize("arch,encoder,channels", [
    ("unet", "resnet18", "flair"),
    ("linknet", "resnet18", "all"),
    ("fpn", "mobilenetv2", "all"),
    ("unetpp", "resnet18", "flair"),
    ("plain_unet", "resnet18", "all"),
])
def test_every_architecture_maps_a_slice_to_a_probability_mask(arch, encoder, channels):
    cfg = Train.from_dict({"arch": arch, "encoder": encoder, "channels": channels, "size": 64,
                                 "base_filters": 4})
    model = build_model(cfg)
    x = np.zeros((2, 64, 64, cfg.prep.n_channels), np.float32)
    y = model(x, training=False).numpy()
    assert y.shape == (2, 64, 64, 1)
    assert (y >= 0).all() and (y <= 1).all()


def test_the_light_list_of_encoder_architectures_is_the_factorys():
    # records leave out the encoder of an architecture without one (settings/architectures.py, no TensorFlow)
    assert set(ENCODER_ARCHS) == set(SM_ARCHS)
    assert [a for a in ARCHS if not has_encoder(a)] == list(OWN_ARCHS)


def test_unetpp_deep_supervision_averages_heads_into_one_output():
    cfg = Train.from_dict({"arch": "unetpp", "size": 32, "base_filters": 4, "deep_supervision": True})
    model = build_model(cfg)
    assert model.output_shape == (None, 32, 32, 1)
    assert sum(layer.name.startswith("head") for layer in model.layers) == 4


def test_pspnet_needs_a_size_divisible_by_48():
    with pytest.raises(ValueError, match="divisible by 48"):
        build_model(Train.from_dict({"arch": "pspnet", "encoder": "resnet18", "size": 64}))


@pytest.mark.parametrize("arch,encoder,match", [("segformer", "resnet18", "unknown architecture"),
                                                ("unet", "resnet999", "unknown encoder")])
def test_unknown_names_are_refused(arch, encoder, match):
    with pytest.raises(ValueError, match=match):
        check_names(arch, encoder)


def test_encoder_weights_must_be_a_local_file(tmp_path):
    cfg = Train.from_dict({"arch": "unet", "encoder": "resnet18", "size": 64, "channels": "all",
                                 "encoder_weights": str(tmp_path / "missing.h5")})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model(cfg)


def _tensors():
    gt = np.zeros((1, 4, 4, 1), np.float32)
    gt[0, :2, :2] = 1
    pr = np.full((1, 4, 4, 1), 0.2, np.float32)
    pr[0, :2, :] = 0.9
    return tf.constant(gt), tf.constant(pr)


def test_freezing_and_unfreezing_an_encoder_matches_segmentation_models():
    """Issue 36 item 4: no private API of segmentation-models; the freeze it does when building a
    model with ``encoder_freeze`` (all but BatchNormalization) is what set_encoder_trainable(False)
    does, and unfreezing makes every layer trainable again."""
    import tf_keras as keras
    from segmentation_models.models import _utils  # the private helper, only to check against it

    model = build_model(Train.from_dict({"arch": "unet", "encoder": "resnet18", "size": 64,
                                         "freeze_encoder_epochs": 1}))
    frozen_by_sm = {layer.name for layer in model.layers if not layer.trainable}
    assert frozen_by_sm and all("bn" not in name for name in frozen_by_sm)  # BatchNorm stays trainable
    set_encoder_trainable(model, True)
    assert all(layer.trainable for layer in model.layers)
    set_encoder_trainable(model, False)
    ours = [layer.trainable for layer in model.layers]
    _utils.freeze_model(model, layers=keras.layers)  # segmentation-models passes its framework's layers
    assert ours == [layer.trainable for layer in model.layers]


def test_weighted_loss_is_the_weighted_sum_of_its_terms():
    gt, pr = _tensors()
    bce, dice = make_loss({"bce": 1.0}), make_loss({"dice": 1.0})
    both = make_loss({"bce": 0.5, "dice": 2.0})
    assert float(both(gt, pr)) == pytest.approx(0.5 * float(bce(gt, pr)) + 2.0 * float(dice(gt, pr)), rel=1e-5)


def test_tversky_with_equal_weights_is_the_dice_loss():
    gt, pr = _tensors()
    tp = float(tf.reduce_sum(gt * pr))
    fp = float(tf.reduce_sum((1 - gt) * pr))
    fn = float(tf.reduce_sum(gt * (1 - pr)))
    expected = 1 - (tp + 1) / (tp + 0.5 * fp + 0.5 * fn + 1)
    assert float(TverskyLoss(0.5, 0.5)(gt, pr)) == pytest.approx(expected, rel=1e-5)
    # alpha > beta punishes false positives more: this prediction has more FP than FN
    assert float(TverskyLoss(0.7, 0.3)(gt, pr)) > float(TverskyLoss(0.3, 0.7)(gt, pr))


@pytest.mark.parametrize("weights,match", [({"hinge": 1.0}, "unknown"), ({"bce": 0.0}, "all weights are zero"),
                                           ({"dice": -1.0}, "negative"), ({}, "expected a mapping")])
def test_bad_loss_specs_are_refused(weights, match):
    with pytest.raises(ValueError, match=match):
        make_loss(weights)
