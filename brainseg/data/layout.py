"""Discover the public kaggle_3m layout: ``TCGA_<inst>_<patient>_<date>/..._<n>[_mask].tif``.

Accepts the ``kaggle_3m`` folder itself, any parent folder holding exactly one such folder (as
in the Kaggle archive ``lgg-mri-segmentation/kaggle_3m``), or a ``.zip`` / ``.tar.*`` archive.
"""

from __future__ import annotations

import dataclasses
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

# ASCII digits and \Z (never $, which also matches before a final newline): "x_3.tif\n" is not slice 3,
# nor is "x_\u0663.tif" (an Arabic-Indic three)
FOLDER_RE = re.compile(r"^TCGA_(?P<inst>[A-Z0-9]{2})_(?P<pid>[A-Z0-9]{4})_(?P<date>[0-9]{8})\Z")
SLICE_RE = re.compile(r"^(?P<stem>.+)_(?P<n>[0-9]+)(?P<mask>_mask)?\.tiff?\Z", re.IGNORECASE)
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


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    """Limits on unpacking one archive (zip bombs, tar bombs). Defaults fit the Kaggle download
    (about 16,000 files, 2 GB unpacked, ratio ~3) with room to spare; each can be overridden by
    ``$BRAINSEG_ARCHIVE_MAX_BYTES``, ``$BRAINSEG_ARCHIVE_MAX_FILES``, ``$BRAINSEG_ARCHIVE_MAX_RATIO``.
    """

    max_bytes: int = 16 * 1024 ** 3   # total unpacked bytes
    max_files: int = 200_000          # members
    max_ratio: float = 100.0          # unpacked bytes / archive bytes (checked once past ratio_floor)
    ratio_floor: int = 16 * 1024 ** 2  # small archives may be as compressible as they like

    @classmethod
    def from_env(cls) -> "ArchiveLimits":
        d = cls()

        def get(name, default, kind):
            raw = os.environ.get(name, "").strip()
            try:
                return kind(float(raw)) if raw else default
            except ValueError:
                return default

        return cls(get("BRAINSEG_ARCHIVE_MAX_BYTES", d.max_bytes, int),
                   get("BRAINSEG_ARCHIVE_MAX_FILES", d.max_files, int),
                   get("BRAINSEG_ARCHIVE_MAX_RATIO", d.max_ratio, float), d.ratio_floor)


class _Budget:
    """Running totals of an archive's declared member sizes, refused as soon as a limit is passed."""

    def __init__(self, archive: Path, limits: ArchiveLimits):
        self.archive, self.limits = archive, limits
        self.packed = max(archive.stat().st_size, 1)
        self.files = self.bytes = 0

    def add(self, name: str, size: int) -> None:
        lim = self.limits
        self.files += 1
        self.bytes += max(int(size), 0)
        if self.files > lim.max_files:
            raise ValueError(f"{self.archive}: more than {lim.max_files:,} members; refused (archive limit "
                             "BRAINSEG_ARCHIVE_MAX_FILES)")
        if self.bytes > lim.max_bytes:
            raise ValueError(f"{self.archive}: unpacks to more than {lim.max_bytes / 1e9:,.1f} GB (at member "
                             f"{name!r}); refused as a possible zip bomb (limit BRAINSEG_ARCHIVE_MAX_BYTES)")
        ratio = self.bytes / self.packed
        if self.bytes > lim.ratio_floor and ratio > lim.max_ratio:
            raise ValueError(f"{self.archive}: compression ratio over {lim.max_ratio:g}:1 ({self.bytes / 1e6:,.0f} MB "
                             f"from {self.packed / 1e6:,.1f} MB); refused as a zip bomb (limit "
                             "BRAINSEG_ARCHIVE_MAX_RATIO)")


def _safe_name(archive: Path, name: str, dest: Path) -> None:
    parts = name.replace("\\", "/").split("/")
    target = (dest / name).resolve()
    if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":") \
            or not target.is_relative_to(dest.resolve()):
        raise ValueError(f"{archive}: unsafe member refused: {name!r} points outside the archive")


