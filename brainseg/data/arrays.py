"""Decode and prepare slices once, cached on disk as .npy keyed by data version and preprocessing."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data import imageio
from brainseg.data.preprocess import prepare_image, prepare_mask, slice_box
from brainseg.settings.config import PrepConfig


@dataclasses.dataclass
class Arrays:
    """Network-size arrays of one subset with the patient of each slice."""

    X: np.ndarray          # (N, S, S, C) float16
    Y: np.ndarray          # (N, S, S, 1) uint8 in {0, 1}
    patients: list[str]    # N patient ids


def _cache_key(manifest: pd.DataFrame, prep: PrepConfig, version: str) -> str:
    h = hashlib.md5()
    h.update(version.encode())
    h.update(prep.key().encode())
    h.update("\n".join(manifest["image_path"].astype(str)).encode())
    return f"{prep.key()}-{h.hexdigest()[:16]}"


def _prepare_row(args: tuple[str, str, PrepConfig]) -> tuple[np.ndarray, np.ndarray]:
    image_path, mask_path, prep = args
    image, mask = imageio.read_pair(Path(image_path), Path(mask_path))
    box = slice_box(image, prep)
    return prepare_image(image, prep, box).astype(np.float16), prepare_mask(mask, prep.size, box)


STALE_TMP_S = 15 * 60  # a temporary cache file this old was left by a killed run (writing one takes seconds)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _read_cache(xf: Path, yf: Path, n: int, prep: PrepConfig) -> tuple[tuple | None, str | None]:
    """(arrays, None) from a sound cache, (None, why) from a damaged one, (None, None) when absent."""
    if not (xf.is_file() and yf.is_file()):
        return None, None
    try:
        X, Y = np.load(xf, mmap_mode="r"), np.load(yf, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:  # truncated (mmap longer than the file), bad header
        return None, f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    want = (n, prep.size, prep.size, prep.n_channels)
    if X.shape != want or X.dtype != np.float16 or Y.shape != (*want[:3], 1) or Y.dtype != np.uint8:
        return None, f"holds {X.shape} {X.dtype} / {Y.shape} {Y.dtype}, not {want} float16 / uint8"
    return (X, Y), None


def remove_stale_temporaries(cache_dir: Path, say=_say, now: float | None = None) -> int:
    """Delete ``*.tmp.npy`` files older than :data:`STALE_TMP_S` (a killed run's half-written cache)."""
    now = time.time() if now is None else now
    stale = [p for p in Path(cache_dir).glob("*.tmp.npy") if now - p.stat().st_mtime > STALE_TMP_S]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        say(f"cache {cache_dir}: removed {len(stale)} temporary file(s) left by an interrupted run")
    return len(stale)


def load_arrays(manifest: pd.DataFrame, prep: PrepConfig, *, cache_dir: Path | None = None,
                version: str = "", workers: int = 4, say=_say) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs for the manifest's rows, in order.

    Returns ``X`` (N, S, S, C) float16 and ``Y`` (N, S, S, 1) uint8 in {0, 1}. With ``cache_dir``
    the arrays are stored as ``<key>.x.npy`` / ``<key>.y.npy`` (the key holds the data version and
    the preprocessing) and memory-mapped on later calls. A damaged cache (truncated, wrong shape)
    is rebuilt and stale temporary files are removed, each said in one line through ``say``.
    """
    if cache_dir is not None:
        key = _cache_key(manifest, prep, version)
        xf, yf = Path(cache_dir) / f"{key}.x.npy", Path(cache_dir) / f"{key}.y.npy"
        if Path(cache_dir).is_dir():
            remove_stale_temporaries(Path(cache_dir), say)
        cached, damaged = _read_cache(xf, yf, len(manifest), prep)
        if cached is not None:
            return cached
        if damaged:
            say(f"cache {xf.name[:-6]}: {damaged}; rebuilding it from the images")
    rows = [(r.image_path, r.mask_path, prep) for r in manifest.itertuples()]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pairs = list(pool.map(_prepare_row, rows))
    X = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, prep.size, prep.size, prep.n_channels), np.float16)
    Y = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, prep.size, prep.size, 1), np.uint8)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for f, a in ((xf, X), (yf, Y)):  # write then rename: a killed run leaves no half file, and
            # a unique name lets two workers build the same cache at once (same content)
            tmp = f.with_suffix(f".{uuid.uuid4().hex}.tmp.npy")
            np.save(tmp, a)
            tmp.replace(f)
    return X, Y


def load_full_masks(manifest: pd.DataFrame, workers: int = 4) -> list[np.ndarray]:
    """Ground-truth masks at their original size, (H, W) bool each, for evaluation."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: imageio.read_mask(Path(p)), manifest["mask_path"]))


def load_full_images(manifest: pd.DataFrame, workers: int = 4) -> list[np.ndarray]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: imageio.read_image(Path(p)), manifest["image_path"]))
