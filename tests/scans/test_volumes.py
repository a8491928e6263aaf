"""Volume I/O without a model: orientation by the affine, exact round trips, grids, intensities,
physical features, the DICOM series reader and SEG writer, the nnU-Net export's pieces."""

from __future__ import annotations

import math

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import tifffile
from scan_files import SPACING, model_affine, stored_layout, write_dicom_series, write_nifti

from brainseg.data.dicom_seg import write_dicom_seg
from brainseg.data.export import export_nnunet, nnunet_splits, tiff_geometry
from brainseg.data.scan import BadScan, Geometry
from brainseg.data.volumes import check_same_grid, read_scan, resample_onto, scan_name, to_uint8, write_mask
from brainseg.outcome import physical


def volume(z=5, h=12, w=16, seed=0) -> np.ndarray:
    """A (Z, H, W) uint8 stack in which every voxel differs from its mirror images (no symmetry)."""
    return np.random.default_rng(seed).integers(1, 255, (z, h, w)).astype(np.uint8)


ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("S", "P", "L"), ("A", "I", "R"), ("P", "S", "L"),
                ("I", "L", "A")]


@pytest.mark.parametrize("axcodes", ORIENTATIONS, ids=["".join(a) for a in ORIENTATIONS])
def test_a_nifti_in_any_orientation_reads_as_the_same_model_array_and_the_mask_goes_back_exactly(tmp_path, axcodes):
    vol = volume()
    path = write_nifti(vol, tmp_path / "flair.nii.gz", axcodes)
    scan = read_scan(path)
    assert np.array_equal(scan.array, vol)  # the affine, not the shape, decided the axes
    assert scan.geometry.axcodes == axcodes
    assert np.allclose(scan.geometry.model_affine, model_affine())
    assert scan.geometry.spacing == pytest.approx(SPACING)
    mask = vol > 128
    write_mask(mask, scan.geometry, tmp_path / "mask.nii.gz")
    src, out = nib.load(path), nib.load(tmp_path / "mask.nii.gz")
    assert np.array_equal(out.affine, src.affine) and out.shape == src.shape
    assert out.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(src.dataobj) > 128)


def test_a_trailing_singleton_fourth_dimension_is_read_and_kept_in_the_mask(tmp_path):
    data, affine = stored_layout(volume(), ("R", "A", "S"))
    nib.save(nib.Nifti1Image(data[..., None], affine), tmp_path / "t.nii")
    scan = read_scan(tmp_path / "t.nii")
    assert np.array_equal(scan.array, volume())
    write_mask(scan.array > 100, scan.geometry, tmp_path / "m.nii.gz")
    assert nib.load(tmp_path / "m.nii.gz").shape == data.shape + (1,)


def test_a_dicom_series_reads_in_the_model_orientation_with_its_scanner_geometry(tmp_path):
    vol = volume(seed=1)
    write_dicom_series(vol, tmp_path / "dcm")
    scan = read_scan(tmp_path / "dcm")
    assert np.array_equal(scan.array, vol)
    assert scan.geometry.axcodes == ("L", "P", "S")  # a DICOM axial stack is LPS+
    assert np.allclose(scan.geometry.model_affine, model_affine(), atol=1e-5)
    write_mask(vol > 128, scan.geometry, tmp_path / "m.nii.gz")
    back = read_scan(tmp_path / "m.nii.gz")
    assert np.array_equal(back.array, vol > 128)
    assert np.allclose(back.geometry.affine, scan.geometry.affine, atol=1e-4)  # float32 in NIfTI


