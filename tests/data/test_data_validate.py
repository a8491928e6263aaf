"""`brainseg data validate` and the scan behind it: every bad file is named with its problem."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from brainseg.cli import app
from brainseg.data import imageio
from brainseg.data.manifest import MANIFEST_COLUMNS, patients_table, scan

runner = CliRunner()

# synth.generate(patients=3, slices=4, size=32, seed=0): one patient per institution DU, HT, CS
FIRST = "TCGA_CS_S002_20000103"  # the first patient folder in sorted order


def slice_file(root: Path, n: int, mask: bool = False, folder: str = FIRST) -> Path:
    return root / folder / f"{folder}_{n}{'_mask' if mask else ''}.tif"


def validate(root: Path, *extra: str):
    return runner.invoke(app, ["data", "validate", str(root), *extra])


def bad_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("BAD ")]


# Each damage function breaks one thing and returns (the path the report must name, the problem).
def truncate_image(root):
    f = slice_file(root, 2)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f, "unreadable or truncated TIFF"


def corrupt_image_body(root):
    f = slice_file(root, 2)
    f.write_bytes(b"II*\x00" + b"\xff" * 200)  # TIFF signature, garbage after it
    return f, "TIFF has no image pages"


def zero_byte_image(root):
    f = slice_file(root, 3)
    f.write_bytes(b"")
    return f, "zero-byte file"


def zero_byte_mask(root):
    f = slice_file(root, 3, mask=True)
    f.write_bytes(b"")
    return f, "zero-byte file"


def image_without_mask(root):
    slice_file(root, 3, mask=True).unlink()
    return slice_file(root, 3), "image without mask"


def mask_without_image(root):
    slice_file(root, 3).unlink()
    return slice_file(root, 3, mask=True), "mask without image"


def mask_of_other_size(root):
    f = slice_file(root, 2, mask=True)
    imageio.write_tiff(f, np.zeros((16, 16), np.uint8))
    return f, "mask is 16x16 but its image is 32x32"


def image_16_bit(root):
    f = slice_file(root, 2)
    imageio.write_tiff(f, np.full((32, 32, 3), 1000, np.uint16))
    return f, "image dtype is uint16, expected uint8"


def image_float(root):
    f = slice_file(root, 2)
    imageio.write_tiff(f, np.full((32, 32, 3), 0.5, np.float32))
    return f, "image dtype is float32, expected uint8"


def image_4_channels(root):
    f = slice_file(root, 2)
    imageio.write_tiff(f, np.zeros((32, 32, 4), np.uint8))
    return f, "image shape is 32x32x4"


def mask_with_grey_values(root):
    f = slice_file(root, 2, mask=True)
    m = np.zeros((32, 32), np.uint8)
    m[4:8, 4:8] = 255
    m[10:12, 10:12] = 128
    imageio.write_tiff(f, m)
    return f, "mask values are {0, 128, 255}, expected only 0/255"


def folder_name_not_parsing(root):
    bad = root / "TCGA_CS_S002"  # the scan date is missing
    (root / FIRST).rename(bad)
    return bad, "folder name does not parse as TCGA_<institution>_<patient>_<YYYYMMDD>"


def duplicate_slice_number(root):
    shutil.copy(slice_file(root, 1), root / FIRST / f"{FIRST}_01.tif")
    # sorted by name, _01.tif comes first, so _1.tif is the one reported as the duplicate
    return slice_file(root, 1), f"duplicate slice number 1 (also {FIRST}_01.tif)"


def data_csv_missing(root):
    (root / "data.csv").unlink()
    return root / "data.csv", "data.csv is missing"


def data_csv_without_patient(root):
    df = pd.read_csv(root / "data.csv").rename(columns={"Patient": "patient_id"})
    df.to_csv(root / "data.csv", index=False)
    return root / "data.csv", "no 'Patient' column"


def file_name_not_matching(root):
    f = root / FIRST / "scan_2.tif"
    shutil.copy(slice_file(root, 2), f)
    return f, f"file name does not match {FIRST}_<n>[_mask].tif"


DAMAGES = [truncate_image, corrupt_image_body, zero_byte_image, zero_byte_mask, image_without_mask,
           mask_without_image, mask_of_other_size, image_16_bit, image_float, image_4_channels,
           mask_with_grey_values, folder_name_not_parsing, duplicate_slice_number, data_csv_missing,
           data_csv_without_patient, file_name_not_matching]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
def test_validate_names_each_bad_file_and_its_problem(synth_root, damage):
    path, problem = damage(synth_root)
    result = validate(synth_root)
    assert result.exit_code == 1, result.output
    lines = bad_lines(result.output)
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"BAD {path}: {problem}")
    assert "problems: 1" in result.output


def test_validate_reports_every_problem_not_just_the_first(synth_root):
    damaged = [d(synth_root) for d in (zero_byte_image, image_16_bit, data_csv_missing)]
    result = validate(synth_root)
    assert result.exit_code == 1
    lines = bad_lines(result.output)
    assert len(lines) == 3
    for path, problem in damaged:
        assert any(line.startswith(f"BAD {path}: {problem}") for line in lines), (path, lines)


def test_validate_clean_data_prints_summary_and_exits_0(synth_root, tmp_path):
    summary_file = tmp_path / "out" / "summary.json"
    result = validate(synth_root, "--json", str(summary_file))
    assert result.exit_code == 0, result.output
    assert not bad_lines(result.output)
    masks = [tifffile.imread(f) for f in sorted(synth_root.glob("*/*_mask.tif"))]
    tumor = sum(int((m > 0).any()) for m in masks)
    assert len(masks) == 12 and 0 < tumor < 12
    assert f"patients: 3  slices: 12  tumor slices: {tumor}  problems: 0" in result.output
    for inst in ("CS", "DU", "HT"):  # the per-institution table: institution, patients, slices
        assert re.search(rf"{inst}\s*\W\s*1\s*\W\s*4\b", result.output), result.output
    s = json.loads(summary_file.read_text())
    assert s["institutions"] == {i: {"patients": 1, "slices": 4} for i in ("CS", "DU", "HT")}
    assert (s["patients"], s["slices"], s["tumor_slices"], s["problems"]) == (3, 12, tumor, 0)
    assert s["problem_list"] == []


def test_validate_json_lists_the_problems(synth_root, tmp_path):
    path, problem = zero_byte_image(synth_root)
    result = validate(synth_root, "--json", str(tmp_path / "s.json"))
    assert result.exit_code == 1
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["problem_list"] == [f"{path}: {problem}"]
    assert s["slices"] == 11  # the bad slice is left out of the counts


def test_validate_missing_path_exits_2(tmp_path):
    result = validate(tmp_path / "nowhere")
    assert result.exit_code == 2
    assert f"{tmp_path / 'nowhere'}: no such file or folder" in result.output


def test_validate_folder_without_patients_exits_non_zero(tmp_path):
    (tmp_path / "empty").mkdir()
    result = validate(tmp_path / "empty")
    assert result.exit_code == 2
    assert "no kaggle_3m folder or TCGA_<inst>_<patient>_<date> folders found" in result.output


@pytest.mark.parametrize("image, mask", [
    (np.full((32, 32), 90, np.uint8), None),                       # grayscale slice: taken as FLAIR
    (np.full((32, 32, 1), 90, np.uint8), None),                    # single channel
    (None, np.pad(np.ones((4, 4), np.uint8), 14)),                 # mask stored as 0/1
    (None, np.repeat(np.pad(np.full((4, 4), 255, np.uint8), 14)[:, :, None], 3, axis=2)),  # RGB
])
def test_accepted_variants_are_not_problems(synth_root, image, mask):
    if image is not None:
        imageio.write_tiff(slice_file(synth_root, 2), image)
    if mask is not None:
        imageio.write_tiff(slice_file(synth_root, 2, mask=True), mask)
    result = scan(synth_root)
    assert result.ok, result.problems
    m = result.manifest
    row = m[(m["patient"] == "TCGA_CS_S002") & (m["slice"] == 2)]
    assert len(row) == 1
    if mask is not None:
        assert int(row["tumor_px"].iloc[0]) == 16


def test_scan_manifest_rows_sorted_numerically_with_tumor_pixels(make_synth):
    root = make_synth(patients=2, slices=12, size=32, seed=1)
    result = scan(root)
    assert result.ok
    m = result.manifest
    assert list(m.columns) == MANIFEST_COLUMNS
    for _, rows in m.groupby("patient"):
        assert rows["slice"].tolist() == list(range(1, 13))  # 10, 11, 12 after 9
    for _, r in m.iterrows():
        assert r["tumor_px"] == int((tifffile.imread(r["mask_path"]) > 0).sum())
        assert (r["height"], r["width"]) == (32, 32)
    table = patients_table(m)
    assert table["slices"].tolist() == [12, 12]
    by_patient = m.groupby("patient")
    assert table["tumor_slices"].tolist() == [int((g["tumor_px"] > 0).sum()) for _, g in by_patient]


@pytest.mark.real
def test_validate_real_sample(real_sample, tmp_path):
    result = validate(real_sample, "--json", str(tmp_path / "s.json"))
    assert result.exit_code == 0, result.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["patients"], s["slices"], s["problems"]) == (6, 176, 0)
    assert "patients: 6  slices: 176" in result.output
    tumor = sum(int((tifffile.imread(f) > 0).any()) for f in real_sample.glob("*/*_mask.tif"))
    assert s["tumor_slices"] == tumor > 0
    assert sum(v["slices"] for v in s["institutions"].values()) == 176
    assert sum(v["patients"] for v in s["institutions"].values()) == 6
