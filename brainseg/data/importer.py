"""Put a dataset under DVC in ``data/raw/kaggle_3m``: a real download, or the synthetic default.

Import is safe by construction:

- it never deletes anything it did not create: a dataset already at ``--dest`` is *renamed* to a
  backup beside it (``kaggle_3m.previous-<time>``), never removed;
- it refuses a ``--dest`` that is neither empty nor a dataset (only ``TCGA_*`` patient folders,
  ``data.csv``, a README, hidden files): a project folder, a home folder, a parent of the source;
- the new copy is built and validated beside the old one (``.kaggle_3m.importing-*``) and swapped
  in by renames only when every pair decodes and ``data.csv`` reads; otherwise nothing changes;
- archives are unpacked with limits (see :class:`brainseg.data.layout.ArchiveLimits`).

Patients given as volumes (NIfTI: one folder per patient, BraTS names, nnU-Net's layout) are
converted into the same layout by :func:`import_volumes` (:mod:`brainseg.data.volume_import`), with
the same staging, validation and swap, and each patient's spacing recorded beside its slices.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from brainseg.data import synth
from brainseg.data.layout import FOLDER_RE, ArchiveLimits, as_user_path, find_root, is_archive, open_dataset
from brainseg.data.manifest import scan
from brainseg.data.nifti import is_nifti
from brainseg.data.scan import BadScan
from brainseg.data.volume_import import (
    ImportProblem,
    Options,
    clinical_table,
    convert_patient,
    find_patients,
    patient_line,
    platform_names,
    summary_lines,
)

MARKER_SUFFIX = ".import.json"    # beside the dataset: kaggle_3m.import.json (what was imported, when)
BACKUP_INFIX = ".previous-"       # beside the dataset: kaggle_3m.previous-20261127-231500
STAGING_PREFIX = "."              # .kaggle_3m.importing-XXXX beside the dataset, removed at the end
DATASET_FILES = ("data.csv",)     # besides TCGA_* folders, a dataset folder may hold these,
DATASET_PREFIXES = ("readme", "license", "sha256sums", ".")  # README*, LICENSE*, checksums, hidden files


class ImportRefused(ValueError):
    """The import was refused before anything at ``--dest`` changed; the message says why."""


def _dvc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)


def dvc_available(cwd: Path | None = None) -> bool:
    return shutil.which("dvc") is not None and _dvc("root", cwd=cwd).returncode == 0


def dvc_track(path: Path) -> str:
    """``dvc add`` the folder; returns a status line. (.dvc/config sets the default local remote.)"""
    if not dvc_available():
        return f"{path}: not put under DVC (no DVC repository here)"
    out = _dvc("add", str(path))
    if out.returncode != 0:
        raise RuntimeError(f"dvc add {path} failed: {out.stderr.strip() or out.stdout.strip()}")
    return f"{path}: tracked by DVC ({path}.dvc); `dvc push` stores it in the default remote"


def marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + MARKER_SUFFIX)


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that do not belong in a dataset folder (empty list: a dataset, or empty)."""
    bad = []
    for p in sorted(folder.iterdir()):
        lower = p.name.lower()
        if p.is_dir() and FOLDER_RE.match(p.name) and not p.is_symlink():
            continue
        if p.is_file() and (lower in DATASET_FILES or lower.startswith(DATASET_PREFIXES)):
            continue
        bad.append(p.name + ("/" if p.is_dir() else ""))
    return bad


def check_destination(src: Path, dest: Path, found: Path | None = None) -> str:
    """Why replacing ``dest`` is safe ("new", "empty", "dataset"), or :class:`ImportRefused`.

    ``found`` is the dataset folder found inside ``src`` (``dest`` must not be inside it).
    """
    s, d = src.resolve(), dest.resolve()
    if s == d or (found is not None and found.resolve() == d):
        raise ImportRefused(f"{src}: already at {dest}")
    if d in s.parents:
        raise ImportRefused(f"--dest {dest} contains the source {src}; refusing (it would replace the "
                            "source itself). Choose a new or empty folder, e.g. data/raw/kaggle_3m")
    if found is not None and found.resolve() in d.parents:
        raise ImportRefused(f"--dest {dest} is inside the dataset being imported ({found}); choose a "
                            "folder outside it")
    if not dest.exists():
        return "new"
    if not dest.is_dir():
        raise ImportRefused(f"--dest {dest} is a file, not a folder; nothing was changed")
    if not any(dest.iterdir()):
        return "empty"
    bad = foreign_entries(dest)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise ImportRefused(f"--dest {dest} is not empty and is not a dataset (it holds {shown}); nothing "
                            "was changed. Give a new or empty folder, or a previous import (e.g. the "
                            "default data/raw/kaggle_3m)")
    return "dataset"


