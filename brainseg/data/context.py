"""The prepared dataset a command works on: root, manifest, split, version and cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from brainseg.config import TrainConfig
from brainseg.data.arrays import load_arrays, load_full_masks
from brainseg.data.manifest import read_manifest
from brainseg.data.split import patients_in
from brainseg.data.version import data_version


@dataclasses.dataclass
class DataContext:
    root: Path
    manifest: pd.DataFrame
    split: pd.DataFrame
    version: str
    cache_dir: Path | None

    @classmethod
    def from_settings(cls, settings: dict) -> "DataContext":
        d = settings["data"]
        split_path = Path(d["split"])
        if not split_path.is_file():
            raise FileNotFoundError(f"{split_path}: split not found (run `brainseg data split` first)")
        root = Path(d["root"])
        return cls(root, read_manifest(Path(d["manifest"])), pd.read_csv(split_path), data_version(root),
                   Path(d["cache_dir"]) if d.get("cache_dir") else None)

    @classmethod
    def from_folder(cls, path: Path, cache_dir: Path | None = None) -> "DataContext":
        """A folder in the public layout, all of its patients in subset ``test`` (for evaluation)."""
        from brainseg.data.layout import find_root
        from brainseg.data.manifest import scan

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

    def arrays(self, subset: str, cfg: TrainConfig):
        from brainseg.train import Arrays  # TensorFlow only when arrays are needed

        rows = self.rows(subset)
        X, Y = load_arrays(rows, cfg.prep, cache_dir=self.cache_dir, version=self.version)
        return Arrays(X, Y, rows["patient"].tolist())

    def truths(self, subset: str):
        return load_full_masks(self.rows(subset))