def _check_zip(archive: Path, zf: zipfile.ZipFile, dest: Path, limits: ArchiveLimits) -> None:
    budget = _Budget(archive, limits)
    for info in zf.infolist():
        _safe_name(archive, info.filename, dest)
        mode = (info.external_attr >> 16) & 0o170000
        if mode == 0o120000:  # a symbolic link stored by Info-ZIP
            raise ValueError(f"{archive}: unsafe member refused: {info.filename!r} is a symbolic link")
        budget.add(info.filename, info.file_size)  # zipfile never writes more than file_size


def _check_tar(archive: Path, tf: tarfile.TarFile, dest: Path, limits: ArchiveLimits) -> list[tarfile.TarInfo]:
    budget = _Budget(archive, limits)
    members = []
    for member in tf:  # streams: stops at the first member over a limit
        _safe_name(archive, member.name, dest)
        if not (member.isfile() or member.isdir()):
            kind = "link" if (member.issym() or member.islnk()) else "special file"
            raise ValueError(f"{archive}: unsafe member refused: {member.name!r} is a {kind} (only files "
                             "and folders are unpacked)")
        budget.add(member.name, member.size)
        members.append(member)
    return members


def extract_archive(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> Path:
    """Unpack a zip or tar archive into ``dest`` safely; returns ``dest``.

    Refused with a ValueError naming the archive (before anything is written): members outside
    ``dest`` (absolute, ``..``), links and device files, and archives over ``limits`` (total
    unpacked size, member count, compression ratio; see :class:`ArchiveLimits`).
    """
    archive, dest = Path(archive), Path(dest)
    limits = limits or ArchiveLimits.from_env()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                _check_zip(archive, zf, dest, limits)
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                members = _check_tar(archive, tf, dest, limits)
                tf.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as exc:  # a member with an absolute path, "..", or a link outside
        raise ValueError(f"{archive}: unsafe member refused ({exc})") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error,
            lzma.LZMAError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise ValueError(f"{archive}: cannot unpack ({exc.strerror}: {exc.filename or ''})") from exc
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


def open_dataset(path: Path, workdir: Path | None = None, limits: ArchiveLimits | None = None) -> Path:
    """Like :func:`find_root`, but an archive is first unpacked into ``workdir`` (or a temp dir),
    within ``limits`` (default :meth:`ArchiveLimits.from_env`). A refusal names the archive (and
    its members as ``<archive>/<member>``), never the folder it was unpacked into, and says when
    the archive holds another archive instead of a dataset."""
    path = Path(path)
    if is_archive(path):
        dest = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="brainseg-"))
        try:
            extract_archive(path, dest, limits)
        except ValueError as exc:  # "cannot unpack (No space left on device: <a member under dest>)"
            raise ValueError(as_user_path(str(exc), dest, path)) from None
        try:
            return find_root(dest)
        except ValueError as exc:
            inner = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if is_archive(p))
            if inner:
                more = f" and {len(inner) - 1} more" if len(inner) > 1 else ""
                raise ValueError(f"{path}: holds another archive ({inner[0]}{more}) and no dataset folder; "
                                 "unpack the inner archive and give brainseg that archive or its folder") from None
            raise ValueError(as_user_path(str(exc), dest, path)) from None
    return find_root(path)


def as_user_path(text: str, folder: Path, shown_as: Path | str) -> str:
    """``text`` (a message, a problem line) with ``folder``, where brainseg unpacked or copied the
    user's data (removed afterwards), named as the user knows it: the archive (its members as
    ``<archive>/<member>``) or the source folder.

    >>> as_user_path("/tmp/brainseg-x/kaggle_3m/P/P_1.tif: truncated", Path("/tmp/brainseg-x"), "lgg.zip")
    'lgg.zip/kaggle_3m/P/P_1.tif: truncated'
    """
    return str(text).replace(str(folder), str(shown_as))


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
    """Copy a dataset folder into ``dest``, which must not exist (nothing is ever replaced here)."""
    if dest.exists():
        raise FileExistsError(f"{dest}: already exists; not replaced")
    shutil.copytree(src_root, dest)
    return dest
