"""Discover the public kaggle_3m layout: ``TCGA_<inst>_<patient>_<date>/..._<n>[_mask].tif``.

Accepts the ``kaggle_3m`` folder itself, any parent folder holding exactly one such folder (as
in the Kaggle archive ``lgg-mri-segmentation/kaggle_3m``), or a ``.zip`` / ``.tar.*`` archive.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

FOLDER_RE = re.compile(r"^TCGA_(?P<inst>[A-Z0-9]{2})_(?P<pid>[A-Z0-9]{4})_(?P<date>\d{8})$")
SLICE_RE = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")


@dataclasses.dataclass(frozen=True)
class Problem:
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclasses.dataclass(frozen=True)
class SliceRef:
    patient_dir: str  # TCGA_CS_4941_19960909
    patient: str      # TCGA_CS_4941 (data.csv's Patient)
    institution: str  # CS
    scan_date: str    # 19960909
    slice: int
    image_path: Path
    mask_path: Path


@dataclasses.dataclass
class Layout:
    root: Path
    slices: list[SliceRef]
    problems: list[Problem]
    data_csv: Path | None


def parse_folder(name: str) -> dict | None:
    """``"TCGA_CS_4941_19960909"`` -> patient, institution and scan date (None if it does not parse).

    >>> parse_folder("TCGA_CS_4941_19960909")["patient"]
    'TCGA_CS_4941'
    """
    m = FOLDER_RE.match(name)
    if not m:
        return None
    return {"patient": f"TCGA_{m['inst']}_{m['pid']}", "institution": m["inst"], "scan_date": m["date"]}


def is_archive(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack a zip or tar archive into ``dest`` safely (no paths outside it); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    target = (dest / member).resolve()
                    if not target.is_relative_to(dest.resolve()):
                        raise ValueError(f"{archive}: member {member!r} points outside the archive")
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
    except tarfile.FilterError as exc:  # a member with an absolute path, "..", or a link outside
        raise ValueError(f"{archive}: unsafe member refused ({exc})") from exc
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise ValueError(f"{archive}: not a readable zip/tar archive ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'truncated'})") from exc
    return dest


def _looks_like_root(path: Path) -> bool:
    return path.is_dir() and (
        (path / "data.csv").is_file() or any(FOLDER_RE.match(p.name) for p in path.iterdir() if p.is_dir())
    )


def find_root(path: Path) -> Path:
    """Resolve a user path (kaggle_3m folder or a parent of it) to the folder of patient folders."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise ValueError(f"{path}: expected a folder or a .zip/.tar.* archive")
    if _looks_like_root(path):
        return path
    candidates = sorted(p for p in path.rglob("kaggle_3m") if p.is_dir())
    candidates = candidates or sorted(p.parent for p in path.rglob("TCGA_*") if p.is_dir() and FOLDER_RE.match(p.name))
    candidates = sorted(set(candidates))
    if len(candidates) > 1:  # the Kaggle archive holds kaggle_3m twice: take the shallowest copy
        names = [sorted(q.name for q in c.iterdir() if q.is_dir()) for c in candidates]
        if all(n == names[0] for n in names):
            candidates = [min(candidates, key=lambda c: len(c.parts))]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"{path}: no kaggle_3m folder or TCGA_<inst>_<patient>_<date> folders found")
    raise ValueError(f"{path}: several dataset folders found: {', '.join(map(str, candidates[:5]))}")


def open_dataset(path: Path, workdir: Path | None = None) -> Path:
    """Like :func:`find_root`, but an archive is first unpacked into ``workdir`` (or a temp dir)."""
    path = Path(path)
    if is_archive(path):
        dest = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="brainseg-"))
        return find_root(extract_archive(path, dest))
    return find_root(path)


def discover(root: Path) -> Layout:
    """List image/mask pairs under ``root`` with every layout problem found (nothing is decoded)."""
    root = Path(root)
    slices: list[SliceRef] = []
    problems: list[Problem] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = parse_folder(folder.name)
        if meta is None:
            if any(folder.glob("*.tif")):
                problems.append(Problem(str(folder), "folder name does not parse as "
                                                     "TCGA_<institution>_<patient>_<YYYYMMDD>"))
            continue
        images: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        for f in sorted(folder.iterdir()):
            if not f.is_file():
                continue
            m = SLICE_RE.match(f.name)
            if not m or m["stem"] != folder.name:
                if f.suffix.lower() in (".tif", ".tiff"):
                    problems.append(Problem(str(f), f"file name does not match {folder.name}_<n>[_mask].tif"))
                continue
            n = int(m["n"])
            table = masks if m["mask"] else images
            if n in table:
                problems.append(Problem(str(f), f"duplicate slice number {n} (also {table[n].name})"))
                continue
            table[n] = f
        for n in sorted(set(images) | set(masks)):
            if n not in masks:
                problems.append(Problem(str(images[n]), "image without mask (no _mask.tif)"))
            elif n not in images:
                problems.append(Problem(str(masks[n]), "mask without image"))
            else:
                slices.append(SliceRef(folder.name, meta["patient"], meta["institution"],
                                       meta["scan_date"], n, images[n], masks[n]))
    data_csv = root / "data.csv"
    return Layout(root, slices, problems, data_csv if data_csv.is_file() else None)


def copy_dataset(src_root: Path, dest: Path) -> Path:
    """Copy a dataset folder into ``dest`` (replacing it); returns ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src_root, dest)
    return dest