def _problems_line(src: Path, problems: list) -> str:
    shown = "; ".join(str(p) for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (f"{src}: {len(problems)} problem(s) in the new data, nothing was replaced: {shown}{more}. "
            f"See them all with `brainseg data validate {src}`")


def _write_marker(dest: Path, src: Path, summary: dict, backup: Path | None, previous_dvc: str | None,
                  extra: dict | None = None) -> None:
    marker_path(dest).write_text(json.dumps({
        "source": str(src), "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "patients": summary["patients"], "slices": summary["slices"],
        "previous_backup": str(backup) if backup else None, "previous_dvc_md5": previous_dvc, **(extra or {})},
        indent=2) + "\n")


def _dvc_md5(dest: Path) -> str | None:
    dvc_file = dest.with_name(dest.name + ".dvc")
    if not dvc_file.is_file():
        return None

    try:
        outs = yaml.safe_load(dvc_file.read_text()).get("outs", [])
        return str(outs[0]["md5"]) if outs and outs[0].get("md5") else None
    except (yaml.YAMLError, AttributeError, KeyError, IndexError):
        return None


def import_dataset(src: Path, dest: Path, use_dvc: bool = True, limits: ArchiveLimits | None = None) -> str:
    """Copy (or unpack) the dataset at ``src`` into ``dest``, validated, and track it with DVC.

    Returns the status lines; raises :class:`ImportRefused` / FileNotFoundError / ValueError with
    ``dest`` unchanged. A dataset already at ``dest`` is kept as ``<dest>.previous-<time>``.
    """
    src, dest = Path(src), Path(dest)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    kind = check_destination(src, dest)
    with staging_beside(dest) as staging:
        new, result = validated_copy(src, dest, staging, limits)
        status, backup, previous_dvc = _put_in_place(new, src, dest, kind, staging, result, use_dvc)
    s = result.summary()
    return "\n".join([f"imported {s['patients']} patients, {s['slices']} slices from {src}", status,
                      *_backup_lines(backup, dest, previous_dvc)])


def _put_in_place(new: Path, src: Path, dest: Path, kind: str, staging: Path, result, use_dvc: bool,
                  extra: dict | None = None) -> tuple[str, Path | None, str | None]:
    """Swap the validated ``new`` dataset in at ``dest``, write the marker, track it; (status, backup, old md5)."""
    previous_dvc = _dvc_md5(dest)
    with swapped_in(new, dest, kind, staging) as backup:
        _write_marker(dest, src, result.summary(), backup, previous_dvc, extra)
        (dest.parent / "SYNTHETIC").unlink(missing_ok=True)
        status = dvc_track(dest) if use_dvc else f"{dest}: copied (DVC not used)"
    return status, backup, previous_dvc


def _backup_lines(backup: Path | None, dest: Path, previous_dvc: str | None) -> list[str]:
    if backup is None:
        return []
    return [f"the previous dataset is kept in {backup} (nothing was deleted); to go back: "
            f"`brainseg data import {backup} --dest {dest}`; delete it when no longer needed"
            + (f" (it is also in the DVC cache, md5 {previous_dvc})" if previous_dvc else "")]


def holds_volumes(src: Path) -> bool:
    """True for a folder that is not a Kaggle-layout dataset but holds NIfTI files (import them as volumes)."""
    src = Path(src)
    if not src.is_dir():
        return False
    try:
        find_root(src)
        return False
    except (FileNotFoundError, ValueError):
        return any(p.is_file() and is_nifti(p) for p in src.rglob("*.nii*"))


def import_volumes(src: Path, dest: Path, options: Options | None = None, use_dvc: bool = True,
                   clinical_csv: Path | None = None, echo=None) -> str:
    """Convert the patients of ``src`` given as volumes (:mod:`brainseg.data.volume_import`) into the
    Kaggle layout at ``dest``, validated, swapped in as :func:`import_dataset` does, with each
    patient's spacing in its sidecar. Raises :class:`ImportRefused` / FileNotFoundError / ValueError
    with ``dest`` unchanged (every bad patient named, nothing replaced)."""
    src, dest, options = Path(src), Path(dest), options or Options()
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    kind = check_destination(src, dest, found=src)
    try:
        sources = find_patients(src, options)
        names = platform_names(sources, options.site)
    except ImportProblem as exc:
        raise ImportRefused(str(exc)) from None
    with staging_beside(dest) as staging:
        new, problems, sidecars = staging / "new", [], {}
        new.mkdir()
        for source in sources:
            try:
                sidecars[names[source.name]] = convert_patient(source, new / names[source.name], options)
            except (BadScan, ImportProblem) as exc:
                problems.append(str(exc))
                continue
            if echo:
                echo(patient_line(source.name, names[source.name], sidecars[names[source.name]]))
        if problems:
            shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            raise ImportRefused(f"{src}: {len(problems)} patient(s) cannot be imported, nothing was replaced: {shown}")
        clinical_table(names, clinical_csv).to_csv(new / "data.csv", index=False)
        result = scan(new)
        if not result.ok:
            raise ImportRefused(as_user_path(f"{src}: the converted slices have {len(result.problems)} problem(s): "
                                             f"{result.problems[0]}", new, dest))
        extra = {"kind": "volumes", "label_rule": options.label_rule.describe(),
                 "patient_names": {dest_name: src_name for src_name, dest_name in names.items()}}
        status, backup, previous_dvc = _put_in_place(new, src, dest, kind, staging, result, use_dvc, extra)
    return "\n".join([*summary_lines(src, result.summary(), sidecars, names, options), status,
                      *_backup_lines(backup, dest, previous_dvc)])


@contextlib.contextmanager
def staging_beside(dest: Path) -> Iterator[Path]:
    """A staging folder beside ``dest`` (``.kaggle_3m.importing-*``), removed at the end, with the
    parent folders this import created if they are empty again (a failed import leaves nothing)."""
    made = [p for p in reversed(dest.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{dest.name}.importing-", dir=dest.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:  # not empty: the import landed there
                break


def validated_copy(src: Path, dest: Path, staging: Path, limits: ArchiveLimits | None):
    """The dataset at ``src`` copied (or unpacked) to ``staging/new`` and scanned; (folder, scan).
    Raises :class:`ImportRefused` when a pair does not decode or ``data.csv`` does not read."""
    root = open_dataset(src, staging / "unpacked", limits) if is_archive(src) else open_dataset(src)
    if not is_archive(src):
        check_destination(src, dest, found=root)  # the dataset found must not overlap dest either
    new = staging / "new"
    if is_archive(src):
        root.rename(new)
    else:
        shutil.copytree(root, new, symlinks=False)
    result = scan(new)
    if not result.ok:  # named as the user knows them: <archive>/<member> or the source folder, never staging
        shown = Path(src) / root.relative_to(staging / "unpacked") if is_archive(src) else root
        raise ImportRefused(as_user_path(_problems_line(src, result.problems), new, shown))
    return new, result


@contextlib.contextmanager
def swapped_in(new: Path, dest: Path, kind: str, staging: Path) -> Iterator[Path | None]:
    """``new`` renamed to ``dest``; a dataset already there is renamed to a backup first (yielded,
    else None). If the block fails, the previous state is put back by renames: nothing is lost."""
    backup = None
    if kind == "dataset":
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        backup, n = dest.with_name(f"{dest.name}{BACKUP_INFIX}{stamp}"), 1
        while backup.exists():
            backup, n = dest.with_name(f"{dest.name}{BACKUP_INFIX}{stamp}-{n}"), n + 1
        dest.rename(backup)
    elif kind == "empty":
        dest.rmdir()
    new.rename(dest)
    try:
        yield backup
    except BaseException:
        dest.rename(staging / "failed")
        if backup is not None:
            backup.rename(dest)
        elif kind == "empty":
            dest.mkdir()
        raise


def ensure_dataset(dest: Path, synth_params: dict, use_dvc: bool = True) -> str:
    """The embedded default: generate synthetic data at ``dest`` when no dataset is there (built in
    a staging folder beside it and renamed in, so a killed generation leaves no half dataset). With
    ``use_dvc``, a dataset there that DVC does not track yet (``<dest>.dvc`` missing: generated by a
    run that died before ``dvc add``, or copied in by hand) is put under DVC now, so that every run's
    data version is DVC's. RuntimeError when ``dvc add`` fails."""
    dvc_file = dest.with_name(dest.name + ".dvc")
    if dest.exists() and any(dest.iterdir()):
        kind = "synthetic" if (dest.parent / "SYNTHETIC").exists() else "imported"
        line = f"{dest}: using the {kind} dataset already there"
        if use_dvc and not dvc_file.is_file():
            return f"{line}; it was not under DVC yet. {dvc_track(dest)}"
        return line
    with staging_beside(dest) as staging:
        synth.generate(staging / "new", **synth_params)
        (dest.parent / "SYNTHETIC").write_text("data/raw/kaggle_3m holds synthetic data (brainseg data synth)\n")
        if dest.exists():
            dest.rmdir()  # empty
        (staging / "new").rename(dest)
    status = dvc_track(dest) if use_dvc else ""
    return f"{dest}: no dataset imported, generated the synthetic default ({synth_params}). {status}"
