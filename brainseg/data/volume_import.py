"""``brainseg data import SRC`` for patients given as volumes: NIfTI files -> the Kaggle layout.

Sources (:func:`find_patients`):

- **one folder per patient** (BraTS and most research exports): every folder under ``SRC`` holding
  one file that matches a FLAIR pattern is a patient, named after the folder; in it, the optional
  pre-contrast and post-contrast T1 and the label are found by their own patterns
  (:data:`DEFAULT_PATTERNS`: BraTS 2020 ``*_flair``, ``*_t1``, ``*_t1ce``, ``*_seg``; BraTS 2023
  ``*-t2f``, ``*-t1n``, ``*-t1c``, ``*-seg``; nnU-Net channel files ``*_0000`` / ``*_0001`` /
  ``*_0002``; ``.nii`` or ``.nii.gz``, any case). Patterns are fnmatch patterns, replaced by
  ``--flair/--pre/--post/--label``.
- **nnU-Net v2's raw layout** (``imagesTr/<case>_XXXX.nii.gz`` + ``labelsTr/<case>.nii.gz``): the
  channels are taken from ``dataset.json``'s ``channel_names`` (a name with FLAIR / T2F is the
  FLAIR, T1 / T1N the pre-contrast, T1CE / T1C / T1GD the post-contrast), else ``_0000`` FLAIR,
  ``_0001`` pre, ``_0002`` post (brainseg's own export).

Each patient is read by :func:`brainseg.data.volumes.read_scan` (the reader of ``brainseg predict
--flair``: orientation by the affine, the same checks), its pre/post and label must lie on the
FLAIR's grid (``resample`` resamples the pre/post, never the label), and it is written as the
Kaggle layout: axial slices, most inferior first, ``<folder>_<n>.tif`` (256 x 256 x 3 uint8: pre,
FLAIR, post, intensities by :func:`brainseg.data.volumes.to_uint8`; a missing sequence is the
FLAIR, as a grey slice) and ``<folder>_<n>_mask.tif`` (0/255). Leading and trailing slices with
no FLAIR signal and no label are left out. A plane that is not 256 x 256 is padded with zeros to a
square (centred), then resized to 256 x 256: bilinear for the images, nearest-neighbour for the
masks; the spacing is scaled with it. The label becomes the binary abnormality by a declared rule
(:class:`LabelRule`: ``any`` = label > 0, BraTS' whole tumour; or a list of label values).

Each patient folder gets :data:`~brainseg.data.manifest.SIDECAR` (JSON): the slices' spacing in mm
``[z, y, x]`` (which ``brainseg data manifest`` puts in the manifest's ``spacing_mm``), the source
files, the resize, the label rule and the label values found. The layout needs
``TCGA_<site>_<id>_<date>`` folder names: a source folder already named so keeps its name; any
other patient is named ``TCGA_<site>_<nnnn>_00000000`` (``site`` default ``IM``, imported; the
date unknown), its source name kept in the sidecar.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from brainseg.data import imageio
from brainseg.data.clinical import ID, read_clinical
from brainseg.data.layout import FOLDER_RE, parse_folder
from brainseg.data.manifest import SIDECAR
from brainseg.data.nifti import is_nifti, nifti_stem
from brainseg.data.scan import BadScan, VolumeLimits
from brainseg.data.volumes import grid_difference, read_scan, resample_onto, rgb_slices

SIZE = 256  # the Kaggle slices' plane
SEQUENCES = ("flair", "pre", "post", "label")
DEFAULT_PATTERNS = {
    "flair": ("*_flair.nii*", "*-t2f.nii*", "*_t2f.nii*", "*_0000.nii*"),
    "pre": ("*_t1.nii*", "*-t1n.nii*", "*_t1n.nii*", "*_0001.nii*"),
    "post": ("*_t1ce.nii*", "*-t1c.nii*", "*_t1c.nii*", "*_t1gd.nii*", "*_0002.nii*"),
    "label": ("*_seg.nii*", "*-seg.nii*", "*_label.nii*", "*_mask.nii*"),
}
NNUNET_CHANNELS = {"flair": r"flair|t2f", "post": r"t1ce|t1c\b|t1gd|gd|post", "pre": r"^t1$|t1n|t1_pre|t1w|pre"}


class ImportProblem(ValueError):
    """A patient (or the source) that cannot be imported; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """How a label volume becomes the binary abnormality: ``any`` (label > 0) or ``values`` (label in them)."""

    values: tuple[int, ...] = ()  # empty: any non-zero label

    @classmethod
    def parse(cls, text: str) -> LabelRule:
        """``"any"`` or ``"1,2,4"`` -> a rule; ValueError naming the option otherwise.

        >>> LabelRule.parse("any").describe(), LabelRule.parse("1, 4").describe()
        ('any: label > 0 (BraTS whole tumour)', 'values: label in {1, 4}')
        """
        text = str(text).strip().lower()
        if text in ("any", "nonzero", "wt"):
            return cls()
        try:
            values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
        except ValueError:
            values = ()
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"--label-rule {text!r}: give 'any' (label > 0) or label values > 0, e.g. 1,2,4")
        return cls(values)

    def describe(self) -> str:
        if not self.values:
            return "any: label > 0 (BraTS whole tumour)"
        return "values: label in {" + ", ".join(map(str, self.values)) + "}"

    def apply(self, label: np.ndarray) -> np.ndarray:
        return label > 0 if not self.values else np.isin(label, self.values)


