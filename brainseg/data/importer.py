"""Put a dataset under DVC in ``data/raw/kaggle_3m``: a real download, or the synthetic default."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from brainseg.data import synth
from brainseg.data.layout import copy_dataset, open_dataset



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


def import_dataset(src: Path, dest: Path, use_dvc: bool = True) -> str:
    """Copy (or unpack) the dataset at ``src`` into ``dest`` and track it with DVC."""
    src = Path(src)
    with tempfile.TemporaryDirectory(prefix="brainseg-import-") as tmp:
        root = open_dataset(src, Path(tmp))
        if dest.resolve() == root.resolve():
            raise ValueError(f"{src}: already at {dest}")
        staging = dest.with_name(dest.name + ".importing")
        copy_dataset(root, staging)  # nothing at dest changes until the copy is complete
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)
    marker = dest.parent / "SYNTHETIC"
    marker.unlink(missing_ok=True)
    return dvc_track(dest) if use_dvc else f"{dest}: copied (DVC not used)"


def ensure_dataset(dest: Path, synth_params: dict, use_dvc: bool = True) -> str:
    """The embedded default: generate synthetic data at ``dest`` when no dataset is there."""
    if dest.exists() and any(dest.iterdir()):
        kind = "synthetic" if (dest.parent / "SYNTHETIC").exists() else "imported"
        return f"{dest}: using the {kind} dataset already there"
    synth.generate(dest, **synth_params)
    (dest.parent / "SYNTHETIC").write_text("data/raw/kaggle_3m holds synthetic data (brainseg data synth)\n")
    status = dvc_track(dest) if use_dvc else ""
    return f"{dest}: no dataset imported, generated the synthetic default ({synth_params}). {status}"
