"""The only module that decodes slice files (TIFF via tifffile, PNG via Pillow).

Every reader checks what it got and raises :class:`BadImage` naming the file (or request row)
and the problem, so callers can report it instead of crashing.

Sizes are checked from the file's header **before** any pixel is decoded (:func:`probe_bytes`):
width x height against the pixel limit, samples (channels) per pixel, bits per sample, pages and
the decoded size. The limits are module settings with safe defaults, overridable per call
(``max_pixels=...``) or by the environment:

- ``BRAINSEG_MAX_PIXELS`` (default :data:`MAX_PIXELS`, 4096 x 4096): width x height per image;
- ``BRAINSEG_MAX_IMAGE_BYTES`` (default :data:`MAX_FILE_BYTES`, 256 MB): encoded size of one file.

A planar-separate RGB TIFF (stored as 3 x H x W) is accepted and returned as (H, W, 3).
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

MAX_PIXELS = 4096 * 4096  # width x height; larger images are refused before decoding (bombs)
MAX_FILE_BYTES = 256 * 1024 * 1024  # encoded bytes of one image file or request cell
MAX_CHANNELS = 4  # more samples per pixel are refused before decoding
BYTES_PER_PIXEL_LIMIT = 8  # decoded bytes per pixel (all samples) allowed: 4 channels x 16 bit
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadImage(ValueError):
    """A slice or mask that cannot be used. ``source`` names the file or row, ``problem`` says why."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What a file's header declares, read without decoding pixels."""

    format: str        # "tiff" or "png"
    width: int
    height: int
    channels: int      # samples per pixel
    itemsize: int      # bytes per sample (1 for uint8, 2 for uint16)
    planar: bool = False  # TIFF planar-separate (3, H, W) storage

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.channels * self.itemsize


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(float(raw)) if raw else int(default)
    except ValueError:
        return int(default)


def pixel_limit() -> int:
    """The width x height limit in force: ``$BRAINSEG_MAX_PIXELS`` or :data:`MAX_PIXELS`."""
    return _env_int("BRAINSEG_MAX_PIXELS", MAX_PIXELS)


def byte_limit() -> int:
    """The encoded-size limit in force: ``$BRAINSEG_MAX_IMAGE_BYTES`` or :data:`MAX_FILE_BYTES`."""
    return _env_int("BRAINSEG_MAX_IMAGE_BYTES", MAX_FILE_BYTES)


def check_declared(info: ImageInfo, source: str, max_pixels: int | None = None) -> ImageInfo:
    """Refuse an image whose declared size is over the limits (nothing is decoded)."""
    limit = pixel_limit() if max_pixels is None else int(max_pixels)
    if info.width < 1 or info.height < 1:
        raise BadImage(source, f"image declares {info.width}x{info.height} pixels (empty)")
    if info.pixels > limit:
        raise BadImage(source, f"image of {info.width}x{info.height} pixels is larger than the "
                               f"{limit:,}-pixel limit (refused before decoding)")
    if info.channels > MAX_CHANNELS or info.channels < 1:
        raise BadImage(source, f"image shape is {info.height}x{info.width}x{info.channels} ({info.channels} "
                               f"channels, i.e. samples per pixel); expected 1 (grey) or 3 (RGB) channels")
    if info.decoded_bytes > limit * BYTES_PER_PIXEL_LIMIT:
        raise BadImage(source, f"image would decode to {info.decoded_bytes / 1e6:,.0f} MB ({info.width}x"
                               f"{info.height}, {info.channels} samples of {8 * info.itemsize} bits), over "
                               f"the {limit * BYTES_PER_PIXEL_LIMIT / 1e6:,.0f} MB limit")
    return info