@dataclasses.dataclass(frozen=True)
class Options:
    patterns: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_PATTERNS))
    label_rule: LabelRule = LabelRule()
    resample: bool = False
    site: str = "IM"


@dataclasses.dataclass(frozen=True)
class Source:
    """One patient's files: ``name`` as the source calls it; ``files`` sequence -> path (flair, label required)."""

    name: str
    files: dict


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns) and is_nifti(Path(name))


def _one(folder: Path, sequence: str, patterns, required: bool) -> Path | None:
    found = sorted(p for p in folder.iterdir() if p.is_file() and _matches(p.name, patterns))
    if len(found) > 1:
        raise ImportProblem(f"{folder}: {len(found)} files match the {sequence} patterns ({', '.join(patterns)}): "
                            f"{', '.join(p.name for p in found[:4])}; give --{sequence} PATTERN")
    if not found and required:
        raise ImportProblem(f"{folder}: no {sequence} file (patterns {', '.join(patterns)}; give --{sequence} "
                            "PATTERN)")
    return found[0] if found else None


def nnunet_channels(root: Path) -> dict[str, str]:
    """sequence -> the 4-digit channel suffix, from ``dataset.json``'s channel_names (else brainseg's export)."""
    doc = root / "dataset.json"
    names = {}
    if doc.is_file():
        try:
            names = {str(k): str(v) for k, v in (json.loads(doc.read_text()).get("channel_names") or {}).items()}
        except (ValueError, AttributeError) as exc:
            raise ImportProblem(f"{doc}: unreadable ({exc})") from exc
    if not names:
        return {"flair": "0000", "pre": "0001", "post": "0002"}
    out, used = {}, set()
    for sequence, pattern in NNUNET_CHANNELS.items():  # FLAIR first, then post (T1CE) before pre (T1)
        hits = [k for k, v in names.items() if re.search(pattern, v.strip().lower()) and k not in used]
        if hits:
            out[sequence] = f"{int(hits[0]):04d}"
            used.add(hits[0])
    if "flair" not in out:
        raise ImportProblem(f"{doc}: no FLAIR among channel_names {names}")
    return out


def _nifti_file(stem: Path) -> Path:
    """``stem.nii.gz``, else ``stem.nii`` when only that exists."""
    gz = stem.with_name(stem.name + ".nii.gz")
    plain = stem.with_name(stem.name + ".nii")
    return plain if plain.is_file() and not gz.is_file() else gz


