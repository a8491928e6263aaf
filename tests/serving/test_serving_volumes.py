"""A whole scanner volume over REST (issue 35, item 4): ``mlflow models serve`` of the champion takes
a base64 NIfTI in a ``volume`` column and answers what ``brainseg predict --flair`` writes for the
same file (the same mask in the input's geometry, the same mL, the same per-slice rows), and each
bad volume gets a 400 whose first line names the row, the column and the problem. A slice request
with a ``spacing`` column gains ``area_mm2``; without it the answer says the spacing is unknown.

The model is a fixed network (bright z-scored FLAIR is tumor; :func:`helpers.threshold_net`), so
the masks are non-trivial and deterministic; the volume is a synthetic patient stored RAS with
0.9 x 0.9 x 3.3 mm voxels and a non-zero origin (two axes flipped against the model's). The
in-process tests call the same pyfunc for what needs a 3-channel model.
"""

from __future__ import annotations

import base64
import gzip
import types
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import requests

from brainseg.bench import experiment_in, register_champion, serve_model
from brainseg.data import imageio
from brainseg.data.synth import synth_patient
from brainseg.serving.volume_request import VOLUME_OUTPUT_COLUMNS
from conftest import Tracking
from helpers import invoke, strict_json, threshold_model

pytestmark = pytest.mark.timeout(900)

SPACING, ORIGIN = (3.3, 0.9, 0.9), (12.5, -30.25, 41.0)  # (slice, row, column) mm; RAS origin
MAX_VOXELS = 100_000  # the server's BRAINSEG_MAX_VOXELS: a 64x64x40 header is over it


