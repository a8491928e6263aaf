"""The real sample as scanner files: each patient's three sequences as NIfTI volumes (0.9 x 0.9 x
3.3 mm, stored RAS so two axes are flipped against the model's, a non-zero origin) and as DICOM
series (pydicom). `brainseg predict --flair --pre --post` must give, slice for slice, the masks
`brainseg predict` gives on the original TIFF slices, in the input's own geometry, with the volume
in mL = voxels x voxel volume; the nnU-Net export reads back to the same masks.

The model is a fixed-weight network (no training, no randomness: sigmoid of a weighted sum of the
z-scored channels; :func:`scan_files.fixed_model`), with the head crop and the 3-D post-processing
on, so every step of the TIFF path runs and a swapped channel would change the masks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import tifffile
from pydicom.uid import generate_uid
from scan_files import fixed_model, stored_layout, write_dicom_series, write_nifti
from typer.testing import CliRunner

from brainseg.cli import app
from brainseg.data import imageio
from brainseg.data.volumes import read_scan

pytestmark = [pytest.mark.real, pytest.mark.slow]
SEQUENCES = {"pre": 0, "flair": 1, "post": 2}  # the Kaggle slice's RGB channels


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def patient_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def stack(folder: Path) -> np.ndarray:
    """(Z, H, W, 3) uint8: a patient's slices in slice-number order (1 = most inferior)."""
    n = len([p for p in folder.glob("*.tif") if not p.stem.endswith("_mask")])
    return np.stack([tifffile.imread(folder / f"{folder.name}_{k}.tif") for k in range(1, n + 1)])


def tiff_masks(out: Path, folder: Path, n: int) -> np.ndarray:
    """The TIFF path's masks of ``folder``'s slices 1..n, wherever under ``out`` predict put them."""
    def found(k: int) -> Path:
        (path,) = out.rglob(f"{folder.name}_{k}_pred.png")
        return path

    return np.stack([imageio.read_mask(found(k)) for k in range(1, n + 1)])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scans")


@pytest.fixture(scope="module")
def models(work) -> dict[str, Path]:
    return {"all": fixed_model(work / "model-all", "all"), "flair": fixed_model(work / "model-flair", "flair")}


@pytest.fixture(scope="module")
def tiff_prediction(real_sample, models, work) -> Path:
    """`brainseg predict` on the original TIFF slices of the sample (the reference)."""
    code, output = invoke("predict", real_sample, "--out", work / "tiff", "--model", models["all"])
    assert code == 0, output
    return work / "tiff"


@pytest.fixture(scope="module")
def scans(real_sample, work) -> dict[str, dict]:
    """Per patient: the NIfTI files and the DICOM series folders of its three sequences."""
    out = {}
    for folder in patient_dirs(real_sample):
        images, files = stack(folder), {"nifti": {}, "dicom": {}}
        target = work / "nifti" / folder.name
        target.mkdir(parents=True)
        study, frame = generate_uid(), generate_uid()  # the three series of a patient share a study and frame
        for seq, channel in SEQUENCES.items():
            files["nifti"][seq] = write_nifti(images[..., channel], target / f"{seq}.nii.gz", ("R", "A", "S"))
            files["dicom"][seq] = write_dicom_series(images[..., channel], work / "dicom" / folder.name / seq,
                                                     study_uid=study, frame_uid=frame, description=seq)
        out[folder.name] = files
    return out


def predict_volumes(files: dict, out: Path, model: Path, name: str, *extra) -> pd.Series:
    code, output = invoke("predict", "--flair", files["flair"], "--pre", files["pre"], "--post", files["post"],
                          "--name", name, "--out", out, "--model", model, *extra)
    assert code == 0, output
    assert f"{name}: " in output and "mL" in output
    return pd.read_csv(out / "patients.csv").iloc[0]


def test_nifti_volumes_give_the_tiff_masks_in_their_own_geometry_and_ml(real_sample, scans, models,
                                                                        tiff_prediction, work):
    for folder in patient_dirs(real_sample):
        files = scans[folder.name]["nifti"]
        row = predict_volumes(files, work / "out-nifti", models["all"], folder.name)
        mask_file = work / "out-nifti" / f"{folder.name}_mask.nii.gz"
        mask, flair = nib.load(mask_file), nib.load(files["flair"])
        assert np.array_equal(mask.affine, flair.affine) and mask.shape == flair.shape  # exactly its geometry
        model_mask = read_scan(mask_file).array.astype(bool)
        expected = tiff_masks(tiff_prediction, folder, len(model_mask))
        assert np.array_equal(model_mask, expected), folder.name  # slice for slice
        voxels = int(np.asarray(mask.dataobj).sum())
        assert row["tumor_volume_px"] == voxels == int(expected.sum())
        assert row["tumor_volume_ml"] == pytest.approx(voxels * 0.9 * 0.9 * 3.3 / 1000, rel=1e-6)
        assert row["coordinates"] == "RAS" and row["spacing_mm"] == "0.9x0.9x3.3"
    slices = pd.read_csv(work / "out-nifti" / "features.csv")  # the last patient's
    assert slices["area_px"].sum() > 0 and np.allclose(slices["area_mm2"], slices["area_px"] * 0.81)
    tiff_rows = pd.read_csv(tiff_prediction / "features.csv")
    assert tiff_rows["area_mm2"].isna().all()  # the TIFF path claims no millimetres: the column is empty