def find_patients(src: Path, options: Options) -> list[Source]:
    """The patients of ``src`` (sorted by name), or :class:`ImportProblem` naming what is missing or ambiguous."""
    src = Path(src)
    if not src.is_dir():
        raise ImportProblem(f"{src}: not a folder (volumes are imported from a folder)")
    if (src / "imagesTr").is_dir() and (src / "labelsTr").is_dir():
        channels = nnunet_channels(src)
        cases = sorted({re.sub(r"_\d{4}$", "", nifti_stem(p)) for p in (src / "imagesTr").iterdir() if is_nifti(p)})
        out = []
        for case in cases:
            files = {seq: _nifti_file(src / "imagesTr" / f"{case}_{suffix}") for seq, suffix in channels.items()}
            files["label"] = _nifti_file(src / "labelsTr" / case)
            missing = [str(p) for seq, p in files.items() if not p.is_file() and seq in ("flair", "label")]
            if missing:
                raise ImportProblem(f"{missing[0]}: missing (case {case})")
            out.append(Source(case, {k: v for k, v in files.items() if v.is_file()}))
        return out
    pats = options.patterns
    folders = sorted({p.parent for p in src.rglob("*") if p.is_file() and _matches(p.name, pats["flair"])})
    if not folders:
        raise ImportProblem(f"{src}: no patient volumes found (no file matches the FLAIR patterns "
                            f"{', '.join(pats['flair'])}; one folder per patient, or nnU-Net's imagesTr/labelsTr)")
    out = []
    for folder in folders:
        files = {seq: _one(folder, seq, pats[seq], seq in ("flair", "label")) for seq in SEQUENCES}
        out.append(Source(folder.name, {k: v for k, v in files.items() if v is not None}))
    names = [s.name for s in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ImportProblem(f"{src}: patient folder name(s) {', '.join(twice)} found twice; rename one")
    return out


def platform_names(sources: list[Source], site: str) -> dict[str, str]:
    """source name -> the layout's folder name: kept when it parses as TCGA_<site>_<id>_<date>, a
    patient id (TCGA_<site>_<id>: nnU-Net cases of ``brainseg data export``) gets the unknown date.

    >>> platform_names([Source("BraTS20_Training_001", {}), Source("TCGA_CS_4941_19960909", {}),
    ...                 Source("TCGA_DU_5855", {})], "IM")  # doctest: +NORMALIZE_WHITESPACE
    {'BraTS20_Training_001': 'TCGA_IM_0001_00000000', 'TCGA_CS_4941_19960909': 'TCGA_CS_4941_19960909',
     'TCGA_DU_5855': 'TCGA_DU_5855_00000000'}
    """
    if not re.fullmatch(r"[A-Z0-9]{2}", site):
        raise ValueError(f"--site {site!r}: two capital letters or digits (the layout's institution code)")
    out, n = {}, 0
    for s in sources:
        if FOLDER_RE.match(s.name):
            out[s.name] = s.name
        elif FOLDER_RE.match(f"{s.name}_00000000"):
            out[s.name] = f"{s.name}_00000000"
        else:
            n += 1
            if n > 9999:
                raise ImportProblem("more than 9,999 patients to rename: import them in parts")
            out[s.name] = f"TCGA_{site}_{n:04d}_00000000"
    if len(set(out.values())) < len(out):
        raise ImportProblem("two patients would get the same folder name; rename the source folders")
    return out


def to_plane(array: np.ndarray, interpolation: int) -> tuple[np.ndarray, int]:
    """(H, W[, C]) -> (SIZE, SIZE[, C]): zero-padded to a centred square, then resized; returns the square's side."""
    h, w = array.shape[:2]
    side = max(h, w)
    if side == SIZE and h == w:
        return array, side
    pad = [((side - h) // 2, side - h - (side - h) // 2), ((side - w) // 2, side - w - (side - w) // 2)]
    square = np.pad(array, pad + [(0, 0)] * (array.ndim - 2))
    return cv2.resize(square, (SIZE, SIZE), interpolation=interpolation), side


def resize_text(h: int, w: int) -> str:
    """What :func:`to_plane` does to an ``h`` x ``w`` plane, in words.

    >>> resize_text(256, 256), resize_text(240, 240)
    ('none', '240x240 resized to 256x256 (images bilinear, masks nearest)')
    >>> resize_text(240, 200)
    '240x200 zero-padded to 240x240, resized to 256x256 (images bilinear, masks nearest)'
    """
    if (h, w) == (SIZE, SIZE):
        return "none"
    side = max(h, w)
    padded = f" zero-padded to {side}x{side}," if h != w else ""
    return f"{h}x{w}{padded} resized to {SIZE}x{SIZE} (images bilinear, masks nearest)"


def convert_patient(source: Source, folder: Path, options: Options, limits: VolumeLimits | None = None) -> dict:
    """Read one patient's volumes, write its slices, masks and sidecar into ``folder``; returns the sidecar."""
    scans = {seq: read_scan(path, limits) for seq, path in source.files.items()}
    flair, label = scans["flair"], scans["label"]
    resampled = []
    for seq in ("pre", "post"):
        diff = grid_difference(scans[seq].geometry, flair.geometry) if seq in scans else None
        if diff is not None:
            if not options.resample:
                raise BadScan(scans[seq].source, f"not on the grid of {flair.source} ({diff}); co-register them, "
                                                 "or pass --resample")
            scans[seq] = resample_onto(scans[seq], flair.geometry)
            resampled.append(seq)
    diff = grid_difference(label.geometry, flair.geometry)
    if diff is not None:
        raise BadScan(label.source, f"the label is not on the grid of {flair.source} ({diff}); a label is never "
                                    "resampled")
    values = label.array
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise BadScan(label.source, "label voxels are not whole numbers: a label volume holds class numbers")
    found = {int(v): int(c) for v, c in zip(*np.unique(values.astype(np.int64), return_counts=True))}
    mask = options.label_rule.apply(values.astype(np.int64))
    images = rgb_slices(flair, scans.get("pre"), scans.get("post"))
    keep = [z for z in range(len(images)) if flair.array[z].any() or mask[z].any()]
    if not keep:
        raise BadScan(flair.source, "every slice is empty (no FLAIR signal, no label)")
    first, last = keep[0], keep[-1]
    folder.mkdir(parents=True)
    side = SIZE
    for n, z in enumerate(range(first, last + 1), start=1):
        image, side = to_plane(images[z], cv2.INTER_LINEAR)
        plane, _ = to_plane(mask[z].astype(np.uint8) * 255, cv2.INTER_NEAREST)
        imageio.write_tiff(folder / f"{folder.name}_{n}.tif", image)
        imageio.write_tiff(folder / f"{folder.name}_{n}_mask.tif", plane)
    sz, sy, sx = flair.geometry.spacing
    scale = side / SIZE
    h, w = images[0].shape[:2]
    sidecar = {
        "format": 1, "source_patient": source.name, "files": {k: str(v) for k, v in source.files.items()},
        "spacing_mm": None if flair.geometry.kind == "tiff" else [round(sz, 6), round(sy * scale, 6),
                                                                   round(sx * scale, 6)],
        "source_spacing_mm": None if flair.geometry.kind == "tiff" else [round(sz, 6), round(sy, 6), round(sx, 6)],
        "source_plane": [h, w], "slices": [first + 1, last + 1, len(images)],
        "resize": resize_text(h, w),
        "label_rule": options.label_rule.describe(), "label_values": found,
        "resampled": resampled,
        "sequences": sorted(k for k in ("pre", "post") if k in scans) or ["flair only: pre/post filled with FLAIR"],
    }
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def clinical_table(names: dict[str, str], clinical_csv: Path | None) -> pd.DataFrame:
    """data.csv for the imported patients (``names``: source folder -> layout folder): the rows of
    ``clinical_csv`` whose ``Patient`` is a source folder's name (or, for a TCGA-named folder, its
    patient id), under the layout's patient id; without it, a ``Patient`` column alone.

    >>> clinical_table({"BraTS_7": "TCGA_IM_0001_00000000"}, None)["Patient"].tolist()
    ['TCGA_IM_0001']
    """
    to_id = {}
    for src, dest in names.items():
        pid = parse_folder(dest)["patient"]
        to_id[src] = pid
        if parse_folder(src):
            to_id[parse_folder(src)["patient"]] = pid
    if clinical_csv is None:
        return pd.DataFrame({ID: sorted(set(to_id.values()))})
    table = read_clinical(Path(clinical_csv)).reset_index()
    table[ID] = table[ID].map(to_id)
    return table.dropna(subset=[ID]).sort_values(ID)


def patient_line(source: str, name: str, sidecar: dict) -> str:
    """One line per converted patient: its names, the slices kept and the spacing."""
    first, last, total = sidecar["slices"]
    if sidecar["spacing_mm"] is None:
        return f"{source} -> {name}: slices {first}-{last} of {total}, spacing unknown (a volume stacked from slices)"
    z, y, x = sidecar["spacing_mm"]
    return f"{source} -> {name}: slices {first}-{last} of {total}, {z:g} x {y:g} x {x:g} mm (z, y, x)"


def summary_lines(src: Path, s: dict, sidecars: dict, names: dict, options: Options) -> list[str]:
    """What an import of volumes did: counts, the label rule and the label values found, the spacing,
    the resizes and the renamed folders."""
    values: dict[int, int] = {}
    for car in sidecars.values():
        for v, n in car["label_values"].items():
            values[int(v)] = values.get(int(v), 0) + n
    renamed = [(a, b) for a, b in names.items() if a != b]
    resized = sorted({car["resize"] for car in sidecars.values() if car["resize"] != "none"})
    lines = [f"imported {s['patients']} patients given as volumes, {s['slices']} slices from {src}",
             f"label rule {options.label_rule.describe()}; label values found (voxels): "
             + ", ".join(f"{v}: {n:,}" for v, n in sorted(values.items())),
             f"spacing (z,y,x mm) recorded per patient in {SIDECAR} and in the manifest's spacing_mm"]
    lines += [f"resized: {r}" for r in resized[:3]]
    if renamed:
        lines.append(f"{len(renamed)} patient folder(s) renamed to the layout's TCGA_<site>_<id>_<date> (e.g. "
                     f"{renamed[0][0]} -> {renamed[0][1]}); the source names are in each {SIDECAR} and the "
                     "import marker")
    return lines
