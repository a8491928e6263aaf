"""The page's inputs: uploaded files (slices, masks, data.csv, zips) and the bundled examples.

Nothing raises on a bad file: each refused file becomes one line in ``Upload.problems``.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Iterable
from pathlib import PurePosixPath

import numpy as np

from brainseg.data import imageio
from brainseg.data.synth import synth_patient
from brainseg.pipeline.slices import IMAGE_SUFFIXES, identify

UPLOAD_TYPES = ["tif", "tiff", "png", "zip", "csv"]  # what the file picker offers
MIN_SIDE = 32                   # smaller images are refused: the network needs at least 32x32
MAX_ZIP_MEMBERS = 5000          # a patient folder has at most ~200 files (slices and masks)
MAX_ZIP_BYTES = 1 << 30         # uncompressed total; refuses zip bombs before reading


@dataclasses.dataclass
class SliceInput:
    """One slice ready to segment."""

    name: str                       # file name as uploaded, or "<archive>.zip/<member path>"
    patient: str
    patient_dir: str
    slice: int
    image: np.ndarray               # (H, W, 3) uint8 (a 1-channel file is repeated)
    gray: bool = False              # the file had one channel (taken as FLAIR)
    truth: np.ndarray | None = None  # (H, W) bool, from a paired ``*_mask`` file

    def model_input(self) -> np.ndarray:
        """What a backend gets: (H, W, 3), or (H, W) for a 1-channel file (the model decides)."""
        return self.image[:, :, 0] if self.gray else self.image


@dataclasses.dataclass
class Upload:
    slices: list[SliceInput]
    problems: list[str]             # one line per refused file: "<name>: <problem>"
    clinical: bytes | None = None   # a data.csv, uploaded or found in a zip
    clinical_name: str = ""



def decode_slice(name: str, data: bytes) -> tuple[np.ndarray, bool]:
    """Bytes -> ((H, W, 3) uint8, was 1-channel), or :class:`imageio.BadImage` saying why."""
    arr = imageio.decode_bytes(data, name)
    gray = imageio.is_one_channel(arr)
    image = imageio.check_image(arr, name)
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise imageio.BadImage(name, f"image is {w}x{h} pixels; slices must be at least "
                                     f"{MIN_SIDE}x{MIN_SIDE}")
    return image, gray


def _zip_members(name: str, data: bytes) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Files inside an uploaded zip as ("<zip>/<member>", bytes), and problems."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        return [], [f"{name}: not a readable zip archive ({exc})"]
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and not _is_junk(i.filename)]
        if not infos:
            return [], [f"{name}: the zip archive is empty"]
        if len(infos) > MAX_ZIP_MEMBERS:
            return [], [f"{name}: {len(infos)} files in the archive; at most {MAX_ZIP_MEMBERS}"]
        total = sum(i.file_size for i in infos)
        if total > MAX_ZIP_BYTES:
            mib = f"{total / 2**20:.0f} MiB; at most {MAX_ZIP_BYTES / 2**20:.0f} MiB"
            return [], [f"{name}: unpacks to {mib}"]
        members, problems = [], []
        for info in infos:
            try:
                members.append((f"{name}/{info.filename}", zf.read(info)))
            except Exception as exc:  # noqa: BLE001 - zipfile raises many types for damaged members
                problems.append(f"{name}/{info.filename}: cannot be unpacked ({exc})")
        return members, problems


def _is_junk(member: str) -> bool:
    """macOS resource forks and hidden files that zip tools add."""
    return member.startswith("__MACOSX/") or PurePosixPath(member).name.startswith(".")


def _is_mask_name(name: str) -> bool:
    return PurePosixPath(name).stem.lower().endswith("_mask")


def _pair_key(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    stem = path.stem[:-5] if _is_mask_name(name) else path.stem
    return str(path.parent), stem


def parse_uploads(files: Iterable[tuple[str, bytes]]) -> Upload:
    """Uploaded (name, bytes) -> slices with truth masks, data.csv, and a line per refused file.

    Accepts ``.tif``/``.tiff``/``.png`` slices, their ``*_mask`` files (paired by folder and
    stem), ``data.csv``, and ``.zip`` archives of any of these (a patient folder or several).
    Nothing raises: every refused file becomes one line in ``problems``.
    """
    entries, problems = [], []
    for name, data in files:
        if name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
            members, bad = _zip_members(name, data)
            problems += bad
            entries += [(n, d, True) for n, d in members]
            if members and not any(_is_image_name(n) and not _is_mask_name(n) for n, _ in members):
                problems.append(f"{name}: no .tif/.png slices in the archive")
        else:
            entries.append((name, data, False))
    upload = Upload([], problems)
    images, masks = {}, {}
    for name, data, from_zip in entries:
        if name.lower().endswith(".csv"):
            if upload.clinical is None:
                upload.clinical, upload.clinical_name = data, name
            continue
        if from_zip and not _is_image_name(name):
            continue  # notes, thumbnails and the like inside an archive
        (masks if _is_mask_name(name) else images)[_pair_key(name)] = (name, data)
    for key, (name, data) in images.items():
        try:
            image, gray = decode_slice(name, data)
        except imageio.BadImage as exc:
            upload.problems.append(str(exc))
            continue
        patient, patient_dir, number = identify(name)
        upload.slices.append(SliceInput(name, patient, patient_dir, number, image, gray,
                                        _truth_for(masks.pop(key, None), image, upload.problems)))
    upload.problems += [f"{name}: mask without its slice ({key[1]}.tif or .png)"
                        for key, (name, _) in masks.items()]
    upload.slices.sort(key=lambda s: (s.patient, s.slice, s.name))
    return upload


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _truth_for(mask_file: tuple[str, bytes] | None, image: np.ndarray, problems: list[str]):
    if mask_file is None:
        return None
    name, data = mask_file
    try:
        mask = imageio.check_mask(imageio.decode_bytes(data, name), name)
    except imageio.BadImage as exc:
        problems.append(f"{exc} (slice kept without truth)")
        return None
    if mask.shape != image.shape[:2]:
        problems.append(f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} but its slice is "
                        f"{image.shape[1]}x{image.shape[0]} (slice kept without truth)")
        return None
    return mask


# ------------------------------------------------------------------------------------ examples
EXAMPLE_SIZE = 128
EXAMPLES = {  # title -> (seed, slices); generated on the fly by the synthetic-data generator
    "Synthetic patient A (16 slices, truth masks)": (11, 16),
    "Synthetic patient B (16 slices, truth masks)": (12, 16),
    "Synthetic single slice (truth mask)": (13, 1),
}


def example_upload(title: str) -> Upload:
    """A bundled synthetic example as if uploaded: slices with truth masks, no data.csv."""
    seed, n = EXAMPLES[title]
    images, masks = synth_patient(np.random.default_rng(seed), max(n, 8), EXAMPLE_SIZE)
    keep = range(len(images)) if n > 1 else [int(np.argmax((masks > 0).sum(axis=(1, 2))))]
    patient = f"SYNTH_{'ABCDEFGH'[list(EXAMPLES).index(title)]}"
    slices = [SliceInput(f"{patient}/{patient}_{k + 1}.tif", patient, patient, k + 1, images[k],
                         truth=masks[k] > 0) for k in keep]
    return Upload(slices, [])