def test_dicom_series_give_the_tiff_masks_a_nifti_mask_and_a_seg(real_sample, scans, models, tiff_prediction, work):
    for folder in patient_dirs(real_sample):
        files = scans[folder.name]["dicom"]
        row = predict_volumes(files, work / "out-dicom", models["all"], folder.name)
        mask_file = work / "out-dicom" / row["mask_file"]
        geometry = read_scan(files["flair"]).geometry
        mask = nib.load(mask_file)
        assert mask.shape == geometry.shape and np.allclose(mask.affine, geometry.affine, atol=1e-4)
        model_mask = read_scan(mask_file).array.astype(bool)
        assert np.array_equal(model_mask, tiff_masks(tiff_prediction, folder, len(model_mask))), folder.name
        seg = hd.seg.segread(work / "out-dicom" / row["seg_file"])
        assert seg.number_of_frames == len(model_mask)
    assert not math.isnan(row["centroid_r_mm"]) and row["extent_si_mm"] > 0


def test_a_copy_in_another_orientation_gives_the_same_mask_in_its_own_geometry(real_sample, scans, models, work):
    folder = patient_dirs(real_sample)[0]
    images = stack(folder)
    axcodes = ("P", "I", "R")
    files = {seq: write_nifti(images[..., c], work / f"{seq}-pir.nii.gz", axcodes) for seq, c in SEQUENCES.items()}
    files["pre"] = scans[folder.name]["nifti"]["pre"]  # stored RAS: another storage of the same grid is fine
    predict_volumes(files, work / "out-pir", models["all"], folder.name)
    reference = read_scan(work / "out-nifti" / f"{folder.name}_mask.nii.gz").array
    mask = nib.load(work / "out-pir" / f"{folder.name}_mask.nii.gz")
    assert np.array_equal(mask.affine, nib.load(files["flair"]).affine)
    assert np.array_equal(np.asarray(mask.dataobj), stored_layout(reference, axcodes)[0])


def test_a_flair_only_model_reads_flair_alone_and_a_three_channel_model_is_refused(real_sample, scans, models,
                                                                                    work):
    folder = patient_dirs(real_sample)[0]
    flair = scans[folder.name]["nifti"]["flair"]
    code, output = invoke("predict", "--flair", flair, "--out", work / "refused", "--model", models["all"])
    assert code == 2 and output.count("\n") == 1
    assert f"{models['all']}: this model reads 3 channels" in output and "give --pre and --post too" in output
    assert not any((work / "refused").iterdir())
    grey = work / "grey" / folder.name  # the TIFF path's FLAIR-only input: grey slices, taken as FLAIR
    grey.mkdir(parents=True)
    for k, image in enumerate(stack(folder), start=1):
        tifffile.imwrite(grey / f"{folder.name}_{k}.tif", image[..., 1])
    code, output = invoke("predict", grey, "--out", work / "tiff-flair", "--model", models["flair"])
    assert code == 0, output
    code, output = invoke("predict", "--flair", flair, "--out", work / "flair-only", "--model", models["flair"],
                          "--name", folder.name)
    assert code == 0, output
    got = read_scan(work / "flair-only" / f"{folder.name}_mask.nii.gz").array.astype(bool)
    assert np.array_equal(got, tiff_masks(work / "tiff-flair", folder, len(got)))


def test_resample_puts_a_sequence_on_another_grid_onto_the_flairs(real_sample, scans, models, work):
    folder = patient_dirs(real_sample)[0]
    images = stack(folder)
    files = dict(scans[folder.name]["nifti"])
    # the same post-contrast anatomy on another grid: one more slice, below the FLAIR's first
    post = np.concatenate([np.zeros_like(images[:1, ..., 2]), images[..., 2]])
    files["post"] = write_nifti(post, work / "post-down.nii.gz", origin=(12.5, -30.25, 41.0 - 3.3))
    code, output = invoke("predict", "--flair", files["flair"], "--pre", files["pre"], "--post", files["post"],
                          "--out", work / "no-resample", "--model", models["all"])
    assert code == 2 and "not on the grid of" in output and "--resample" in output
    row = predict_volumes(files, work / "resampled", models["all"], folder.name, "--resample")
    assert row["resampled"] == "post"
    got = read_scan(work / "resampled" / f"{folder.name}_mask.nii.gz").array.astype(bool)
    reference = read_scan(work / "out-nifti" / f"{folder.name}_mask.nii.gz").array.astype(bool)
    assert np.array_equal(got, reference)


