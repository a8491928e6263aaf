"""`brainseg data import` of patients given as volumes (issue 35, item 5).

Synthetic volumes (fast): BraTS and nnU-Net names, the label rule, the in-plane resize to 256 x 256
with its spacing, the spacing in the manifest, and every refusal as one line naming the file, with
nothing replaced at --dest. The real 6-patient sample (slow): each patient's three sequences and a
multi-class label written as NIfTI (0.9 x 0.9 x 3.3 mm, stored RAS, a non-zero origin) in BraTS
names are imported (no outcome table, as BraTS gives none) into a fresh clone, back into exactly the
original slices and masks; then `brainseg run --profile smoke` validates, splits, tunes, registers and
promotes the segmenter and reports on the test patient, while its survival stage (and the out-of-fold
segmenters that serve only it) is skipped in one line naming the reason (data.csv has no death01) and
no survival model is registered; `dvc status` is clean after it, and the champion's evaluation of
all 6 patients reports the volumes in mL and HD95 in mm. The skip itself, fast and synthetic:
tests/outcome/test_survival_skip.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scan_files import SPACING, write_nifti

from brainseg.data.manifest import SIDECAR, read_manifest
from conftest import Tracking
from helpers import copy_checkout, invoke_flat, pipeline_env, project_files, tree

BRATS = {"flair": ("flair", 1), "pre": ("t1", 0), "post": ("t1ce", 2)}  # sequence: (BraTS suffix, RGB channel)


def synthetic_patient(seed: int, z: int = 8, h: int = 256, w: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W, 3) uint8 slices and a (Z, H, W) label of values 0, 1, 2, 4 (BraTS' classes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 255, (z, h, w, 3)).astype(np.uint8)
    label = np.zeros((z, h, w), np.uint8)
    label[2:6, 10:30, 10:30] = 2
    label[3:5, 14:20, 14:20] = 1
    label[3:5, 22:26, 22:26] = 4
    return images, label


def write_brats(folder: Path, images: np.ndarray, label: np.ndarray, name: str | None = None, **kwargs) -> Path:
    """One BraTS-style patient folder: <name>_flair/_t1/_t1ce/_seg.nii.gz (stored RAS, 0.9 x 0.9 x 3.3 mm)."""
    name = name or folder.name
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, channel in BRATS.values():
        write_nifti(images[..., channel], folder / f"{name}_{suffix}.nii.gz", **kwargs)
    write_nifti(label, folder / f"{name}_seg.nii.gz", **kwargs)
    return folder


def slices_of(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    n = len(list(folder.glob("*_mask.tif")))
    images = np.stack([tifffile.imread(folder / f"{folder.name}_{k}.tif") for k in range(1, n + 1)])
    masks = np.stack([tifffile.imread(folder / f"{folder.name}_{k}_mask.tif") for k in range(1, n + 1)])
    return images, masks


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    root = project_files(tmp_path / "project")
    monkeypatch.chdir(root)
    return root


# ---------------------------------------------------------------------------------- synthetic
def test_brats_folders_become_the_kaggle_layout_with_their_spacing(project, tmp_path):
    src = tmp_path / "BraTS"
    for k in (1, 2, 3):
        write_brats(src / f"BraTS20_Training_00{k}", *synthetic_patient(k))
    code, output = invoke_flat("data", "import", src, "--no-dvc")
    assert code == 0, output
    assert "imported 3 patients given as volumes, 24 slices" in output
    assert "label rule any: label > 0 (BraTS whole tumour); label values found (voxels): 0: " in output
    assert "BraTS20_Training_001 -> TCGA_IM_0001_00000000" in output
    root = project / "data/raw/kaggle_3m"
    images, masks = slices_of(root / "TCGA_IM_0001_00000000")
    expected_images, label = synthetic_patient(1)
    assert images.shape == (8, 256, 256, 3) and np.array_equal(images, expected_images)  # pre, FLAIR, post as RGB
    assert np.array_equal(masks, (label > 0).astype(np.uint8) * 255)  # whole tumour: 1, 2 and 4
    car = json.loads((root / "TCGA_IM_0001_00000000" / SIDECAR).read_text())
    assert car["source_patient"] == "BraTS20_Training_001" and car["spacing_mm"] == [3.3, 0.9, 0.9]
    assert car["label_values"] == {"0": int((label == 0).sum()), "1": 72, "2": int((label == 2).sum()), "4": 32}
    assert pd.read_csv(root / "data.csv")["Patient"].tolist() == [f"TCGA_IM_000{k}" for k in (1, 2, 3)]
    code, output = invoke_flat("data", "manifest")
    assert code == 0, output
    manifest = read_manifest(project / "data/processed/manifest.csv")
    assert set(manifest["spacing_mm"]) == {"3.3,0.9,0.9"}
    marker = json.loads((project / "data/raw/kaggle_3m.import.json").read_text())
    assert marker["kind"] == "volumes" and marker["patient_names"]["TCGA_IM_0002_00000000"] == "BraTS20_Training_002"


def test_a_label_rule_of_values_keeps_those_classes(project, tmp_path):
    write_brats(tmp_path / "src" / "case_a", *synthetic_patient(1))
    code, output = invoke_flat("data", "import", tmp_path / "src", "--no-dvc", "--label-rule", "1,4")
    assert code == 0, output
    assert "label rule values: label in {1, 4}" in output
    _, masks = slices_of(project / "data/raw/kaggle_3m/TCGA_IM_0001_00000000")
    label = synthetic_patient(1)[1]
    assert np.array_equal(masks > 0, np.isin(label, (1, 4)))


def test_a_plane_of_another_size_is_padded_square_and_resized_with_its_spacing(project, tmp_path):
    images, label = synthetic_patient(4, z=6, h=240, w=200)
    label[:] = 0
    label[2, 100:140, 80:120] = 1
    write_brats(tmp_path / "src" / "p", images, label)
    code, output = invoke_flat("data", "import", tmp_path / "src", "--no-dvc")
    assert code == 0, output
    assert "resized: 240x200 zero-padded to 240x240, resized to 256x256 (images bilinear, masks nearest)" in output
    folder = project / "data/raw/kaggle_3m/TCGA_IM_0001_00000000"
    got_images, masks = slices_of(folder)
    assert got_images.shape == (6, 256, 256, 3) and set(np.unique(masks)) <= {0, 255}
    car = json.loads((folder / SIDECAR).read_text())
    assert car["spacing_mm"] == [3.3, 0.84375, 0.84375]  # 0.9 mm x 240 / 256
    area_mm2 = (masks[2] > 0).sum() * 0.84375 ** 2
    assert area_mm2 == pytest.approx(40 * 40 * 0.81, rel=0.05)  # the same tumour, in mm^2
    assert not got_images[:, :, :8].any()  # the zero padding (20 px each side, scaled)


def test_nnunet_channels_are_read_from_dataset_json(project, tmp_path):
    src = tmp_path / "Dataset137_BraTS"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    images, label = synthetic_patient(2)
    order = {"0": ("T1", 0), "1": ("T1ce", 2), "2": ("T2", 1), "3": ("FLAIR", 1)}  # BraTS in nnU-Net's order
    for key, (_, channel) in order.items():
        data = images[..., channel] if key != "2" else 255 - images[..., 1]  # T2: not read
        write_nifti(data, src / "imagesTr" / f"BRATS_001_{int(key):04d}.nii.gz")
    write_nifti(label, src / "labelsTr" / "BRATS_001.nii.gz")
    (src / "dataset.json").write_text(json.dumps({"channel_names": {k: v for k, (v, _) in order.items()},
                                                  "labels": {"background": 0}, "file_ending": ".nii.gz"}))
    code, output = invoke_flat("data", "import", src, "--no-dvc")
    assert code == 0, output
    got, masks = slices_of(project / "data/raw/kaggle_3m/TCGA_IM_0001_00000000")
    assert np.array_equal(got, images) and np.array_equal(masks > 0, label > 0)


def test_brainsegs_own_nnunet_export_imports_back_to_its_slices_without_a_spacing(project, tmp_path):
    from brainseg.data.synth import generate

    root = generate(tmp_path / "kaggle_3m", patients=4, slices=5, size=256, seed=2)
    sets = [f"data.root={root}", f"data.manifest={tmp_path / 'm.csv'}", f"data.split={tmp_path / 's.csv'}",
            f"data.cache_dir={tmp_path / 'cache'}", "split.val_fraction=0.25", "split.test_fraction=0.25"]
    dest = tmp_path / "Dataset501_LGG"
    code, output = invoke_flat("data", "export", dest, "--format", "nnunet", *[a for s in sets for a in ("--set", s)])
    assert code == 0, output
    code, output = invoke_flat("data", "import", dest, "--no-dvc")
    assert code == 0, output
    assert "spacing unknown (a volume stacked from slices)" in output
    cases = sorted(p.name[: -len(".nii.gz")] for p in (dest / "labelsTr").iterdir())
    assert len(cases) >= 2
    for case in cases:  # the patient ids are kept, the scan date is unknown
        images, masks = slices_of(project / "data/raw/kaggle_3m" / f"{case}_00000000")
        (original,) = root.glob(f"{case}_*")
        assert np.array_equal(images, slices_of(original)[0]) and np.array_equal(masks > 0, slices_of(original)[1] > 0)
    assert invoke_flat("data", "manifest")[0] == 0
    assert read_manifest(project / "data/processed/manifest.csv")["spacing_mm"].isna().all()  # unknown, not 1 mm


def bad_sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    images, label = synthetic_patient(1)
    cases = {}
    src = write_brats(tmp_path / "shifted" / "p1", images, label)
    write_nifti(label, src / "p1_seg.nii.gz", origin=(0.0, 0.0, 0.0))
    cases["label on another grid"] = (tmp_path / "shifted", f"{src / 'p1_seg.nii.gz'}: the label is not on the grid "
                                                            f"of {src / 'p1_flair.nii.gz'} (origin")
    src = write_brats(tmp_path / "nolabel" / "p1", images, label)
    (src / "p1_seg.nii.gz").unlink()
    cases["no label"] = (tmp_path / "nolabel", f"{src}: no label file (patterns")
    src = write_brats(tmp_path / "twice" / "p1", images, label)
    write_nifti(images[..., 1], src / "copy_flair.nii.gz")
    cases["two FLAIRs"] = (tmp_path / "twice", f"{src}: 2 files match the flair patterns")
    src = write_brats(tmp_path / "floaty" / "p1", images, label)
    write_nifti(label.astype(np.float32) * 0.5, src / "p1_seg.nii.gz")
    cases["fractional label"] = (tmp_path / "floaty", f"{src / 'p1_seg.nii.gz'}: label voxels are not whole numbers")
    src = write_brats(tmp_path / "pregrid" / "p1", images, label)
    write_nifti(images[1:, ..., 0], src / "p1_t1.nii.gz")
    cases["pre on another grid"] = (tmp_path / "pregrid", f"{src / 'p1_t1.nii.gz'}: not on the grid of "
                                                          f"{src / 'p1_flair.nii.gz'} (shape 7x256x256 vs 8x256x256")
    cases["no volumes"] = (tmp_path / "empty", f"{tmp_path / 'empty'}: no patient volumes found")
    (tmp_path / "empty").mkdir()
    return cases


def test_each_bad_source_is_one_line_and_nothing_is_replaced(project, tmp_path):
    write_brats(tmp_path / "good" / "p1", *synthetic_patient(1))
    assert invoke_flat("data", "import", tmp_path / "good", "--no-dvc")[0] == 0
    before = tree(project / "data/raw")
    for case, (src, words) in bad_sources(tmp_path).items():
        args = ("--flair", "*_flair.nii.gz") if case == "no volumes" else ()
        code, output = invoke_flat("data", "import", src, "--no-dvc", *args)
        assert code == 2 and words in output and "Traceback" not in output, (case, output)
        assert output.startswith("error: ") and output.count("error:") == 1, (case, output)
        assert tree(project / "data/raw") == before, case  # nothing replaced, nothing left behind
    code, output = invoke_flat("data", "import", tmp_path / "good", "--no-dvc", "--label-rule", "0")
    assert code == 2 and "--label-rule '0': give 'any' (label > 0) or label values > 0" in output


def test_a_clinical_table_follows_the_patients_under_their_new_names(project, tmp_path):
    for k in (1, 2):
        write_brats(tmp_path / "src" / f"case{k}", *synthetic_patient(k))
    (tmp_path / "clinical.csv").write_text("Patient,death01,age_at_initial_pathologic\ncase1,1,50\ncase2,0,61\n"
                                           "other,1,40\n")
    code, output = invoke_flat("data", "import", tmp_path / "src", "--no-dvc", "--clinical", tmp_path / "clinical.csv")
    assert code == 0, output
    table = pd.read_csv(project / "data/raw/kaggle_3m/data.csv")
    assert table[["Patient", "death01"]].values.tolist() == [["TCGA_IM_0001", 1], ["TCGA_IM_0002", 0]]


# ---------------------------------------------------------------------------------- the real sample
@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_real_sample_as_volumes_imports_and_brainseg_run_trains_registers_and_evaluates_in_ml(
        real_sample, tmp_path, monkeypatch):
    src = tmp_path / "volumes"
    originals = {}
    for k, folder in enumerate(sorted(p for p in real_sample.iterdir() if p.is_dir()), start=1):
        n = len(list(folder.glob("*_mask.tif")))
        images = np.stack([tifffile.imread(folder / f"{folder.name}_{i}.tif") for i in range(1, n + 1)])
        masks = np.stack([tifffile.imread(folder / f"{folder.name}_{i}_mask.tif") for i in range(1, n + 1)]) > 0
        label = masks.astype(np.uint8) * 2  # BraTS' edema class, with a core of class 1
        label[masks & (np.arange(256)[None, None, :] % 3 == 0)] = 1
        write_brats(src / f"Site_Patient_{k:02d}", images, label)
        originals[f"TCGA_IM_{k:04d}_00000000"] = (images, masks)
    project = copy_checkout(tmp_path / "clone")  # a fresh clone: git and DVC, as a user has it
    monkeypatch.chdir(project)
    code, output = invoke_flat("data", "import", src)  # no --clinical: no outcome table, as BraTS gives
    assert code == 0, output
    assert "imported 6 patients given as volumes, 176 slices" in output and "tracked by DVC" in output
    root = project / "data/raw/kaggle_3m"
    for name, (images, masks) in originals.items():
        got_images, got_masks = slices_of(root / name)
        assert np.array_equal(got_images, images) and np.array_equal(got_masks > 0, masks), name  # slice for slice

    done = subprocess.run([sys.executable, "-m", "brainseg", "run", "--profile", "smoke"], cwd=project,
                          env=pipeline_env(), capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stdout = " ".join(done.stdout.split())
    assert "patients: 6 slices: 176" in stdout and "problems: 0" in stdout  # the validate stage
    reason = "data/raw/kaggle_3m/data.csv has no death01 for the 6 patients"
    assert stdout.count("survival: skipped: ") == 1  # one line, naming the reason
    assert f"features --oof: skipped: {reason}; no fold segmenter trained" in stdout  # nothing trained for it
    assert "fold 0: trained on" not in stdout
    assert f"survival: skipped: {reason} -> reports/survival/cv.json" in done.stdout.splitlines()
    assert f"survival: not registered: {reason}" in done.stdout.splitlines()
    assert "brainseg-survival" not in done.stdout and f"(no survival model: {reason})" in done.stdout  # next steps
    assert json.loads((project / "reports/survival/cv.json").read_text()) == {"skipped": True, "reason": reason}
    assert list(json.loads((project / "reports/register.json").read_text())) == ["segmenter"]
    assert "promotion gate: brainseg promote brainseg-segmenter 1" in stdout
    status = subprocess.run(["dvc", "status"], cwd=project, env=pipeline_env(), capture_output=True, text=True)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout  # every stage completed

    test_report = pd.read_csv(project / "reports/test/per_patient.csv")  # the pipeline's test report, in mL
    assert len(test_report) >= 1 and set(test_report["distance_unit"]) == {"mm"}
    voxel_ml = np.prod(SPACING) / 1000
    truth_ml = {name.rsplit("_", 1)[0]: masks.sum() * voxel_ml for name, (_, masks) in originals.items()}
    for _, row in test_report.iterrows():
        assert row["truth_volume_ml"] == pytest.approx(truth_ml[row["patient"]], rel=1e-9)
    with Tracking(project / "mlflow.db"):
        import mlflow

        champion = mlflow.MlflowClient().get_model_version_by_alias("brainseg-segmenter", "champion")
        assert str(champion.version) == "1"
        assert not mlflow.MlflowClient().search_registered_models("name = 'brainseg-survival'")
        code, output = invoke_flat("evaluate", "--model", "models:/brainseg-segmenter@champion", "--subset", "all",
                                   "--out", project / "reports/eval", "--profile", "smoke")
        assert code == 0, output
    per_patient = pd.read_csv(project / "reports/eval/per_patient.csv").set_index("patient")
    assert len(per_patient) == 6 and set(per_patient["distance_unit"]) == {"mm"}
    for patient, row in per_patient.iterrows():
        assert row["truth_volume_ml"] == pytest.approx(truth_ml[patient], rel=1e-9)  # voxels x voxel volume
        assert row["pred_volume_ml"] == pytest.approx((row["tp"] + row["fp"]) * voxel_ml, rel=1e-9)
    manifest = read_manifest(project / "data/processed/manifest.csv")
    assert set(manifest["spacing_mm"]) == {"3.3,0.9,0.9"}
