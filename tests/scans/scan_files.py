"""Build scanner files for the tests: a (Z, H, W) model-oriented stack as NIfTI volumes with a
chosen affine, and as a DICOM series written with pydicom (MR Image Storage, one file a slice)."""

from __future__ import annotations

import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from brainseg.data.scan import MODEL_AXCODES, Geometry

# 0.9 x 0.9 mm in-plane, 3.3 mm slices, a non-zero origin: the model's (Z, H, W) axes point
# superior, posterior, left
SPACING = (3.3, 0.9, 0.9)
ORIGIN = (12.5, -30.25, 41.0)


def model_affine(spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    """(4, 4) RAS affine of a (Z, H, W) array in MODEL_AXCODES order."""
    assert MODEL_AXCODES == ("S", "P", "L")
    z, r, c = spacing
    aff = np.zeros((4, 4))
    aff[2, 0], aff[1, 1], aff[0, 2] = z, -r, -c
    aff[:3, 3], aff[3, 3] = origin, 1
    return aff


def stored_layout(volume: np.ndarray, axcodes: tuple[str, str, str], spacing=SPACING, origin=ORIGIN):
    """The (Z, H, W) ``volume`` stored along ``axcodes`` (e.g. ("R", "A", "S")): (array, affine)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    t = ornt_transform(axcodes2ornt(MODEL_AXCODES), axcodes2ornt(axcodes))
    return apply_orientation(volume, t), model_affine(spacing, origin) @ inv_ornt_aff(t, volume.shape)


def write_nifti(volume: np.ndarray, path: Path, axcodes=("R", "A", "S"), spacing=SPACING, origin=ORIGIN,
                dtype=None) -> Path:
    """Write a (Z, H, W) stack as a NIfTI stored along ``axcodes``; returns ``path``."""
    data, affine = stored_layout(volume, axcodes, spacing, origin)
    img = nib.Nifti1Image(np.ascontiguousarray(data if dtype is None else data.astype(dtype)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return Path(path)


def write_dicom_series(volume: np.ndarray, folder: Path, spacing=SPACING, origin=ORIGIN, series_uid=None,
                       study_uid=None, frame_uid=None, description="FLAIR", skip=(), dtype=np.uint16) -> Path:
    """Write a (Z, H, W) stack as single-frame MR images (axial, rows posterior, columns left:
    ImageOrientationPatient 1\\0\\0\\0\\1\\0), slice ``k`` at ``origin`` + k * spacing superior.
    ``skip`` leaves those slices out (a missing slice)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    aff = model_affine(spacing, origin)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    z_sp, r_sp, c_sp = spacing
    for k, plane in enumerate(np.asarray(volume)):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{k:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", description, 1, k + 1
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "TEST01", "", "O"
        ds.StudyDate = ds.SeriesDate = datetime.date(2020, 1, 2).strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Manufacturer = "brainseg-tests"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        position = ras_to_lps @ (aff[:3, :3] @ np.array([k, 0, 0]) + aff[:3, 3])
        ds.ImagePositionPatient = [float(f"{v:.6f}") for v in position]
        ds.PixelSpacing = [r_sp, c_sp]
        ds.SliceThickness = z_sp
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8 * np.dtype(dtype).itemsize
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        ds.PixelData = np.ascontiguousarray(plane.astype(dtype)).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return folder


def geometry_of(path: Path) -> Geometry:
    from brainseg.data.volumes import read_scan

    return read_scan(path).geometry


# ------------------------------------------------------------------ a model with fixed weights
CHANNEL_WEIGHTS = (0.8, 3.0, -0.6)  # pre, FLAIR, post: a swapped channel changes the masks
SETTINGS = {"threshold": 0.5, "min_component_px": 3, "component_confidence": 0.9, "precision": "float32"}


def fixed_model(path: Path, channels: str = "all", size: int = 64) -> Path:
    """A saved segmenter whose network is sigmoid(w . x - 9) over the z-scored channels of each
    pixel (no training, no randomness): bright FLAIR is tumor. Head crop and the 3-D step on."""
    import tf_keras as keras

    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.settings.config import Train

    n = 3 if channels == "all" else 1
    inp = keras.Input((size, size, n))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inp, conv(inp))
    weights = np.array(CHANNEL_WEIGHTS if n == 3 else CHANNEL_WEIGHTS[1:2], np.float32).reshape(1, 1, n, 1)
    conv.set_weights([weights, np.array([-9.0], np.float32)])
    cfg = Train.from_dict({"arch": "plain_unet", "size": size, "channels": channels, "crop": "head"})
    return save_model(model, cfg, InferenceSettings(**SETTINGS), path)
