"""The one inference path: crop box, sampling weights, post-processing, settings stored with the
model, precision, and the choice of post-processing on validation slices. Hand-built arrays."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainseg.data.pipeline import area_weights, train_dataset
from brainseg.data.preprocess import head_box, prepare_image, prepare_mask, probability_to_mask, slice_box
from brainseg.inference.segmenter import (
    InferenceSettings,
    Segmenter,
    final_masks,
    largest_component_3d,
    load_model_dir,
    postprocess_slice,
    read_settings,
    save_model,
)
from brainseg.settings.config import PrepConfig, Train
from brainseg.settings.settings_io import ConfigError
from helpers import threshold_net


def head(size=100, rows=(40, 60), cols=(30, 70), value=200):
    im = np.zeros((size, size, 3), np.uint8)
    im[rows[0]:rows[1], cols[0]:cols[1]] = value
    return im


# ------------------------------------------------------------------------------ crop box
@pytest.mark.parametrize("image, expected", [
    (head(), (22, 78, 22, 78)),                       # 20x40 head + 8 margin -> 56 square, centred
    (head(rows=(0, 90), cols=(0, 90)), (0, 100, 0, 100)),  # 90+16 > 100: clipped to the slice
    (head(rows=(2, 12), cols=(85, 98)), (0, 50, 50, 100)),  # small head: >= 50% side, shifted inside
    (np.zeros((100, 100, 3), np.uint8), (0, 100, 0, 100)),  # no head: the whole slice
    (head(value=5), (0, 100, 0, 100)),                 # below HEAD_LEVEL counts as background
])
def test_head_box(image, expected):
    assert head_box(image) == expected


def test_single_noisy_pixels_do_not_widen_the_box():
    im = head()
    im[0, 0] = im[99, 99] = 255  # lone bright pixels: rows/cols need >= 3 head pixels
    assert head_box(im) == (22, 78, 22, 78)


def test_crop_then_paste_back_recovers_the_mask_inside_the_box():
    im = head(size=64, rows=(16, 48), cols=(16, 48))
    mask = np.zeros((64, 64), bool)
    mask[24:40, 20:36] = True
    prep = PrepConfig(size=32, crop="head", channels="all")
    box = slice_box(im, prep)
    assert box == (8, 56, 8, 56)  # 32 + 16 margin = 48
    y = prepare_mask(mask, 32, box)[..., 0]
    assert y.shape == (32, 32) and y.sum() > 0
    back = probability_to_mask(y.astype(np.float32), (64, 64), 0.5, box)
    assert back.shape == (64, 64) and not back[:8].any() and not back[:, :8].any()
    inter = (back & mask).sum()
    assert 2 * inter / (back.sum() + mask.sum()) > 0.9
    x = prepare_image(im, prep, box)
    assert x.shape == (32, 32, 3)


def test_without_crop_the_box_is_the_whole_slice():
    assert slice_box(head(), PrepConfig(size=32)) == (0, 100, 0, 100)


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("areas, share, expected", [
    ([0, 10, 30], 0.5, [1 / 6, 1 / 6 + 0.125, 1 / 6 + 0.375]),
    ([0, 10, 30], 1.0, [1 / 3] * 3),
    ([0, 10, 30], 0.0, [0, 0.25, 0.75]),
    ([0, 0], 0.2, [0.5, 0.5]),  # no tumor anywhere: uniform
])
def test_area_weights(areas, share, expected):
    w = area_weights(np.array(areas), share)
    assert w.sum() == pytest.approx(1.0)
    assert w == pytest.approx(expected)


def test_area_sampling_draws_slices_in_proportion_to_their_weights():
    n = 4
    X = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 4, 4, 1), np.float32)
    Y = np.zeros((n, 4, 4, 1), np.uint8)
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    ds = train_dataset(X, Y, batch_size=50, tumor_fraction=0.5, augment=0.0, seed=3, weights=weights)
    drawn = np.concatenate([x[:, 0, 0, 0].numpy() for x, _ in ds.take(40)]).astype(int)
    freq = np.bincount(drawn, minlength=n) / len(drawn)
    assert freq == pytest.approx(weights, abs=0.03)  # 2,000 draws: sd of each share <= 0.011


# ------------------------------------------------------------------------------ post-processing
def test_min_component_uses_8_connectivity():
    m = np.zeros((8, 8), bool)
    m[1, 1] = m[2, 2] = m[3, 3] = True   # one diagonal component of 3 px (8-connected)
    m[6, 6] = True                        # a lone pixel
    out = postprocess_slice(m, min_component_px=2)
    assert out[1, 1] and out[2, 2] and out[3, 3] and not out[6, 6]


@pytest.mark.parametrize("min_px, keep_largest, expected_px", [
    (0, False, 4 + 9 + 1), (2, False, 4 + 9), (5, False, 9), (0, True, 9), (10, False, 0),
])
def test_postprocess_slice_table(min_px, keep_largest, expected_px):
    m = np.zeros((12, 12), bool)
    m[0:2, 0:2] = True      # 4 px
    m[5:8, 5:8] = True      # 9 px
    m[11, 0] = True         # 1 px
    assert postprocess_slice(m, min_px, keep_largest).sum() == expected_px


def test_largest_3d_component_keeps_the_volume_not_the_slice_winner():
    a = np.zeros((3, 10, 10), bool)
    a[0, 0:2, 0:2] = a[1, 1:3, 1:3] = a[2, 2:4, 2:4] = True   # 3 slices, 12 px, diagonal touches
    a[1, 6:10, 6:10] = True                                   # 16 px in one slice only
    kept = np.stack(largest_component_3d(list(a)))
    assert kept.sum() == 16 and kept[1, 6:10, 6:10].all()
    a[1, 6:10, 6:10] = False
    a[1, 7:9, 7:9] = True                                     # now 4 px: the 3-slice tube wins
    kept = np.stack(largest_component_3d(list(a)))
    assert kept.sum() == 12 and not kept[1, 7:9, 7:9].any()


def test_largest_3d_connects_through_slices_by_26_neighbourhood():
    a = np.zeros((2, 5, 5), bool)
    a[0, 1, 1] = True
    a[1, 2, 2] = True  # diagonal across slices
    a[1, 4, 4] = True
    assert np.stack(largest_component_3d(list(a))).sum() == 2


def test_final_masks_apply_3d_only_within_a_patient():
    probs = np.zeros((4, 4, 4), np.float32)
    probs[0, :2, :2] = probs[1, :2, :2] = 0.9  # patient a: 2-slice blob
    probs[2, 3, 3] = 0.9                       # patient a: a lone pixel elsewhere
    probs[3, 3, 3] = 0.9                       # patient b: its only component
    s = InferenceSettings(largest_3d=True)
    boxes = [(0, 4, 0, 4)] * 4
    masks = final_masks(probs, [(4, 4)] * 4, boxes, s, groups=["a", "a", "a", "b"])
    assert [int(m.sum()) for m in masks] == [4, 4, 0, 1]
    masks = final_masks(probs, [(4, 4)] * 4, boxes, s, groups=None)  # no volume: no 3-D step
    assert [int(m.sum()) for m in masks] == [4, 4, 1, 1]


@pytest.mark.parametrize("field, value, message", [
    ("threshold", 1.0, "threshold"), ("threshold", 0, "threshold"), ("min_component_px", -1, "min_component_px"),
    ("precision", "float16", "precision"), ("batch_size", 0, "batch_size"),
])
def test_inference_settings_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        InferenceSettings(**{field: value})


# ------------------------------------------------------------------------------ a tiny fixed network
def slice_with(blobs, size=32):
    im = np.zeros((size, size, 3), np.uint8)
    im[2:30, 2:30] = 60  # head
    for (r0, r1, c0, c1) in blobs:
        im[r0:r1, c0:c1] = 250
    return im


def test_save_and_load_keep_the_inference_settings(tmp_path):
    cfg = Train(arch="plain_unet", size=32)
    settings = InferenceSettings(threshold=0.4, tta=True, min_component_px=5, largest_3d=True, precision="float32")
    save_model(threshold_net(32), cfg, settings, tmp_path / "m")
    model, cfg2, settings2 = load_model_dir(tmp_path / "m")
    assert settings2 == settings and cfg2 == cfg
    doc = json.loads((tmp_path / "m" / "brainseg.json").read_text())
    del doc["inference"]  # a model saved before settings were stored: threshold only
    (tmp_path / "m" / "brainseg.json").write_text(json.dumps(doc))
    assert read_settings(tmp_path / "m" / "brainseg.json")[1] == InferenceSettings(threshold=cfg.threshold)


def test_segmenter_applies_its_stored_post_processing():
    cfg = Train(arch="plain_unet", size=32, channels="flair")
    images = [slice_with([(10, 20, 10, 20), (26, 27, 26, 27)])]  # a tumor and a 1-px speck
    plain = Segmenter(threshold_net(32), cfg, InferenceSettings(precision="float32")).segment(images).masks[0]
    cleaned = Segmenter(threshold_net(32), cfg, InferenceSettings(precision="float32", min_component_px=4)
                        ).segment(images).masks[0]
    assert plain[26, 26] and not cleaned[26, 26]
    assert cleaned[10:20, 10:20].all() and cleaned.sum() == 100


def test_bfloat16_masks_agree_with_float32():
    cfg = Train(arch="plain_unet", size=32, channels="flair")
    rng = np.random.default_rng(0)
    images = [slice_with([(r, r + 8, c, c + 6)]) for r, c in rng.integers(3, 20, size=(6, 2))]
    f32 = Segmenter(threshold_net(32), cfg, InferenceSettings(precision="float32"))
    b16 = Segmenter(threshold_net(32), cfg, InferenceSettings(precision="bfloat16"))
    p32, p16 = f32.segment(images), b16.segment(images)
    assert np.abs(p32.probs - p16.probs).max() < 0.02
    disagree = sum(int((a != b).sum()) for a, b in zip(p32.masks, p16.masks))
    assert disagree <= 0.001 * sum(m.size for m in p32.masks)


def test_post_processing_is_chosen_on_the_given_slices_only():
    from brainseg.evaluation.evaluate import select_postprocessing

    cfg = Train(arch="plain_unet", size=32, channels="flair")
    images = [slice_with([(10, 20, 10, 20), (26, 27, 26, 27)]), slice_with([(12, 20, 12, 20)]),
              slice_with([(25, 26, 5, 6)])]  # tumor + speck, tumor (64 px), empty truth with a speck
    truths = [np.zeros((32, 32), bool) for _ in images]
    truths[0][10:20, 10:20] = True
    truths[1][12:20, 12:20] = True
    manifest = pd.DataFrame({"patient": ["p", "p", "p"], "patient_dir": ["p"] * 3, "slice": [1, 2, 3],
                             "image_path": ["a", "b", "c"]})
    seg = Segmenter(threshold_net(32), cfg, InferenceSettings(precision="float32"))
    best, table = select_postprocessing(seg, manifest, images, truths)
    assert len(table) == 48  # TTA x min_component_px x component_confidence x threshold (2 x 2 x 4 x 3)
    plain = table[(~table.tta) & (table.min_component_px == 0) & (table.component_confidence == 0)
                  & (table.threshold == 0.5)]
    assert table["patient_dice_mean"].max() == pytest.approx(1.0)
    assert plain["patient_dice_mean"].iloc[0] < 1.0  # without clean-up the specks cost Dice
    # simplest setting reaching the best score: no TTA, the size clean-up (the specks are as bright as
    # the tumor, so confidence cannot tell them apart and is left off); never the largest component
    assert best.tta is False and best.min_component_px == 64 and best.component_confidence == 0.0
    assert best.threshold == 0.5  # a lower threshold gains nothing on these saturated blobs: the model's own
    assert not table["largest_3d"].any()


class FixedProbs:
    """A segmenter stand-in whose probabilities are given (16 x 16 slices, box = the whole slice)."""

    def __init__(self, probs):
        self.p, self.settings = np.asarray(probs, np.float32), InferenceSettings(precision="float32")

    def prepare(self, images):
        return np.zeros((len(images), 16, 16, 1), np.float32), [(0, 16, 0, 16)] * len(images)

    def with_settings(self, **changes):
        return self

    def probs(self, X):
        return self.p


def test_a_lower_threshold_is_kept_only_where_it_raises_validation_dice():
    from brainseg.evaluation.evaluate import select_postprocessing

    probs = np.zeros((2, 16, 16), np.float32)
    probs[0, 4:8, 4:8] = 0.45  # a tumor the network is unsure of at its edges...
    probs[0, 5:7, 5:7] = 0.9   # ...and sure of at its core
    truths = [np.zeros((16, 16), bool), np.zeros((16, 16), bool)]
    truths[0][4:8, 4:8] = True
    manifest = pd.DataFrame({"patient": ["p", "q"], "patient_dir": ["p", "q"], "slice": [1, 1],
                             "image_path": ["a", "b"]})
    images = [np.zeros((16, 16, 3), np.uint8)] * 2
    best, table = select_postprocessing(FixedProbs(probs), manifest, images, truths)
    at = {t: table[(table.threshold == t) & ~table.tta & (table.min_component_px == 0)
                   & (table.component_confidence == 0)]["patient_dice_mean"].iloc[0] for t in (0.5, 0.4, 0.3)}
    assert at[0.5] == pytest.approx(0.4) and at[0.4] == pytest.approx(1.0) == at[0.3]  # 2x2 core of 4x4, all
    assert best.threshold == 0.4  # the first threshold reaching the best (0.3 only ties)
    sure = probs.copy()
    sure[0, 4:8, 4:8] = 0.9  # a network sure of the whole tumor: its own threshold stays
    best, _ = select_postprocessing(FixedProbs(sure), manifest, images, truths)
    assert best.threshold == 0.5