def _tiff_info(tif: tifffile.TiffFile, source: str) -> ImageInfo:
    if not tif.pages:
        raise BadImage(source, "TIFF has no image pages")
    page = tif.pages.first
    n_pages = len(tif.pages)  # reads only the chain of page headers
    if n_pages > 1:
        extra = [tif.pages[i] for i in range(1, min(n_pages, 64))]
        if not all(getattr(p, "is_reduced", False) for p in extra) or n_pages > 64:
            raise BadImage(source, f"TIFF holds a stack of {n_pages} pages; expected one 2-D slice")
    if getattr(page, "imagedepth", 1) > 1:
        raise BadImage(source, f"TIFF is a volume of depth {page.imagedepth}; expected one 2-D slice")
    itemsize = max(1, (int(page.bitspersample) + 7) // 8)
    return ImageInfo("tiff", int(page.imagewidth), int(page.imagelength), int(page.samplesperpixel),
                     itemsize, planar=int(page.planarconfig) == 2 and int(page.samplesperpixel) > 1)


def _decode_tiff(data: bytes | Path, source: str, max_pixels: int | None) -> np.ndarray:
    try:
        with tifffile.TiffFile(data if isinstance(data, Path) else io.BytesIO(data)) as tif:
            info = check_declared(_tiff_info(tif, source), source, max_pixels)
            arr = tif.pages.first.asarray(maxworkers=1)
    except BadImage:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt input
        raise BadImage(source, f"unreadable or truncated TIFF ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from exc
    if info.planar and arr.ndim == 3 and arr.shape[0] == info.channels:
        arr = np.ascontiguousarray(np.moveaxis(arr, 0, -1))  # (S, H, W) -> (H, W, S)
    return arr


def _png_info(im: Image.Image) -> ImageInfo:
    bands = len(im.getbands())
    itemsize = 2 if im.mode.startswith("I;16") or im.mode in ("I", "F") else 1
    return ImageInfo("png", int(im.width), int(im.height), bands, itemsize)


def _open_png(data: bytes, source: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(source, f"decompression bomb refused ({exc})") from exc
    except Exception as exc:
        raise BadImage(source, f"unreadable or truncated PNG ({type(exc).__name__}: {exc})") from exc


def _decode_png(data: bytes, source: str, max_pixels: int | None) -> np.ndarray:
    im = _open_png(data, source)
    try:
        with im:
            check_declared(_png_info(im), source, max_pixels)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
            if im.mode == "P":
                return np.asarray(im.convert("RGB"))
            return np.asarray(im)
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(source, f"decompression bomb refused ({exc})") from exc
    except Exception as exc:
        raise BadImage(source, f"unreadable or truncated PNG ({type(exc).__name__}: {exc})") from exc


def _check_bytes(data: bytes, source: str) -> str:
    if not data:
        raise BadImage(source, "empty file")
    if len(data) > byte_limit():
        raise BadImage(source, f"{len(data):,} bytes is over the {byte_limit():,}-byte limit for one image")
    if data[:4] in TIFF_MAGIC:
        return "tiff"
    if data[:8] == PNG_MAGIC:
        return "png"
    raise BadImage(source, "not a TIFF or PNG image (unknown file signature)")


def probe_bytes(data: bytes, source: str, max_pixels: int | None = None) -> ImageInfo:
    """Read the header of TIFF/PNG bytes and check its declared sizes; decodes no pixels.

    Cheap (microseconds to a few ms): the server can probe every row of a request and sum
    ``info.pixels`` before decoding any. Raises :class:`BadImage` naming ``source``.
    """
    kind = _check_bytes(data, source)
    if kind == "png":
        with _open_png(data, source) as im:
            return check_declared(_png_info(im), source, max_pixels)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return check_declared(_tiff_info(tif, source), source, max_pixels)
    except BadImage:
        raise
    except Exception as exc:
        raise BadImage(source, f"unreadable or truncated TIFF ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from exc


def decode_bytes(data: bytes, source: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode TIFF or PNG bytes (as uploaded or sent to the server) after checking the header.

    Returns the array as stored ((H, W), (H, W, C); planar RGB as (H, W, 3)); content (dtype,
    channels) is checked by :func:`check_image` / :func:`check_mask`.
    """
    kind = _check_bytes(data, source)
    if kind == "tiff":
        return _decode_tiff(data, source, max_pixels)
    return _decode_png(data, source, max_pixels)


def read_file(path: Path, max_pixels: int | None = None) -> np.ndarray:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(str(path), f"cannot read file ({exc.strerror})") from exc
    if size == 0:
        raise BadImage(str(path), "zero-byte file")
    if size > byte_limit():
        raise BadImage(str(path), f"{size:,} bytes is over the {byte_limit():,}-byte limit for one image")
    if path.suffix.lower() in (".tif", ".tiff"):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head in TIFF_MAGIC:
            return _decode_tiff(path, str(path), max_pixels)
    return decode_bytes(path.read_bytes(), str(path), max_pixels)


def check_image(arr: np.ndarray, source: str) -> np.ndarray:
    """Return the slice as (H, W, 3) uint8. A 2-D image is taken as FLAIR and repeated.

    Refuses other dtypes (16-bit, float) and channel counts other than 1 or 3.
    """
    if arr.dtype != np.uint8:
        raise BadImage(source, f"image dtype is {arr.dtype}, expected uint8 (8-bit)")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    shape = "x".join(map(str, arr.shape))
    raise BadImage(source, f"image shape is {shape}, expected HxW or HxWx3 (got "
                           f"{arr.shape[2] if arr.ndim == 3 else arr.ndim} channels/dims)")


def is_one_channel(arr: np.ndarray) -> bool:
    """A grey slice, (H, W) or (H, W, 1): :func:`check_image` takes it as FLAIR."""
    return arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)


def check_model_channels(arr: np.ndarray, source: str, channels: str) -> None:
    """:class:`BadImage` if ``arr`` has one channel but the model reads all three (``channels``
    is not ``"flair"``, see ``train.channels``): a repeated FLAIR is not its input."""
    if is_one_channel(arr) and channels != "flair":
        raise BadImage(source, "1-channel image, but this model needs 3 channels "
                               "(pre-contrast, FLAIR, post-contrast)")


def check_mask(arr: np.ndarray, source: str) -> np.ndarray:
    """Return the mask as (H, W) bool. Accepts uint8 {0, 255} or {0, 1}."""
    if arr.dtype != np.uint8:
        raise BadImage(source, f"mask dtype is {arr.dtype}, expected uint8")
    if arr.ndim == 3 and arr.shape[2] in (1, 3) and (arr == arr[:, :, :1]).all():
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise BadImage(source, f"mask shape is {'x'.join(map(str, arr.shape))}, expected HxW")
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = ", ".join(map(str, values[:6])) + (", ..." if len(values) > 6 else "")
        raise BadImage(source, f"mask values are {{{shown}}}, expected only 0/255 (or 0/1)")
    return arr > 0


def read_image(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 slice from a file."""
    return check_image(read_file(path, max_pixels), str(path))


def read_mask(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """(H, W) bool mask from a file."""
    return check_mask(read_file(path, max_pixels), str(path))


def read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """((H, W, 3) uint8 image, (H, W) bool mask); a mask of another size is refused by name."""
    if not Path(mask_path).exists():
        raise BadImage(str(mask_path), f"mask file is missing (image {Path(image_path).name} has no mask)")
    image = read_image(image_path)
    mask = read_mask(mask_path)
    if image.shape[:2] != mask.shape:
        raise BadImage(str(mask_path), f"mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                       f"is {image.shape[1]}x{image.shape[0]}")
    return image, mask


def write_tiff(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr)


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
