"""The only module that decodes slice files (TIFF via tifffile, PNG via Pillow).

Every reader checks what it got and raises :class:`BadImage` naming the file (or request row)
and the problem, so callers can report it instead of crashing.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

MAX_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs)
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadImage(ValueError):
    """A slice or mask that cannot be used. ``source`` names the file or row, ``problem`` says why."""

    def __init__(self, source: str, problem: str):
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


def _decode_tiff(data: bytes | Path, source: str) -> np.ndarray:
    try:
        with tifffile.TiffFile(data if isinstance(data, Path) else io.BytesIO(data)) as tif:
            if not tif.pages:
                raise BadImage(source, "TIFF has no image pages")
            page = tif.pages[0]
            series = tif.series[0] if tif.series else None
            if series is not None and len(series.pages) > 1:  # a stack; page 0 alone is not the image
                raise BadImage(source, f"TIFF holds a stack of {len(series.pages)} pages (shape "
                                       f"{'x'.join(map(str, series.shape))}); expected one 2-D slice")
            if int(np.prod(page.shape[:2])) > MAX_PIXELS:
                raise BadImage(source, f"image of {page.shape[1]}x{page.shape[0]} pixels is larger "
                                       f"than the {MAX_PIXELS:,}-pixel limit")
            return page.asarray()
    except BadImage:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt input
        raise BadImage(source, f"unreadable or truncated TIFF ({type(exc).__name__}: {exc})") from exc


def _decode_png(data: bytes, source: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadImage(source, f"image of {im.width}x{im.height} pixels is larger than the "
                                       f"{MAX_PIXELS:,}-pixel limit")
            im.load()
            arr = np.asarray(im)
            if im.mode == "P":
                arr = np.asarray(im.convert("RGB"))
            return arr
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(source, f"decompression bomb refused ({exc})") from exc
    except Exception as exc:
        raise BadImage(source, f"unreadable or truncated PNG ({type(exc).__name__}: {exc})") from exc


def decode_bytes(data: bytes, source: str) -> np.ndarray:
    """Decode TIFF or PNG bytes (as uploaded or sent to the server) without checking the content."""
    if not data:
        raise BadImage(source, "empty file")
    if data[:4] in TIFF_MAGIC:
        return _decode_tiff(data, source)
    if data[:8] == PNG_MAGIC:
        return _decode_png(data, source)
    raise BadImage(source, "not a TIFF or PNG image (unknown file signature)")


def read_file(path: Path) -> np.ndarray:
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(str(path), f"cannot read file ({exc.strerror})") from exc
    if size == 0:
        raise BadImage(str(path), "zero-byte file")
    if path.suffix.lower() in (".tif", ".tiff"):
        return _decode_tiff(path, str(path))
    return decode_bytes(path.read_bytes(), str(path))


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


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 slice from a file."""
    return check_image(read_file(path), str(path))


def read_mask(path: Path) -> np.ndarray:
    """(H, W) bool mask from a file."""
    return check_mask(read_file(path), str(path))


def read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
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