# ------------------------------------------------------------------------------------ builders
def ras_affine(shape_zhw: tuple[int, int, int], spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    """The affine of a (Z, H, W) model-oriented stack stored as (W, H, Z) in RAS order: stored axis 0
    runs right (the model's columns run left), axis 1 anterior (rows run posterior), axis 2 superior."""
    z, r, c = spacing
    _, h, w = shape_zhw
    aff = np.diag([c, r, z, 1.0])
    aff[:3, 3] = [origin[0] - c * (w - 1), origin[1] - r * (h - 1), origin[2]]
    return aff


def nifti_bytes(volume_zhw: np.ndarray, affine: np.ndarray | None = None, gz: bool = True, data=None) -> bytes:
    """A (Z, H, W) stack as .nii(.gz) bytes stored RAS (``data``: stored array as it is, for odd shapes)."""
    stored = np.ascontiguousarray(volume_zhw.transpose(2, 1, 0)[::-1, ::-1, :]) if data is None else data
    img = nib.Nifti1Image(stored, ras_affine(volume_zhw.shape) if affine is None else affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def volume_body(**columns) -> dict:
    names = list(columns)
    return {"dataframe_split": {"columns": names, "data": [[columns[n] for n in names]]}}


def post(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=body, timeout=300)


def gzip_bomb(volume: np.ndarray, inflated: int = 200 * 2**20) -> bytes:
    """A .nii.gz whose header declares ``volume``'s shape but whose gzip stream inflates to ``inflated`` bytes."""
    header = nifti_bytes(volume, gz=False)[:352]  # the header and its 4-byte extension flag
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    chunk = bytes(2**20)
    return packer.compress(header) + b"".join(packer.compress(chunk) for _ in range(inflated // len(chunk))) + \
        packer.flush()


def header_only(shape: tuple[int, ...]) -> bytes:
    """A .nii.gz header declaring ``shape`` (uint8) with almost no data: refused before decoding."""
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), ras_affine((2, 2, 2)))
    img.header.set_data_shape(shape)
    img.header["vox_offset"] = 352
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return gzip.compress(img.header.binaryblock + b"\0" * 4 + bytes(64), mtime=0)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def patient() -> np.ndarray:
    """(Z, H, W, 3) uint8: a synthetic patient of 12 slices of 64x64 with a bright FLAIR tumor."""
    images, _ = synth_patient(np.random.default_rng(5), 12, 64)
    return images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:

    folder = tmp_path_factory.mktemp("volume-model")
    threshold_model(folder)
    return folder


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    folder = tmp_path_factory.mktemp("volume-mlflow")
    with Tracking(folder / "mlflow.db") as t:
        t.artifacts = folder / "artifacts"
        yield t


@pytest.fixture(scope="module")
def server(tracking, model_dir, patient, tmp_path_factory):
    """``mlflow models serve`` of the registered champion (MLflow's own command, no wrapper)."""
    experiment_in("volumes", tracking.artifacts)
    uri = register_champion(model_dir, patient[6], tracking.artifacts)
    try:
        with serve_model(uri, tracking.uri, tmp_path_factory.mktemp("serve"), timeout_s=300,
                         env={"BRAINSEG_MAX_VOXELS": str(MAX_VOXELS)}) as s:
            s.model_uri = uri
            yield s
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def flair_file(patient, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("flair") / "sub01_flair.nii.gz"
    path.write_bytes(nifti_bytes(patient[..., 1]))
    return path


# ------------------------------------------------------------------------------------ REST
def test_a_volume_over_rest_answers_the_mask_and_ml_of_predict_flair(server, flair_file, tmp_path):
    out = tmp_path / "predicted"
    result = invoke("predict", "--flair", flair_file, "--name", "sub01", "--out", out, "--model", server.model_uri)
    assert result.exit_code == 0, result.output
    predicted = pd.read_csv(out / "patients.csv").iloc[0]
    per_slice = pd.read_csv(out / "features.csv")
    assert predicted["tumor_volume_px"] > 0  # a mask worth comparing

    r = post(server.url, volume_body(volume=b64(flair_file.read_bytes()), patient="sub01"))
    assert r.status_code == 200, r.text[:500]
    (row,) = strict_json(r.text)["predictions"]
    assert list(row) == VOLUME_OUTPUT_COLUMNS and row["patient"] == "sub01"
    mask_path = tmp_path / "rest_mask.nii.gz"
    mask_path.write_bytes(base64.b64decode(row["mask_nifti"]))
    rest_mask, cli_mask, flair = (nib.load(p) for p in (mask_path, out / "sub01_mask.nii.gz", flair_file))
    assert rest_mask.shape == flair.shape and np.array_equal(rest_mask.affine, flair.affine)  # the input's geometry
    assert np.array_equal(np.asarray(rest_mask.dataobj), np.asarray(cli_mask.dataobj))  # the same mask
    voxels = int(np.asarray(rest_mask.dataobj).sum())
    assert row["tumor_volume_px"] == voxels == predicted["tumor_volume_px"]
    voxel_ml = abs(np.linalg.det(flair.affine[:3, :3])) / 1000  # 0.9 x 0.9 x 3.3 mm, as the header stores it
    assert voxel_ml == pytest.approx(0.9 * 0.9 * 3.3 / 1000, rel=1e-6)
    assert row["tumor_volume_ml"] == pytest.approx(voxels * voxel_ml, rel=1e-9)
    assert row["tumor_volume_ml"] == pytest.approx(predicted["tumor_volume_ml"], rel=1e-9)
    assert row["spacing_mm"] == predicted["spacing_mm"] == "0.9x0.9x3.3" and row["coordinates"] == "RAS"
    slices = pd.DataFrame(row["slice_rows"])
    assert slices["slice"].tolist() == per_slice["slice"].tolist() == list(range(1, 13))
    for column in ("area_px", "area_mm2", "centroid_s_mm", "tumor"):
        assert np.allclose(slices[column].astype(float), per_slice[column].astype(float), equal_nan=True), column

    r = post(server.url, {**volume_body(volume=b64(flair_file.read_bytes())), "params": {"return_mask": False}})
    (row,) = strict_json(r.text)["predictions"]
    assert row["mask_nifti"] is None and row["patient"] == "row 0" and row["tumor_volume_px"] == voxels


def test_a_slice_with_a_spacing_gains_area_mm2_and_one_without_says_unknown(server, patient):
    image = b64(imageio.encode_png(patient[6]))
    body = {"dataframe_split": {"columns": ["image", "spacing"], "data": [[image, "0.9,0.5"], [image, None]]}}
    r = post(server.url, body)
    assert r.status_code == 200, r.text[:500]
    known, unknown = strict_json(r.text)["predictions"]
    assert known["area_px"] > 0 and known["area_mm2"] == pytest.approx(known["area_px"] * 0.45)
    assert known["spacing_mm"] == "0.9x0.5"
    assert unknown["area_mm2"] is None and unknown["spacing_mm"] == "unknown"
    r = post(server.url, {"dataframe_split": {"columns": ["image", "spacing"], "data": [[image, "0.9"]]}})
    assert r.status_code == 400 and r.json()["message"].splitlines()[0].startswith("row 0, column 'spacing': ")


def bad_volumes(patient: np.ndarray) -> dict[str, tuple[bytes, str]]:
    flair = patient[..., 1]
    good = nifti_bytes(flair)
    a = np.radians(12)
    turn = np.array([[1, 0, 0, 0], [0, np.cos(a), -np.sin(a), 0], [0, np.sin(a), np.cos(a), 0], [0, 0, 0, 1]])
    nan = flair.astype(np.float32)
    nan[3, 10, 10] = np.nan
    return {
        "truncated gzip": (good[: len(good) * 2 // 3], "truncated or damaged data"),
        "4-D": (nifti_bytes(flair, data=np.zeros((8, 8, 4, 3), np.uint8)),
                "a 4-D volume (8x8x4x3): one 3-D volume per file is read"),
        "NaN": (nifti_bytes(nan), "1 voxels are NaN or infinite"),
        "oblique": (nifti_bytes(flair, turn @ ras_affine(flair.shape)),
                    "oblique acquisition: a voxel axis is 12.0 degrees off the scanner axes"),
        "over the volume reader's limit": (header_only((64, 64, 40)),
                                           f"64x64x40 = 163,840 voxels is over the {MAX_VOXELS:,}-voxel limit "
                                           "(BRAINSEG_MAX_VOXELS)"),
        "over the request's pixels": (header_only((2048, 2048, 4)), "the request's volumes hold more than the "
                                      "limit of 10,485,760 pixels per request (BRAINSEG_SERVE_MAX_PIXELS"),
        "a gzip bomb": (gzip_bomb(flair), "header says 64x64x12 uint8 voxels (49,152 bytes) but the file holds "
                                          "more data"),
        "not NIfTI": (b"just some text, not a scan", "not a readable NIfTI file"),
    }


def test_a_brats_sized_volume_is_within_the_default_request_budget(tmp_path):
    """A BraTS FLAIR (240 x 240 x 155) passes the served request's default pixel budget, as `brainseg
    predict --flair` reads it (what refuses this header-only file is the reader: its data is missing);
    a volume over the budget is refused by the budget's name."""
    from brainseg.data.scan import VolumeLimits
    from brainseg.serving.limits import RequestLimits
    from brainseg.serving.request import RequestError
    from brainseg.serving.volume_request import decode_volumes

    def refusal(shape):
        with pytest.raises(RequestError) as refused:
            decode_volumes(pd.DataFrame({"volume": [b64(header_only(shape))]}), RequestLimits(), VolumeLimits(),
                           tmp_path)
        return str(refused.value)

    assert refusal((240, 240, 155)).startswith("row 0, column 'volume': header says 240x240x155 uint8 voxels "
                                               "(8,928,000 bytes) but the file holds 64: truncated")
    assert "BRAINSEG_SERVE_MAX_PIXELS" in refusal((256, 256, 161))


def test_each_bad_volume_gets_a_400_naming_the_cell_and_the_problem(server, patient):
    for case, (data, words) in bad_volumes(patient).items():
        r = post(server.url, volume_body(volume=b64(data)))
        assert r.status_code == 400, (case, r.status_code, r.text[:300])
        first = r.json()["message"].splitlines()[0]
        assert first.startswith("row 0, column 'volume': ") and words in first, (case, first)
        assert "Traceback" not in r.text and "/tmp" not in first, case
    r = post(server.url, volume_body(volume=b64(nifti_bytes(patient[..., 1])), image="AAAA"))
    assert r.status_code == 400 and "unknown column(s) 'image' in a volume request" in r.json()["message"]
    other_grid = nifti_bytes(patient[1:, ..., 0])  # one slice fewer: another grid
    r = post(server.url, volume_body(volume=b64(nifti_bytes(patient[..., 1])), pre_volume=b64(other_grid)))
    first = r.json()["message"].splitlines()[0]
    assert r.status_code == 400 and first.startswith("row 0, column 'pre_volume': not on the grid of row 0, column "
                                                     "'volume' (shape 11x64x64 vs 12x64x64"), first
    assert post(server.url, volume_body(volume=b64(nifti_bytes(patient[..., 1])))).status_code == 200  # still serves


# ------------------------------------------------------------------------------------ in process
@pytest.fixture(scope="module")
def three_channel(tmp_path_factory):
    """The pyfunc of a 3-channel fixed network, loaded in process (the server's code, no MLflow store)."""
    import tf_keras as keras

    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.serving.pyfunc import SegmenterModel
    from brainseg.settings.config import Train

    inp = keras.Input((32, 32, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    net = keras.Model(inp, conv(inp))
    conv.set_weights([np.array([0.5, 6.0, -1.0], np.float32).reshape(1, 1, 3, 1), np.array([-3.0], np.float32)])
    folder = save_model(net, Train(arch="plain_unet", size=32, channels="all"), InferenceSettings(precision="float32"),
                        tmp_path_factory.mktemp("model-all"))
    model = SegmenterModel()
    model.load_context(types.SimpleNamespace(artifacts={"model_dir": str(folder)}))
    return model, folder


def test_a_three_channel_model_reads_pre_and_post_as_predict_does_and_refuses_flair_alone(three_channel, patient,
                                                                                          tmp_path):
    from brainseg.serving.pyfunc import BadRequest

    model, folder = three_channel
    files = {}
    for seq, channel in (("flair", 1), ("pre", 0), ("post", 2)):
        files[seq] = tmp_path / f"{seq}.nii.gz"
        files[seq].write_bytes(nifti_bytes(patient[..., channel]))
    result = invoke("predict", "--flair", files["flair"], "--pre", files["pre"], "--post", files["post"],
                    "--name", "p", "--out", tmp_path / "out", "--model", folder)
    assert result.exit_code == 0, result.output
    answer = model.predict(None, pd.DataFrame({"volume": [b64(files["flair"].read_bytes())],
                                               "pre_volume": [b64(files["pre"].read_bytes())],
                                               "post_volume": [b64(files["post"].read_bytes())]}))
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(answer["mask_nifti"][0])))
    expected = nib.load(tmp_path / "out" / "p_mask.nii.gz")
    assert np.array_equal(np.asarray(mask.dataobj), np.asarray(expected.dataobj)) and np.asarray(mask.dataobj).sum() > 0
    with pytest.raises(BadRequest) as info:
        model.predict(None, pd.DataFrame({"volume": [b64(files["flair"].read_bytes())]}))
    assert info.value.message.startswith("row 0: the served model: this model reads 3 channels") and \
        "give column 'pre_volume' and column 'post_volume' too" in info.value.message
    with pytest.raises(BadRequest) as info:  # a null pre: that sequence is absent
        model.predict(None, pd.DataFrame({"volume": [b64(files["flair"].read_bytes())], "pre_volume": [None],
                                          "post_volume": [b64(files["post"].read_bytes())]}))
    assert "give column 'pre_volume' too" in info.value.message


@pytest.mark.parametrize("table, words", [
    (pd.DataFrame({"pre_volume": ["AAAA"]}), "'pre_volume' / 'post_volume' without the FLAIR: add a column 'volume'"),
    (pd.DataFrame({"volume": [3]}), "row 0, column 'volume': got a number; expected a string of base64-encoded NIfTI"),
    (pd.DataFrame({"volume": ["@@@"]}), "row 0, column 'volume': not valid base64"),
    (pd.DataFrame({"volume": pd.Series([], dtype=object)}), "the request holds no rows"),
])
def test_a_malformed_volume_table_is_refused_by_name(three_channel, table, words):
    from brainseg.serving.pyfunc import BadRequest

    with pytest.raises(BadRequest) as info:
        three_channel[0].predict(None, table)
    assert info.value.message.startswith(words)
