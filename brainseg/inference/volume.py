"""A patient given as scanner volumes -> the slices the segmenter reads -> masks.

The one path of ``brainseg predict --flair`` (:mod:`brainseg.pipeline.predict_scan`), the served
model's ``volume`` column (:mod:`brainseg.serving.volume_request`) and the page's NIfTI uploads:

- :func:`patient_scans` puts a patient's sequences on the FLAIR's grid (refused naming both files
  when they are not, or resampled on request); :func:`load_scans` reads them first;
- :func:`check_channels` refuses a 3-channel model given FLAIR alone (:class:`ScanRefused`);
- :func:`segment_scans` turns the volumes into the (H, W, 3) uint8 slices the TIFF path sees
  (pre-contrast, FLAIR, post-contrast) and segments them as one patient, in slice order, so the
  stored 3-D post-processing sees the whole volume.

No model is loaded here: the caller passes its segmenting function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from brainseg.data.scan import BadScan, Scan
from brainseg.data.volumes import grid_difference, read_scan, resample_onto, rgb_slices, scan_name

RESAMPLE_HINT = "co-register them, or pass --resample to resample it onto the FLAIR's grid"


class ScanRefused(ValueError):
    """Inputs the model cannot take (a 3-channel model given FLAIR alone); nothing was written."""


@dataclasses.dataclass(frozen=True, eq=False)
class PatientScans:
    """One patient's volumes, every one on the FLAIR's grid (model orientation)."""

    name: str
    flair: Scan
    pre: Scan | None = None
    post: Scan | None = None
    resampled: tuple[str, ...] = ()  # which sequences were resampled onto the FLAIR's grid


def patient_scans(name: str, flair: Scan, pre: Scan | None = None, post: Scan | None = None, *,
                  resample: bool = False, hint: str = RESAMPLE_HINT) -> PatientScans:
    """The sequences of one patient on the FLAIR's grid: a pre or post on another grid is a
    :class:`BadScan` naming both (``hint`` says what to do) unless ``resample``, which resamples
    it onto the FLAIR's grid (:func:`brainseg.data.volumes.resample_onto`)."""
    others, resampled = {}, []
    for label, scan in (("pre", pre), ("post", post)):
        if scan is None:
            continue
        diff = grid_difference(scan.geometry, flair.geometry)
        if diff is not None:
            if not resample:
                raise BadScan(scan.source, f"not on the grid of {flair.source} ({diff}); {hint}")
            scan = resample_onto(scan, flair.geometry)
            resampled.append(label)
        others[label] = scan
    return PatientScans(name, flair, others.get("pre"), others.get("post"), tuple(resampled))


def load_scans(flair: Path, pre: Path | None = None, post: Path | None = None, *, resample: bool = False,
               name: str | None = None, limits=None) -> PatientScans:
    """Read the FLAIR and the optional pre/post volumes (``limits``: a
    :class:`brainseg.data.scan.VolumeLimits`, default from the environment) and put them on the
    FLAIR's grid (:func:`patient_scans`); :class:`BadScan` (one line naming the file or both files)."""
    scans = {label: read_scan(path, limits) if path is not None else None
             for label, path in (("flair", flair), ("pre", pre), ("post", post))}
    return patient_scans(name or scan_name(Path(flair)), scans["flair"], scans["pre"], scans["post"],
                         resample=resample)


def check_channels(channels: str, scans: PatientScans, model: str, given: tuple[str, str] = ("--pre", "--post")
                   ) -> None:
    """:class:`ScanRefused` when a 3-channel model (``train.channels: all``) lacks the pre or post
    volume (``given``: how the caller names them: options, or request columns)."""
    if channels != "flair" and (scans.pre is None or scans.post is None):
        missing = " and ".join(g for g, k in zip(given, ("pre", "post")) if getattr(scans, k) is None)
        raise ScanRefused(f"{model}: this model reads 3 channels (pre-contrast, FLAIR, post-contrast; "
                          f"train.channels: {channels}): give {missing} too, or use a FLAIR-only model "
                          "(train.channels: flair)")


def segment_scans(segment: Callable[[list[np.ndarray], list[str]], list[np.ndarray]], scans: PatientScans
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """(slices as (H, W, 3) uint8, (Z, H, W) bool masks): the volume as one patient, in slice order.

    ``segment(images, groups)`` returns the final (H, W) masks, e.g.
    ``lambda images, groups: segmenter.segment(images, groups=groups).masks``.
    """
    images = rgb_slices(scans.flair, scans.pre, scans.post)
    masks = segment(images, [scans.name] * len(images))
    return images, np.stack(masks).astype(bool)
