"""Decoders check declared sizes before decoding: pixel bombs, odd sample counts, stacks, planar RGB."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from brainseg.data import imageio
from helpers import tiff_bytes


def tiff_claiming(path: Path, width: int, height: int, samples: int = 3) -> bytes:
    """A small planar TIFF whose header is rewritten to declare ``samples x height x width``."""
    tifffile.imwrite(path, np.zeros((samples, 16, 16), np.uint8), photometric="rgb" if samples == 3 else
                     "minisblack", planarconfig="separate")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        tif.pages[0].tags["ImageLength"].overwrite(height)
    return path.read_bytes()


def png_claiming(width: int, height: int, color_type: int = 0) -> bytes:
    """A tiny PNG whose IHDR declares ``width x height`` (8-bit grey by default)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (imageio.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if any TIFF page or PNG is decoded."""
    from PIL import ImageFile

    def refuse(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# ------------------------------------------------------------------- refused from the header alone
@pytest.mark.parametrize("make, words", [
    (lambda tmp: tiff_claiming(tmp / "a.tif", 12000, 12000), ["12000x12000", "pixel limit", "before decoding"]),
    (lambda tmp: tiff_claiming(tmp / "b.tif", 20000, 20000), ["20000x20000", "pixel limit"]),
    (lambda tmp: tiff_bytes(np.zeros((8, 8, 400), np.uint8), photometric="minisblack", planarconfig="contig"),
     ["400 channels", "8x8x400"]),
    (lambda tmp: tiff_bytes(np.zeros((5, 8, 8), np.uint8), photometric="minisblack", planarconfig="separate"),
     ["5 channels"]),
    (lambda tmp: tiff_bytes(np.zeros((6, 16, 16), np.uint8)), ["stack of 6 pages"]),
    (lambda tmp: png_claiming(6000, 6000), ["6000x6000", "pixel limit"]),
    (lambda tmp: png_claiming(100_000, 100_000), ["decompression bomb"]),
])
def test_bombs_are_refused_before_any_pixel_is_decoded(tmp_path, no_pixel_decoding, make, words):
    data = make(tmp_path)
    for call in (imageio.probe_bytes, imageio.decode_bytes):
        with pytest.raises(imageio.BadImage) as err:
            call(data, "row 3")
        assert err.value.source == "row 3"
        for word in words:
            assert word in str(err.value), (word, str(err.value))


def test_a_planar_bomb_file_costs_no_memory(tmp_path):
    path = tmp_path / "bomb_1.tif"
    tiff_claiming(path, 20000, 20000)  # would be 1.2 GB decoded
    tracemalloc.start()
    try:
        with pytest.raises(imageio.BadImage, match="20000x20000"):
            imageio.read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak


def test_the_message_names_the_file(tmp_path):
    path = tmp_path / "TCGA_CS_S000_20000101_3.tif"
    tiff_claiming(path, 9000, 9000)
    with pytest.raises(imageio.BadImage) as err:
        imageio.read_image(path)
    assert err.value.source == str(path) and str(err.value).startswith(f"{path}: image of 9000x9000")


# ----------------------------------------------------------------------------------- limits are settings
def test_pixel_limit_per_call_and_from_the_environment(monkeypatch):
    data = tiff_bytes(np.zeros((100, 100, 3), np.uint8))
    assert imageio.decode_bytes(data, "r").shape == (100, 100, 3)
    with pytest.raises(imageio.BadImage, match="100x100 pixels is larger than the 5,000-pixel limit"):
        imageio.decode_bytes(data, "r", max_pixels=5000)
    monkeypatch.setenv("BRAINSEG_MAX_PIXELS", "9999")
    assert imageio.pixel_limit() == 9999
    with pytest.raises(imageio.BadImage, match="9,999-pixel limit"):
        imageio.probe_bytes(data, "r")
    assert imageio.decode_bytes(data, "r", max_pixels=10_000).shape == (100, 100, 3)


def test_byte_limit_from_the_environment(monkeypatch):
    data = tiff_bytes(np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setenv("BRAINSEG_MAX_IMAGE_BYTES", "1000")
    with pytest.raises(imageio.BadImage, match=f"{len(data):,} bytes is over the 1,000-byte limit"):
        imageio.decode_bytes(data, "r")


# --------------------------------------------------------------------------------- what is accepted
def test_planar_separate_rgb_is_accepted_as_hwc(tmp_path):
    rgb = np.arange(3 * 20 * 30, dtype=np.uint8).reshape(3, 20, 30)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", planarconfig="separate")
    image = imageio.read_image(path)
    assert image.shape == (20, 30, 3) and image.flags["C_CONTIGUOUS"]
    assert np.array_equal(image, np.moveaxis(rgb, 0, -1))
    info = imageio.probe_bytes(path.read_bytes(), "p")
    assert (info.width, info.height, info.channels, info.planar) == (30, 20, 3, True)


@pytest.mark.parametrize("arr, kind, expected", [
    (np.zeros((20, 30), np.uint8), "tiff", (30, 20, 1, 1)),
    (np.zeros((20, 30, 3), np.uint8), "tiff", (30, 20, 3, 1)),
    (np.zeros((20, 30), np.uint16), "tiff", (30, 20, 1, 2)),
    (np.zeros((20, 30, 3), np.uint8), "png", (30, 20, 3, 1)),
    (np.zeros((20, 30), np.uint8), "png", (30, 20, 1, 1)),
])
def test_probe_reports_the_declared_size(arr, kind, expected):
    data = tiff_bytes(arr) if kind == "tiff" else imageio.encode_png(arr)
    info = imageio.probe_bytes(data, "x")
    assert info.format == kind
    assert (info.width, info.height, info.channels, info.itemsize) == expected
    assert info.pixels == 600


@pytest.mark.parametrize("data, words", [
    (b"", ["empty file"]),
    (b"%PDF-1.4", ["not a TIFF or PNG"]),
    (b"II*\x00" + b"\xff" * 100, ["TIFF has no image pages"]),
    (tiff_bytes(np.zeros((64, 64, 3), np.uint8))[:300], ["unreadable or truncated TIFF"]),
    (png_claiming(16, 16)[:30], ["unreadable or truncated PNG"]),
])
def test_garbage_is_a_bad_image_naming_the_source(data, words):
    with pytest.raises(imageio.BadImage) as err:
        imageio.decode_bytes(data, "upload.tif")
    for word in ["upload.tif", *words]:
        assert word in str(err.value)


def test_read_pair_names_a_missing_mask(tmp_path):
    image = tmp_path / "TCGA_CS_S000_20000101_1.tif"
    imageio.write_tiff(image, np.zeros((8, 8, 3), np.uint8))
    mask = tmp_path / "TCGA_CS_S000_20000101_1_mask.tif"
    with pytest.raises(imageio.BadImage) as err:
        imageio.read_pair(image, mask)
    assert err.value.source == str(mask) and "mask file is missing" in err.value.problem


# ------------------------------------------------------------- compressed TIFFs (tifffile + imagecodecs)
def smooth_slice(size: int = 64) -> np.ndarray:
    """(size, size, 3) uint8 gradients: compresses, and survives JPEG within a few grey levels."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 2, y * 3, (x + y)], axis=-1).astype(np.uint8)


# (tifffile's compression name, the Compression tag it writes, exact: lossless)
COMPRESSIONS = [("lzw", 5, True), ("zlib", 8, True), ("jpeg", 7, False), ("packbits", 32773, True),
                ("none", 1, True)]


@pytest.mark.parametrize("compression, tag, exact", COMPRESSIONS, ids=[c[0] for c in COMPRESSIONS])
def test_a_compressed_tiff_decodes_where_serving_and_predict_read_slices(tmp_path, compression, tag, exact):
    """LZW (the most common TIFF compression in the wild), Deflate and JPEG need the imagecodecs
    package: without it tifffile cannot decode them and every such slice was refused as unreadable."""
    import base64

    import pandas as pd

    from brainseg.serving.limits import RequestLimits
    from brainseg.serving.request import decode_request

    rgb = smooth_slice()
    kwargs = {} if compression == "none" else {"compression": compression}
    data = tiff_bytes(rgb, photometric="rgb", **kwargs)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert int(tif.pages.first.compression) == tag
    path = tmp_path / "TCGA_XX_0000_20000101_1.tif"
    path.write_bytes(data)
    request = pd.DataFrame({"image": [base64.b64encode(data).decode("ascii")]})
    served = decode_request(request, "all", RequestLimits())[0]  # the served model's path
    read = imageio.read_image(path)  # brainseg predict's, evaluate's and the cache's path
    assert served.shape == read.shape == (64, 64, 3) and served.dtype == read.dtype == np.uint8
    assert np.array_equal(served, read)
    diff = np.abs(read.astype(int) - rgb.astype(int)).max()
    assert diff == 0 if exact else diff <= 8, f"{compression}: off by {diff} grey levels"
