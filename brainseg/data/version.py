"""The dataset's version for lineage tags: the DVC hash of the data folder."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml


def data_version(root: Path) -> str:
    """DVC's md5 of ``root`` from ``<root>.dvc`` when the folder is DVC-tracked.

    Without a ``.dvc`` file (a folder given on the command line) it is a hash of the file names,
    sizes and modification times, prefixed ``files-`` so it is never mistaken for a DVC hash.
    """
    root = Path(root)
    dvc_file = root.with_name(root.name + ".dvc")
    if dvc_file.is_file():
        try:
            outs = yaml.safe_load(dvc_file.read_text()).get("outs", [])
            if outs and outs[0].get("md5"):
                return str(outs[0]["md5"]).removesuffix(".dir")
        except (yaml.YAMLError, AttributeError):
            pass
    h = hashlib.md5()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return "files-" + h.hexdigest()


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
