"""Bad scans at `brainseg predict --flair`: one line naming the file and what is wrong, exit 2, no
traceback, nothing written into --out. The scans are read before any model loads, so no model is
needed here (--model names nothing)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scan_files import model_affine, stored_layout, write_dicom_series, write_nifti
from typer.testing import CliRunner

from brainseg.cli import app


def vol(z=6, h=16, w=16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (z, h, w)).astype(np.uint8)


def invoke(*args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)  # a traceback fails
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def truncated(t: Path) -> Path:
    good = write_nifti(np.random.default_rng(1).integers(0, 255, (20, 64, 64)).astype(np.uint8), t / "t.nii.gz")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) * 2 // 3])
    return good


def header_says(t: Path, dims: tuple[int, int, int]) -> Path:
    data, affine = stored_layout(vol(), ("R", "A", "S"))
    img = nib.Nifti1Image(data, affine)
    nib.save(img, t / "d.nii")
    raw = bytearray((t / "d.nii").read_bytes())
    raw[40:56] = np.array([3, *dims, 1, 1, 1, 1], "<i2").tobytes()  # the header's dim[0..7]
    (t / "d.nii").write_bytes(bytes(raw))
    return t / "d.nii"


def saved(t: Path, data: np.ndarray, affine: np.ndarray | None = None, name: str = "x.nii.gz", codes: int = 1) -> Path:
    img = nib.Nifti1Image(data, model_affine() if affine is None else affine)
    img.set_sform(img.affine, code=codes)
    img.set_qform(img.affine, code=codes)
    nib.save(img, t / name)
    return t / name


def oblique(t: Path) -> Path:
    a = np.radians(12)
    rot = np.array([[1, 0, 0, 0], [0, np.cos(a), -np.sin(a), 0], [0, np.sin(a), np.cos(a), 0], [0, 0, 0, 1]])
    return saved(t, vol(), rot @ model_affine())


def two_series(t: Path) -> Path:
    write_dicom_series(vol(), t / "dcm", description="FLAIR")
    write_dicom_series(vol(), t / "other", description="T1")
    for f in (t / "other").iterdir():
        shutil.move(f, t / "dcm" / f"T1_{f.name}")
    return t / "dcm"


def over_limit(t: Path, monkeypatch) -> Path:
    monkeypatch.setenv("BRAINSEG_MAX_VOXELS", "1000")
    return write_nifti(vol(), t / "big.nii.gz")


def gzip_bomb(t: Path, monkeypatch) -> Path:
    """A header declaring 4096 x 4096 x 4096 voxels: refused from the header, nothing decompressed."""
    path = header_says(t, (4096, 4096, 4096))
    (t / "bomb.nii.gz").write_bytes(gzip.compress(path.read_bytes()))
    return t / "bomb.nii.gz"


CASES = {
    "truncated .nii.gz": (truncated, "truncated or damaged data"),
    "header larger than the data": (lambda t: header_says(t, (16, 16, 9)),
                                    "header says 16x16x9 uint8 voxels (2,304 bytes) but the file holds 1,536: "
                                    "truncated, or dimensions that disagree with the data"),
    "header smaller than the data": (lambda t: header_says(t, (16, 16, 4)),
                                     "header says 16x16x4 uint8 voxels (1,024 bytes) but the file holds more data"),
    "4-D volume": (lambda t: saved(t, np.zeros((8, 8, 4, 3), np.uint8)), "a 4-D volume (8x8x4x3)"),
    "2-D image": (lambda t: saved(t, np.zeros((8, 8), np.uint8)), "a 2-D image (8x8), not a 3-D volume"),
    "NaN voxels": (lambda t: saved(t, np.where(vol() > 250, np.nan, 1.0).astype(np.float32)),
                   "voxels are NaN or infinite"),
    "Inf voxels": (lambda t: saved(t, np.full((4, 4, 4), np.inf, np.float32)), "64 voxels are NaN or infinite"),
    "oblique acquisition": (oblique, "oblique acquisition: a voxel axis is 12.0 degrees off the scanner axes"),
    "no orientation": (lambda t: saved(t, vol(), codes=0), "no orientation in the header"),
    "not a scan": (lambda t: (t / "notes.txt").write_text("hi") and t / "notes.txt",
                   "not a .nii / .nii.gz file or a folder holding a DICOM series"),
    "not NIfTI inside": (lambda t: (t / "fake.nii.gz").write_bytes(b"\x1f\x8b" + b"junk" * 50) and t / "fake.nii.gz",
                         "not a readable NIfTI file"),
    "missing file": (lambda t: t / "absent.nii.gz", "no such file or folder"),
    "DICOM with two series": (two_series, "2 DICOM series"),
    "DICOM missing a slice": (lambda t: write_dicom_series(vol(), t / "gap", skip=(3,)),
                              "the slice spacing is 3.3 mm but 6.6 mm between IM0002.dcm and IM0004.dcm: "
                              "a slice is missing"),
    "DICOM folder without DICOM": (lambda t: (t / "empty").mkdir() or t / "empty", "no DICOM files found"),
    "DICOM single slice": (lambda t: write_dicom_series(vol(z=1), t / "one"), "a single slice (a 2-D image)"),
}
NEEDS_ENV = {"over the voxel limit": (over_limit, "16x16x6 = 1,536 voxels is over the 1,000-voxel limit"),
             "gzip bomb": (gzip_bomb, "is over the 67,108,864-voxel limit")}


def check_refused(tmp_path: Path, path: Path, expected: str, *extra) -> None:
    out = tmp_path / "out"
    code, lines = invoke("predict", "--flair", path, *extra, "--out", out, "--model", tmp_path / "no-model")
    assert code == 2, lines
    assert len(lines) == 1, lines  # one line, no traceback
    assert lines[0].startswith(f"error: {path}") and expected in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_scan_is_one_line_naming_the_file_and_exit_2(tmp_path, case):
    make, expected = CASES[case]
    check_refused(tmp_path, make(tmp_path), expected)


@pytest.mark.parametrize("case", list(NEEDS_ENV))
def test_a_volume_over_the_size_limits_is_refused_from_its_header(tmp_path, monkeypatch, case):
    make, expected = NEEDS_ENV[case]
    check_refused(tmp_path, make(tmp_path, monkeypatch), expected)


def test_a_pre_on_another_grid_is_refused_naming_both_files(tmp_path):
    flair = write_nifti(vol(), tmp_path / "flair.nii.gz")
    pre = write_nifti(vol(z=5), tmp_path / "pre.nii.gz")
    out = tmp_path / "out"
    code, lines = invoke("predict", "--flair", flair, "--pre", pre, "--out", out, "--model", tmp_path / "none")
    assert code == 2 and len(lines) == 1
    assert lines[0] == (f"error: {pre}: not on the grid of {flair} (shape 5x16x16 vs 6x16x16 (slices x rows x "
                        "columns)); co-register them, or pass --resample to resample it onto the FLAIR's grid")


@pytest.mark.parametrize("args, expected", [
    (["--pre", "p.nii.gz"], "--pre/--post need --flair"),
    (["--flair", "f.nii.gz", "slices/"], "give slice files or a patient's volumes (--flair), not both"),
    (["--flair", "f.nii.gz", "--survival"], "--survival reads the pixel features of Kaggle slices"),
    ([], "nothing to segment"),
])
def test_predict_refuses_volume_options_it_cannot_combine(tmp_path, args, expected):
    code, lines = invoke("predict", *args, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


@pytest.mark.parametrize("make, expected", [
    (lambda t: (t / "used").mkdir() or (t / "used" / "mine.txt").write_text("x") and t / "used",
     "exists and is not an empty folder; not replaced"),
    (lambda t: (t / "file").write_text("x") and t / "file", "exists and is not an empty folder; not replaced"),
])
def test_data_export_refuses_a_destination_in_use_before_any_work(tmp_path, make, expected):
    dest = make(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, lines = invoke("data", "export", dest, "--set", f"data.root={tmp_path / 'no-data'}")
    assert code == 2 and lines == [f"error: {dest}: {expected}"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_data_export_knows_one_format(tmp_path):
    code, lines = invoke("data", "export", tmp_path / "d", "--format", "msd")
    assert code == 2 and lines == ["error: --format 'msd': the one format is nnunet"]