def test_the_dicom_seg_references_the_series_and_holds_the_mask_per_source_slice(tmp_path):
    vol = volume(seed=2)
    write_dicom_series(vol, tmp_path / "dcm")
    scan = read_scan(tmp_path / "dcm")
    mask = vol > 200
    seg = hd.seg.segread(write_dicom_seg(mask, scan.geometry, tmp_path / "seg.dcm"))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in scan.geometry.dicom_files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    assert np.array_equal(frames.astype(bool), mask)  # DICOM rows/columns are the model's rows/columns here
    source = pydicom.dcmread(scan.geometry.dicom_files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_scan_names_drop_channel_suffixes(tmp_path):
    assert scan_name(tmp_path / "BRATS_001_0000.nii.gz") == "BRATS_001"
    assert scan_name(tmp_path / "sub-01_FLAIR.nii") == "sub-01"
    (tmp_path / "series7").mkdir()
    assert scan_name(tmp_path / "series7") == "series7"


# ------------------------------------------------------------------------------ grids
def test_a_pre_on_another_grid_is_refused_naming_both_files_and_resampled_on_request(tmp_path):
    vol = volume()
    flair = read_scan(write_nifti(vol, tmp_path / "flair.nii.gz"))
    same = read_scan(write_nifti(vol, tmp_path / "pre.nii.gz", ("L", "P", "S")))  # other storage, same grid
    check_same_grid(flair.geometry, same.geometry)
    shifted = read_scan(write_nifti(vol, tmp_path / "post.nii.gz", origin=(12.5, -30.25, 41.0 + 3.3)))
    with pytest.raises(BadScan) as err:
        check_same_grid(flair.geometry, shifted.geometry)
    assert str(err.value).startswith(f"{tmp_path / 'post.nii.gz'}: not on the grid of {tmp_path / 'flair.nii.gz'}")
    assert "origin 3.3 mm apart" in str(err.value) and "--resample" in str(err.value)
    moved = resample_onto(shifted, flair.geometry)  # one slice up: slice z of post lands on z + 1 of FLAIR
    assert moved.array.shape == vol.shape
    assert np.array_equal(moved.array[1:], vol[:-1]) and not moved.array[0].any()  # 8-bit stays 8-bit


# ------------------------------------------------------------------------------ intensities
@pytest.mark.parametrize("values, expected", [
    ([0, 10, 255], [0, 10, 255]),                 # 8-bit data is taken as it is
    ([0.0, 10.0, 255.0], [0, 10, 255]),           # whole numbers within 0..255, whatever the dtype
    ([-5, 0, 200, 400], [0, 0, 128, 255]),        # windowed: <= 0 -> 0, the top percentile -> 255
    ([0.0, 0.25, 0.5], [0, 128, 255]),
    ([0, 0, 0], [0, 0, 0]),
])
def test_intensities_become_uint8_by_one_rule_per_volume(values, expected):
    arr = np.array(values)
    out = to_uint8(arr if arr.dtype.kind == "f" else arr.astype(np.int16))
    assert out.dtype == np.uint8 and out.tolist() == pytest.approx(expected, abs=1)


# ------------------------------------------------------------------------------ physical features
def test_the_volume_in_ml_is_the_voxel_count_times_the_voxel_volume_and_the_centroid_is_in_ras_mm():
    vol = np.zeros((4, 6, 6), bool)
    vol[1:3, 2:4, 1:4] = True  # 12 voxels
    affine = model_affine()
    f = physical.patient_physical(vol, affine)
    assert f["tumor_volume_ml"] == pytest.approx(12 * 3.3 * 0.9 * 0.9 / 1000)
    centre = affine @ np.array([1.5, 2.5, 2.0, 1.0])
    assert (f["centroid_r_mm"], f["centroid_a_mm"], f["centroid_s_mm"]) == pytest.approx(tuple(centre[:3]))
    assert (f["extent_rl_mm"], f["extent_ap_mm"], f["extent_si_mm"]) == pytest.approx((3 * 0.9, 2 * 0.9, 2 * 3.3))
    s = physical.slice_physical(vol[1], 1, affine)
    assert s["area_mm2"] == pytest.approx(6 * 0.81)
    empty = physical.patient_physical(np.zeros((2, 3, 3), bool), affine)
    assert empty["tumor_volume_ml"] == 0 and math.isnan(empty["centroid_r_mm"])
    assert all(math.isnan(v) for v in physical.patient_physical(vol, None).values())  # no spacing: null


# ------------------------------------------------------------------------------ nnU-Net export pieces
def test_the_nnunet_splits_follow_the_platform_folds_over_non_test_patients():
    split = pd.DataFrame({"patient": list("abcdef"), "subset": ["train", "val", "train", "test", "train", "val"],
                          "fold": [0, 1, 2, 0, 1, 2]})
    assert nnunet_splits(split) == [{"train": ["b", "c", "e", "f"], "val": ["a"]},
                                    {"train": ["a", "c", "f"], "val": ["b", "e"]},
                                    {"train": ["a", "b", "e"], "val": ["c", "f"]}]


def test_export_refuses_a_folder_in_use_and_leaves_nothing_behind(tmp_path):
    dest = tmp_path / "Dataset501_LGG"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_nnunet(pd.DataFrame(columns=["patient", "slice"]), pd.DataFrame(columns=["patient", "subset"]), dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset501_LGG"]


def test_a_geometry_refuses_a_mask_of_another_shape():
    g = Geometry("x.nii", "nifti", model_affine(), (4, 5, 6))
    with pytest.raises(ValueError, match="does not fit x.nii"):
        g.to_stored(np.zeros((3, 5, 6), bool))


# ------------------------------------------------------------------------------ the orientation assumption
@pytest.mark.real
def test_the_orientation_assumption_agrees_with_data_csv_laterality(real_sample):
    """Under the radiological assumption (MODEL_AXCODES: columns run right -> left), a tumor coded
    1 in data.csv's laterality (Left, if the codes follow TCGA's values in alphabetical order:
    Left, Midline, Right) lies left of the head's centre (smaller r in RAS), one coded 3 right of it."""
    laterality = pd.read_csv(real_sample / "data.csv").set_index("Patient")["laterality"]
    seen = {}
    for folder in sorted(p for p in real_sample.iterdir() if p.is_dir()):
        n = len([p for p in folder.glob("*.tif") if not p.stem.endswith("_mask")])
        flair = np.stack([tifffile.imread(folder / f"{folder.name}_{k}.tif")[..., 1] for k in range(1, n + 1)])
        tumor = np.stack([tifffile.imread(folder / f"{folder.name}_{k}_mask.tif") > 0 for k in range(1, n + 1)])
        affine = tiff_geometry(n, *flair.shape[1:], folder.name).model_affine
        offset = (physical.patient_physical(tumor, affine)["centroid_r_mm"]
                  - physical.patient_physical(flair > 10, affine)["centroid_r_mm"])
        seen[folder.name[:12]] = (int(laterality[folder.name[:12]]), round(offset, 1))
    assert all((code == 1 and off < 0) or (code == 3 and off > 0) for code, off in seen.values()), seen
    assert {code for code, _ in seen.values()} == {1, 3}
