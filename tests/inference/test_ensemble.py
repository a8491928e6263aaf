"""The fold ensemble is one network whose probabilities are the mean of its members'."""

from __future__ import annotations

import numpy as np
import pytest

from brainseg.inference.ensemble import ensemble_model, members_of
from brainseg.inference.segmenter import InferenceSettings, Segmenter, load_model_dir, predict_probs, save_model
from brainseg.models.factory import build_model
from brainseg.settings.config import Train

CFG = Train(arch="plain_unet", base_filters=4, size=32, channels="flair")


def tiny(seed: int):
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    return build_model(CFG)


@pytest.fixture(scope="module")
def members():
    return [tiny(s) for s in (1, 2, 3)]


@pytest.mark.parametrize("tta", [False, True])
def test_the_ensemble_probabilities_are_the_mean_of_its_members(members, tta):
    X = np.random.default_rng(0).normal(size=(5, 32, 32, 1)).astype(np.float32)
    each = np.stack([predict_probs(m, X, tta=tta) for m in members])
    together = predict_probs(ensemble_model(members), X, tta=tta)
    assert not np.allclose(each[0], each[1])  # the members differ, so the mean is not one of them
    np.testing.assert_allclose(together, each.mean(axis=0), atol=1e-5)


def test_a_saved_ensemble_loads_back_as_one_segmenter_with_its_members(members, tmp_path):
    ens = ensemble_model(members)
    save_model(ens, CFG, InferenceSettings(threshold=0.4, tta=True), tmp_path)
    model, cfg, settings = load_model_dir(tmp_path)
    assert len(members_of(model)) == 3 and settings.threshold == 0.4 and settings.tta
    X = np.random.default_rng(1).normal(size=(4, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(predict_probs(model, X), predict_probs(ens, X), atol=1e-6)
    images = [np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8) for i in range(3)]
    a = Segmenter(model, cfg, settings.replace(precision="float32")).segment(images, groups=["p"] * 3)
    b = Segmenter(ens, CFG, settings.replace(precision="float32")).segment(images, groups=["p"] * 3)
    assert all((x == y).all() for x, y in zip(a.masks, b.masks))


def test_a_bfloat16_copy_of_an_ensemble_stays_close(members):
    from brainseg.inference.segmenter import bfloat16_copy

    ens = ensemble_model(members)
    X = np.random.default_rng(2).normal(size=(3, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(predict_probs(bfloat16_copy(ens), X), predict_probs(ens, X), atol=0.05)


def test_one_member_is_the_member_and_mismatched_inputs_are_refused(members):
    assert ensemble_model(members[:1]) is members[0]
    with pytest.raises(ValueError, match="different inputs"):
        ensemble_model([members[0], build_model(Train(arch="plain_unet", base_filters=4, size=64))])
