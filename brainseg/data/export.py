"""``brainseg data export --format nnunet DEST``: the dataset as nnU-Net v2's raw dataset.

nnU-Net v2's layout (its documentation/dataset_format.md): ``imagesTr/<case>_<XXXX>.nii.gz``, one
file per input channel, ``labelsTr/<case>.nii.gz`` (0 background, 1 FLAIR abnormality),
``imagesTs/`` for the test cases, and ``dataset.json`` with ``channel_names``, ``labels``,
``numTraining`` and ``file_ending``. The platform's own split comes along as ``splits_final.json``
(nnU-Net's format: one ``{"train": [...], "val": [...]}`` per fold; copy it into
``nnUNet_preprocessed/<dataset>/``): fold k holds out the non-test patients of the split's
``fold`` k, as ``brainseg cv`` does. Test patients go to ``imagesTs/`` and, for scoring a
prediction, their masks to ``labelsTs/``.

A case is a patient (``TCGA_CS_4941``); channels: ``_0000`` FLAIR, ``_0001`` pre-contrast T1,
``_0002`` post-contrast T1 (the Kaggle slices' green, red and blue). The TIFF slices carry no
spacing: the volumes are written with 1 x 1 x 1 mm voxels (stated in dataset.json and each
file's ``descrip``; qform/sform code 2, "aligned", not scanner coordinates) and stored as
(column, row, slice) with the affine ``diag(-1, -1, 1)``: columns towards the patient's left,
rows posterior, slices superior (LPS+, a DICOM axial stack; :mod:`brainseg.data.scan` states the
orientation assumption). ``brainseg predict --flair <case>_0000.nii.gz --pre <case>_0001.nii.gz
--post <case>_0002.nii.gz`` reads them back into exactly the original slices.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data import imageio
from brainseg.data.nifti import write_nifti
from brainseg.data.scan import Geometry

CHANNELS = {"0": "FLAIR", "1": "T1_pre_contrast", "2": "T1_post_contrast"}
RGB_OF_CHANNEL = (1, 0, 2)  # the Kaggle slice's channel (R pre, G FLAIR, B post) for _0000, _0001, _0002
LABELS = {"background": 0, "FLAIR abnormality": 1}
TIFF_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # (column, row, slice) -> mm: LPS+ axes, 1 mm (spacing unknown)
FILE_ENDING = ".nii.gz"


def tiff_geometry(slices: int, height: int, width: int, source: str) -> Geometry:
    """Where a stack of Kaggle slices is written: stored (column, row, slice), :data:`TIFF_AFFINE`."""
    return Geometry(source, "tiff", TIFF_AFFINE.copy(), (width, height, slices), None, ())


def patient_stack(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """A patient's manifest rows (sorted by slice) -> ((Z, H, W, 3) uint8 images, (Z, H, W) bool masks)."""
    pairs = [imageio.read_pair(Path(r.image_path), Path(r.mask_path)) for r in rows.itertuples()]
    shapes = {im.shape for im, _ in pairs}
    if len(shapes) > 1:
        raise ValueError(f"patient {rows['patient'].iloc[0]}: slices of different sizes {sorted(shapes)}")
    return np.stack([im for im, _ in pairs]), np.stack([m for _, m in pairs])


def nnunet_splits(split: pd.DataFrame) -> list[dict]:
    """nnU-Net's ``splits_final.json`` from the platform's split: fold k validates on the non-test
    patients of ``fold`` k and trains on the other non-test patients.

    >>> s = pd.DataFrame({"patient": list("abcde"), "subset": ["train", "val", "train", "val", "test"],
    ...                   "fold": [0, 1, 0, 1, 0]})
    >>> nnunet_splits(s)
    [{'train': ['b', 'd'], 'val': ['a', 'c']}, {'train': ['a', 'c'], 'val': ['b', 'd']}]
    """
    pool = split[split["subset"] != "test"]
    return [{"train": sorted(pool.loc[pool["fold"] != k, "patient"]), "val": sorted(pool.loc[pool["fold"] == k,
                                                                                              "patient"])}
            for k in sorted(int(k) for k in pool["fold"].unique())]


def dataset_json(training: int, test: int, name: str, version: str) -> dict:
    """The fields nnU-Net v2 reads (channel_names, labels, numTraining, file_ending), plus what
    the files do not say (the spacing convention, the orientation, the data version)."""
    return {
        "channel_names": CHANNELS, "labels": LABELS, "numTraining": training, "file_ending": FILE_ENDING,
        "name": name, "numTest": test,
        "description": "TCGA-LGG FLAIR abnormality (kaggle_3m slices stacked per patient) exported by brainseg",
        "spacing": "unknown: the TIFF slices carry none; 1 x 1 x 1 mm written",
        "orientation": "stored (column, row, slice) = (right->left, anterior->posterior, inferior->superior), "
                       "LPS+; right-left is an assumption (radiological display)",
        "brainseg_data_version": version,
    }


def _write_case(images: np.ndarray, masks: np.ndarray, case: str, folder: Path, labels: Path) -> None:
    geometry = tiff_geometry(*images.shape[:3], source=case)
    for channel, rgb in enumerate(RGB_OF_CHANNEL):
        write_nifti(images[..., rgb], geometry, folder / f"{case}_{channel:04d}{FILE_ENDING}", np.uint8)
    write_nifti(masks, geometry, labels / f"{case}{FILE_ENDING}", np.uint8)


def check_destination(dest: Path) -> None:
    """FileExistsError unless ``dest`` is absent or an empty folder (an export never replaces anything)."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest}: exists and is not an empty folder; not replaced")


def export_nnunet(manifest: pd.DataFrame, split: pd.DataFrame, dest: Path, *, version: str = "",
                  echo=None) -> dict:
    """Write the patients of ``manifest`` (MANIFEST_COLUMNS) as nnU-Net v2's raw dataset in ``dest``
    (which must not exist or be empty), split by ``split`` (patient, subset, fold). Everything is
    written into a temporary folder beside ``dest`` and renamed into place. Returns a summary."""
    dest = Path(dest)
    check_destination(dest)
    subsets = dict(zip(split["patient"], split["subset"]))
    unknown = sorted(set(manifest["patient"]) - set(subsets))
    if unknown:
        raise ValueError(f"patients missing from the split: {', '.join(unknown[:5])} (run `brainseg data split`)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.part-", dir=dest.parent))
    counts = {"train": 0, "test": 0}
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        for patient, rows in manifest.sort_values(["patient", "slice"]).groupby("patient", sort=True):
            test = subsets[patient] == "test"
            images, masks = patient_stack(rows)
            _write_case(images, masks, patient, tmp / ("imagesTs" if test else "imagesTr"),
                        tmp / ("labelsTs" if test else "labelsTr"))
            counts["test" if test else "train"] += 1
            if echo:
                echo(f"{patient}: {len(rows)} slices -> {'imagesTs' if test else 'imagesTr'}")
        doc = dataset_json(counts["train"], counts["test"], dest.name, version)
        (tmp / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
        splits = nnunet_splits(split[split["patient"].isin(set(manifest["patient"]))])
        (tmp / "splits_final.json").write_text(json.dumps(splits, indent=2) + "\n")
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dest": str(dest), "training": counts["train"], "test": counts["test"], "folds": len(splits)}
