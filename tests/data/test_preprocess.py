"""Slice preparation: channel choice, normalisation, mask resizing, back to the original size."""

import numpy as np
import pytest

from brainseg.data.preprocess import prepare_image, prepare_mask, probability_to_mask, sharpen
from brainseg.settings.config import PrepConfig


def constant_channels(size: int, values=(10, 20, 30)) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = values
    return img


def head_image(size: int = 32) -> np.ndarray:
    """A disc of varied intensities (the head) on a zero background, different in each channel."""
    yy, xx = np.mgrid[0:size, 0:size]
    head = np.hypot(yy - size / 2, xx - size / 2) < size * 0.4
    img = np.zeros((size, size, 3), np.uint8)
    for c in range(3):
        img[:, :, c] = np.where(head, 40 + (yy * (c + 1) + xx * 3) % 150, 0)
    return img


@pytest.mark.parametrize("channels, expected", [
    ("flair", [20 / 255]),                      # channel 1 only (FLAIR)
    ("all", [10 / 255, 20 / 255, 30 / 255]),    # pre-contrast, FLAIR, post-contrast in order
])
@pytest.mark.parametrize("in_size", [32, 64])  # with and without resizing
def test_channels(channels, expected, in_size):
    prep = PrepConfig(channels=channels, size=32, normalize="unit")
    x = prepare_image(constant_channels(in_size), prep)
    assert x.shape == (32, 32, len(expected)) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), rtol=1e-6)


@pytest.mark.parametrize("channels", ["flair", "all"])
def test_zscore_over_head_background_zero(channels):
    img = head_image(32)
    x = prepare_image(img, PrepConfig(channels=channels, size=32, normalize="zscore"))
    source = img[:, :, 1:2] if channels == "flair" else img
    for c in range(x.shape[2]):
        head = source[:, :, c] > 0
        assert 100 < head.sum() < 32 * 32
        assert abs(float(x[:, :, c][head].mean())) < 1e-4
        assert float(x[:, :, c][head].std()) == pytest.approx(1.0, abs=1e-3)
        assert (x[:, :, c][~head] == 0).all()


def test_zscore_of_an_empty_slice_is_all_zero():
    x = prepare_image(np.zeros((32, 32, 3), np.uint8), PrepConfig(size=32, normalize="zscore"))
    assert x.shape == (32, 32, 1) and not x.any()


def test_unit_in_zero_one():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img[0, 0], img[0, 1] = 0, 255
    x = prepare_image(img, PrepConfig(channels="all", size=64, normalize="unit"))
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x, img / 255.0, rtol=1e-6)


def test_resize_gives_the_network_size():
    x = prepare_image(head_image(96), PrepConfig(channels="all", size=64, normalize="zscore"))
    assert x.shape == (64, 64, 3) and np.isfinite(x).all()


@pytest.mark.parametrize("shape", [(64, 64), (256, 256), (20, 20)])
def test_mask_resized_nearest_stays_binary(shape):
    mask = np.zeros(shape, bool)
    mask[shape[0] // 4: shape[0] // 2, shape[1] // 3: shape[1] - 2] = True
    mask[-1, -1] = True  # an isolated pixel: nearest-neighbour keeps 0/1, never a fraction
    m = prepare_mask(mask, 32)
    assert m.shape == (32, 32, 1) and m.dtype == np.uint8
    assert set(np.unique(m).tolist()) == {0, 1}
    assert abs(m.mean() - mask.mean()) < 0.05


def test_mask_at_size_unchanged():
    mask = np.eye(32, dtype=bool)
    np.testing.assert_array_equal(prepare_mask(mask, 32)[:, :, 0], mask.astype(np.uint8))


@pytest.mark.parametrize("prob_shape", [(32, 32), (32, 32, 1)])
@pytest.mark.parametrize("shape", [(256, 256), (50, 70), (32, 32)])
def test_probability_to_mask_returns_original_size(prob_shape, shape):
    prob = np.zeros(prob_shape, np.float32)
    prob[:, :16] = 0.9  # left half
    m = probability_to_mask(prob, shape, threshold=0.5)
    assert m.shape == shape and m.dtype == bool
    assert m[:, : shape[1] // 2 - 2].all() and not m[:, shape[1] // 2 + 2:].any()


@pytest.mark.parametrize("threshold, expected", [(0.5, True), (0.7, False), (0.69, True)])
def test_probability_threshold(threshold, expected):
    m = probability_to_mask(np.full((32, 32), 0.7, np.float32), (64, 64), threshold)
    assert (m == expected).all()


@pytest.mark.parametrize("shape", [(32, 32, 1), (32, 32, 3), (40, 24, 3)])
def test_sharpen_keeps_dtype_and_shape(shape):
    img = head_image(48)[: shape[0], : shape[1], : shape[2]].copy()
    out = sharpen(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out, img)


def test_sharpen_raises_edge_contrast():
    img = np.full((16, 16, 1), 100, np.uint8)
    img[:, 8:] = 140
    out = sharpen(img).astype(int)
    assert out[5, 7, 0] < out[5, 3, 0]  # darker on the dark side of the edge
    assert out[5, 8, 0] > out[5, 12, 0]  # brighter on the bright side


def test_sharpen_option_changes_the_input():
    img = head_image(32)
    plain = prepare_image(img, PrepConfig(size=32, normalize="unit"))
    sharp = prepare_image(img, PrepConfig(size=32, normalize="unit", sharpen=True))
    assert plain.shape == sharp.shape == (32, 32, 1)
    assert not np.allclose(plain, sharp)
