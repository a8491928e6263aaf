"""The prepared dataset a command works on: root, manifest, split, version and cache."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd

from brainseg.data.arrays import Arrays, load_arrays, load_full_masks
from brainseg.data.layout import find_root
from brainseg.data.manifest import patients_table, read_manifest, scan
from brainseg.data.split import patients_in, split_with
from brainseg.data.version import data_version
from brainseg.settings.config import Settings, Split, Train


@dataclasses.dataclass
class DataContext:
    root: Path
    manifest: pd.DataFrame
    split: pd.DataFrame
    version: str
    cache_dir: Path | None

    @classmethod
    def from_settings(cls, settings: Settings, echo=None, prepare: bool = True) -> "DataContext":
        """The dataset of ``settings.data``; with ``prepare`` the manifest and split are (re)built
        first when missing or stale for the current data version, saying so through ``echo``."""
        d = settings.data
        root, split_path = Path(d.root), Path(d.split)
        if prepare:
            ensure_prepared(settings, echo=echo)
        elif not split_path.is_file():
            raise FileNotFoundError(f"{split_path}: split not found (run `brainseg data split` first)")
        return cls(root, read_manifest(Path(d.manifest)), pd.read_csv(split_path), data_version(root),
                   Path(d.cache_dir) if d.cache_dir else None)

    @classmethod
    def from_folder(cls, path: Path, cache_dir: Path | None = None) -> "DataContext":
        """A folder in the public layout, all of its patients in subset ``test`` (for evaluation)."""
        root = find_root(Path(path))
        result = scan(root)
        if result.manifest.empty:
            raise ValueError(f"{path}: no usable slices ({len(result.problems)} problem(s), e.g. "
                             f"{result.problems[0] if result.problems else 'none'})")
        split = pd.DataFrame({"patient": sorted(result.manifest["patient"].unique())})
        split["subset"], split["fold"] = "test", 0
        return cls(root, result.manifest, split, data_version(root), cache_dir)

    def rows(self, subset: str) -> pd.DataFrame:
        """Manifest rows of the patients in ``subset`` (train, val, test, all, train+val, ...)."""
        keep = set(patients_in(self.split, subset))
        return self.manifest[self.manifest["patient"].isin(keep)].reset_index(drop=True)

    def arrays(self, subset: str, cfg: Train):
        rows = self.rows(subset)
        X, Y = load_arrays(rows, cfg.prep, cache_dir=self.cache_dir, version=self.version)
        return Arrays(X, Y, rows["patient"].tolist())

    def truths(self, subset: str):
        return load_full_masks(self.rows(subset))


# ------------------------------------------------------------ manifest and split, built when needed
def stamp_path(manifest_path: Path) -> Path:
    """``manifest.csv`` -> ``manifest.version.json`` (which data version the manifest was built from)."""
    return Path(manifest_path).with_suffix(".version.json")


def stamp_manifest(manifest_path: Path, root: Path, version: str | None = None) -> None:
    stamp_path(manifest_path).write_text(json.dumps({"root": str(Path(root).resolve()),
                                                     "data_version": version or data_version(root)}) + "\n")


def manifest_staleness(manifest_path: Path, root: Path, version: str) -> str | None:
    """Why the manifest must be rebuilt ("missing", "stale ..."), or None when it is current."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        return "missing"
    stamp = stamp_path(manifest_path)
    if stamp.is_file():
        try:
            meta = json.loads(stamp.read_text())
        except ValueError:
            return "has an unreadable version stamp"
        if meta.get("root") != str(Path(root).resolve()):
            return f"was built from another dataset folder ({meta.get('root')})"
        if meta.get("data_version") != version:
            return f"is stale (data version {str(meta.get('data_version'))[:12]}, now {version[:12]})"
        return None
    try:  # a manifest from before version stamps: current while every file it names exists
        m = read_manifest(manifest_path)
        paths = list(m.get("image_path", [])) + list(m.get("mask_path", []))
    except (ValueError, KeyError, pd.errors.ParserError):
        return "is unreadable"
    if not paths or not all(Path(p).is_file() for p in paths):
        return "names files that no longer exist"
    return None


def build_split(manifest: pd.DataFrame, sp: Split) -> pd.DataFrame:
    """The patient split of ``brainseg data split`` for ``manifest`` with the ``split`` settings."""
    return split_with(patients_table(manifest), sp)


def ensure_prepared(settings: Settings, echo=None) -> list[str]:
    """Build ``data.manifest`` and ``data.split`` when missing or stale; returns what was done.

    Raises FileNotFoundError when there is no dataset and ValueError (naming the first bad file)
    when the dataset has problems, before anything is written.
    """
    say = echo or (lambda line: print(line, file=sys.stderr))
    d = settings.data
    root, manifest_path, split_path = Path(d.root), Path(d.manifest), Path(d.split)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset not found (run `brainseg data import PATH`, or "
                                "`brainseg data prepare` for the synthetic default)")
    done = []
    version = data_version(root)
    reason = manifest_staleness(manifest_path, root, version)
    if reason:
        result = scan(root)
        if not result.ok:
            raise ValueError(f"{root}: {len(result.problems)} problem(s), e.g. {result.problems[0]}; "
                             f"see them all with `brainseg data validate {root}`")
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        result.manifest.to_csv(manifest_path, index=False)
        stamp_manifest(manifest_path, root, version)
        s = result.summary()
        done.append(f"manifest {reason}: built {manifest_path} ({s['patients']} patients, {s['slices']} slices "
                    f"of data {version[:12]})")
        say(done[-1])
    manifest = read_manifest(manifest_path)
    split_reason = None
    if not split_path.is_file():
        split_reason = "missing"
    else:
        try:
            current = pd.read_csv(split_path)
            if set(current["patient"]) != set(manifest["patient"]):
                split_reason = "does not match the manifest's patients"
        except (ValueError, KeyError, pd.errors.ParserError):
            split_reason = "is unreadable"
    if split_reason:
        split = build_split(manifest, settings.split)
        split_path.parent.mkdir(parents=True, exist_ok=True)
        split.to_csv(split_path, index=False)
        counts = split["subset"].value_counts().to_dict()
        done.append(f"split {split_reason}: built {split_path} (" + ", ".join(
            f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test")) + " patients)")
        say(done[-1])
    return done