def test_the_nnunet_export_opens_with_nibabel_and_reads_back_to_the_tiff_masks(real_sample, models, tiff_prediction,
                                                                               work):
    dest = work / "nnUNet_raw" / "Dataset501_LGG"
    sets = [f"data.root={real_sample}", f"data.manifest={work / 'manifest.csv'}", f"data.split={work / 'split.csv'}",
            f"data.cache_dir={work / 'cache'}"]
    code, output = invoke("data", "export", dest, "--format", "nnunet", *[a for s in sets for a in ("--set", s)])
    assert code == 0, output
    doc = json.loads((dest / "dataset.json").read_text())
    assert doc["channel_names"] == {"0": "FLAIR", "1": "T1_pre_contrast", "2": "T1_post_contrast"}
    assert doc["labels"] == {"background": 0, "FLAIR abnormality": 1} and doc["file_ending"] == ".nii.gz"
    train_cases = sorted(p.name[:-len(".nii.gz")] for p in (dest / "labelsTr").iterdir())
    test_cases = sorted(p.name[:-len(".nii.gz")] for p in (dest / "labelsTs").iterdir())
    assert doc["numTraining"] == len(train_cases) and len(train_cases) + len(test_cases) == 6 and test_cases
    assert sorted(p.name for p in (dest / "imagesTr").iterdir()) == sorted(
        f"{c}_{k:04d}.nii.gz" for c in train_cases for k in range(3))
    split = pd.read_csv(work / "split.csv")
    folds = json.loads((dest / "splits_final.json").read_text())
    assert sorted(p for f in folds for p in f["val"]) == train_cases == sorted(split.loc[split.subset != "test",
                                                                                         "patient"])
    for f in folds:
        assert sorted(f["train"] + f["val"]) == train_cases
    for path in dest.rglob("*.nii.gz"):
        data = nib.load(path).get_fdata()
        assert data.ndim == 3
        if path.parent.name.startswith("labels"):
            assert set(np.unique(data)) <= {0.0, 1.0}  # labels as dataset.json declares them
    folders = {d.name.rsplit("_", 1)[0]: d for d in patient_dirs(real_sample)}
    for case, where in ((train_cases[0], "Tr"), (test_cases[0], "Ts")):
        images = {k: dest / f"images{where}" / f"{case}_{c:04d}.nii.gz" for k, c in (("flair", 0), ("pre", 1),
                                                                                      ("post", 2))}
        row = predict_volumes(images, work / "from-export", models["all"], case)
        got = read_scan(work / "from-export" / row["mask_file"]).array.astype(bool)
        assert np.array_equal(got, tiff_masks(tiff_prediction, folders[case], len(got))), case
        assert math.isnan(row["tumor_volume_ml"]) and row["spacing_mm"] == "unknown"  # no millimetres claimed
        truth = read_scan(dest / f"labels{where}" / f"{case}.nii.gz").array.astype(bool)
        assert np.array_equal(truth, stack_masks(folders[case]))


def stack_masks(folder: Path) -> np.ndarray:
    n = len([p for p in folder.glob("*.tif") if not p.stem.endswith("_mask")])
    return np.stack([imageio.read_mask(folder / f"{folder.name}_{k}_mask.tif") for k in range(1, n + 1)])


def test_a_series_highdicom_cannot_reference_still_gets_its_nifti_mask_and_one_bad_line(real_sample, models, work):
    folder = patient_dirs(real_sample)[0]
    series = write_dicom_series(stack(folder)[..., 1], work / "no-frame" / "flair")
    for f in series.iterdir():  # no FrameOfReferenceUID: readable, but a SEG cannot reference it
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    code, output = invoke("predict", "--flair", series, "--out", work / "no-frame-out", "--model", models["flair"])
    assert code == 1, output
    bad = [line for line in output.splitlines() if line.startswith("BAD ")]
    assert bad == [f"BAD {series}: no DICOM SEG written (Source images have no Frame Of Reference UID, but it is "
                   "required by the IOD.); the NIfTI mask and the rest are"]
    assert (work / "no-frame-out" / "flair_mask.nii.gz").is_file()
    assert not list((work / "no-frame-out").glob("*.dcm"))
    assert pd.read_csv(work / "no-frame-out" / "patients.csv")["seg_file"].isna().all()
