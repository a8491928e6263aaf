"""The served segmenter end to end: registered, loaded back by alias, served over REST, and
``brainseg predict``; each must give exactly the masks ``evaluate`` gives.

The model is a tiny untrained U-Net (seeded): its masks are arbitrary but deterministic, which is
all an equality test between paths needs. The REST tests start the real ``mlflow models serve``
once for the module, on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import io
import shutil
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import tifffile
from PIL import Image

from brainseg import registry
from brainseg.bench import dataframe_split, experiment_in, serve_model
from brainseg.data import imageio
from brainseg.features import SLICE_FEATURE_COLUMNS, slice_features
from conftest import PROJECT_ROOT, Tracking, invoke

pytestmark = pytest.mark.timeout(600)

MODEL_NAME = "brainseg-segmenter"
CHAMPION_URI = f"models:/{MODEL_NAME}@{registry.CHAMPION}"
OUTPUT_COLUMNS = SLICE_FEATURE_COLUMNS + ["mask_png", "model_run_id", "data_version"]
SERVER_READY_S = 90
HTTP_TIMEOUT_S = 60


# ------------------------------------------------------------------------------------ helpers
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def decode_mask(value: str) -> np.ndarray:
    """``mask_png`` -> (H, W) bool; the PNG must hold only 0 and 255."""
    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(value))))
    assert arr.dtype == np.uint8 and set(np.unique(arr).tolist()) <= {0, 255}
    return arr > 0


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a ``width`` x ``height`` grayscale image with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return imageio.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def post(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=body, timeout=HTTP_TIMEOUT_S)


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving-mlflow")
    with Tracking(folder / "mlflow.db") as t:
        t.artifacts = folder / "artifacts"
        yield t


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    import tf_keras as keras

    from brainseg.config import TrainConfig
    from brainseg.models.factory import build_model
    from brainseg.train import save_model

    cfg = TrainConfig.from_dict({"arch": "plain_unet", "base_filters": 4, "size": 64, "channels": "flair"})
    keras.utils.set_random_seed(0)
    return save_model(build_model(cfg), cfg, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def champion(tracking, tiny_model_dir) -> str:
    """The tiny model logged as pyfunc in a run, registered and made champion; returns the run id."""
    from brainseg.serving import log_pyfunc_segmenter

    experiment_in("serving-test", tracking.artifacts)  # the evaluation run below logs here too
    with mlflow.start_run(run_name="tiny-segmenter") as run:
        model_uri = log_pyfunc_segmenter(tiny_model_dir, meta={"data_version": "test-data"})
    mv, created = registry.register(MODEL_NAME, model_uri, run.info.run_id, {"source_run_id": run.info.run_id},
                                    "Tiny untrained test model. Not for use.")
    assert created
    registry.apply(registry.decide(MODEL_NAME, mv.version, 0.0, None, None, force=False))
    assert registry.champion(MODEL_NAME).version == mv.version
    return run.info.run_id


@pytest.fixture(scope="module")
def server(champion, tracking, tmp_path_factory):
    """``mlflow models serve -m models:/brainseg-segmenter@champion``; always stopped afterwards."""
    try:
        with serve_model(CHAMPION_URI, tracking.uri, tmp_path_factory.mktemp("serve"),
                         timeout_s=SERVER_READY_S) as s:
            yield s
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def synth_slice(tmp_path_factory) -> bytes:
    """TIFF bytes of a 256x256 synthetic slice with a lesion (for tests that need no real data)."""
    from brainseg.data.synth import generate

    root = generate(tmp_path_factory.mktemp("synth") / "kaggle_3m", patients=1, slices=8, size=256, seed=0)
    return next(root.glob("*/*_4.tif")).read_bytes()


@pytest.fixture(scope="module")
def real_slice(real_sample) -> Path:
    """The real sample slice with the most tumor pixels (a fixed choice)."""
    masks = sorted(real_sample.glob("*/*_mask.tif"))
    best = max(masks, key=lambda p: (int(imageio.read_mask(p).sum()), str(p)))
    return best.with_name(best.name.replace("_mask.tif", ".tif"))


# ----------------------------------------------------------------- registry -> pyfunc = evaluate
@pytest.mark.real
def test_champion_by_alias_gives_the_masks_and_features_of_evaluate(champion, real_sample):
    from brainseg.data.context import DataContext
    from brainseg.evaluate import EvalSettings
    from brainseg.workflows import tracked_evaluation

    ctx = DataContext.from_folder(real_sample)
    rows = ctx.rows("test")
    evaluated = tracked_evaluation({"profile": "test"}, CHAMPION_URI, ctx, "test", EvalSettings(threshold=0.5))
    assert evaluated["metrics"]["n_slices"] == len(rows) == 176

    served = mlflow.pyfunc.load_model(CHAMPION_URI)
    frame = pd.DataFrame({"image": [b64(Path(p).read_bytes()) for p in rows["image_path"]]})
    out = served.predict(frame, params={"threshold": 0.5})

    assert list(out.columns) == OUTPUT_COLUMNS and len(out) == len(rows)
    masks = [decode_mask(v) for v in out["mask_png"]]
    expected = evaluated["result"].preds
    differ = [Path(p).name for p, m, e in zip(rows["image_path"], masks, expected, strict=True)
              if m.shape != e.shape or not np.array_equal(m, e)]
    assert differ == [], f"{len(differ)} slices differ from evaluate, e.g. {differ[:3]}"
    covered = sum(int(m.sum()) for m in masks)
    assert 0 < covered < sum(m.size for m in masks)  # the comparison is not between trivial masks

    images = [imageio.read_image(Path(p)) for p in rows["image_path"]]
    want = pd.DataFrame([slice_features(m, im) for m, im in zip(expected, images)], columns=SLICE_FEATURE_COLUMNS)
    pd.testing.assert_frame_equal(out[SLICE_FEATURE_COLUMNS].reset_index(drop=True), want, check_dtype=False)
    assert set(out["model_run_id"]) == {champion} and set(out["data_version"]) == {"test-data"}


# ------------------------------------------------------------------------------------ REST: good
@pytest.mark.real
def test_server_segments_a_real_slice_in_split_and_records_form(server, real_slice, champion):
    value = b64(real_slice.read_bytes())
    split = post(server.url, dataframe_split([value]))
    records = post(server.url, {"dataframe_records": [{"image": value}]})
    assert split.status_code == 200, split.text[:500]
    assert records.status_code == 200, records.text[:500]
    a, b = split.json()["predictions"][0], records.json()["predictions"][0]
    assert list(a) == OUTPUT_COLUMNS and a["model_run_id"] == champion
    mask = decode_mask(a["mask_png"])
    assert mask.shape == (256, 256) and np.array_equal(mask, decode_mask(b["mask_png"]))

    local = mlflow.pyfunc.load_model(CHAMPION_URI).predict(pd.DataFrame({"image": [value]}))
    assert np.array_equal(mask, decode_mask(local["mask_png"][0]))
    assert a["area_px"] == int(mask.sum()) == local["area_px"][0]


@pytest.mark.real
def test_server_takes_png_and_the_threshold_param(server, real_slice):
    image = imageio.read_image(real_slice)
    tiff = post(server.url, dataframe_split([b64(real_slice.read_bytes())], {"threshold": 0.5}))
    png = post(server.url, dataframe_split([b64(imageio.encode_png(image))], {"threshold": 0.5}))
    low = post(server.url, dataframe_split([b64(imageio.encode_png(image))], {"threshold": 0.3}))
    assert tiff.status_code == png.status_code == low.status_code == 200, low.text[:500]
    at_half = decode_mask(png.json()["predictions"][0]["mask_png"])
    at_03 = decode_mask(low.json()["predictions"][0]["mask_png"])
    assert np.array_equal(at_half, decode_mask(tiff.json()["predictions"][0]["mask_png"]))
    assert at_03.sum() > at_half.sum() and not (at_half & ~at_03).any()  # a lower threshold only adds


@pytest.mark.real
def test_server_resizes_a_128px_slice_and_answers_at_its_size(server, real_slice):
    import cv2

    small = cv2.resize(imageio.read_image(real_slice), (128, 128), interpolation=cv2.INTER_AREA)
    r = post(server.url, dataframe_split([b64(imageio.encode_png(small))]))
    assert r.status_code == 200, r.text[:500]
    assert decode_mask(r.json()["predictions"][0]["mask_png"]).shape == (128, 128)


@pytest.mark.real
def test_server_accepts_a_one_channel_flair_png_for_a_flair_model(server, real_slice):
    image = imageio.read_image(real_slice)
    gray = post(server.url, dataframe_split([b64(imageio.encode_png(image[:, :, 1]))]))
    rgb = post(server.url, dataframe_split([b64(imageio.encode_png(image))]))
    assert gray.status_code == rgb.status_code == 200, gray.text[:500]
    assert np.array_equal(decode_mask(gray.json()["predictions"][0]["mask_png"]),
                          decode_mask(rgb.json()["predictions"][0]["mask_png"]))


# ------------------------------------------------------------------------------------- REST: bad
@pytest.fixture(scope="module")
def bad_rows(synth_slice) -> dict:
    """name -> (bad cell value, words the error message must contain)."""
    good = synth_slice
    return {
        "not base64": ("this is not base64!", ["not valid base64"]),
        "non-image bytes": (b64(b"%PDF-1.4 a document, not a slice"), ["not a TIFF or PNG"]),
        "truncated TIFF": (b64(good[: len(good) // 2]), ["truncated TIFF"]),
        "16-bit image": (b64(tiff_bytes(np.full((64, 64), 1000, np.uint16))), ["uint16", "8-bit"]),
        "5 channels": (b64(tiff_bytes(np.zeros((64, 64, 5), np.uint8), photometric="minisblack",
                                      planarconfig="contig")), ["64x64x5", "5 channels"]),
        "5 channels as a page stack": (b64(tiff_bytes(np.zeros((64, 64, 5), np.uint8))), ["stack of 64 pages"]),
        "empty string": ("", ["empty value"]),
        "50 megapixels": (b64(imageio.encode_png(np.zeros((6300, 8000), np.uint8))), ["8000x6300", "pixel limit"]),
        "decompression bomb": (b64(png_claiming(100_000, 100_000)), ["decompression bomb"]),
    }


BAD_ROWS = ["not base64", "non-image bytes", "truncated TIFF", "16-bit image", "5 channels",
            "5 channels as a page stack", "empty string", "50 megapixels", "decompression bomb"]


@pytest.mark.parametrize("case", BAD_ROWS)
def test_server_refuses_a_bad_row_naming_it_then_still_serves(server, synth_slice, bad_rows, case):
    value, words = bad_rows[case]
    r = post(server.url, dataframe_split([b64(synth_slice), value]))
    assert r.status_code == 400, f"{case}: HTTP {r.status_code} {r.text[:300]}"
    message = r.json()["message"]
    for word in ["row 1", "column 'image'", *words]:
        assert word in message, f"{case}: {word!r} not in {message[-400:]!r}"
    assert post(server.url, dataframe_split([b64(synth_slice)])).status_code == 200


@pytest.mark.parametrize("case, body, words", [
    ("wrong column", {"dataframe_split": {"columns": ["img"], "data": [["x"]]}}, ["image"]),
    ("threshold out of range", {"params": {"threshold": 1.5}}, ["threshold", "1.5", "(0, 1)"]),
])
def test_server_refuses_a_bad_request_then_still_serves(server, synth_slice, case, body, words):
    if case == "threshold out of range":
        body = dataframe_split([b64(synth_slice)], body["params"])
    r = post(server.url, body)
    assert 400 <= r.status_code < 500, f"{case}: HTTP {r.status_code} {r.text[:300]}"
    message = r.json()["message"]
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message[-400:]!r}"
    assert post(server.url, dataframe_split([b64(synth_slice)])).status_code == 200


# ------------------------------------------------------------------------------ brainseg predict
@pytest.mark.real
def test_predict_writes_masks_overlays_and_features_and_names_a_corrupt_file(
        real_sample, tiny_model_dir, tmp_path, monkeypatch):
    from brainseg.data.context import DataContext
    from brainseg.evaluate import EvalSettings, evaluate
    from brainseg.train import load_model_dir

    patient_dir = min(p for p in real_sample.iterdir() if p.is_dir())
    inputs = tmp_path / "in" / patient_dir.name
    shutil.copytree(patient_dir, inputs)
    corrupt = inputs / f"{patient_dir.name}_999.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x07" * 100)
    slices = sorted(p for p in inputs.glob("*.tif") if not p.stem.endswith("_mask") and p != corrupt)
    out = tmp_path / "out"

    monkeypatch.chdir(PROJECT_ROOT)  # params.yaml
    result = invoke("predict", str(inputs), "--out", str(out), "--model", str(tiny_model_dir))

    assert result.exit_code == 1, result.output
    bad = [line for line in result.output.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and str(corrupt) in bad[0] and "TIFF" in bad[0], result.output
    features = pd.read_csv(out / "features.csv")
    patients = pd.read_csv(out / "patients.csv")
    assert len(features) == len(slices) and corrupt.name not in " ".join(features["file"])
    assert list(patients["patient"]) == [features["patient"][0]]

    ctx = DataContext.from_folder(inputs.parent)
    model, cfg = load_model_dir(tiny_model_dir)
    rows = ctx.rows("test")
    evaluated = evaluate(model, cfg, rows, ctx.arrays("test", cfg).X, ctx.truths("test"), EvalSettings(0.5))
    expected = {Path(p).stem: m for p, m in zip(rows["image_path"], evaluated.preds)}
    assert sorted(expected) == [p.stem for p in sorted(slices, key=lambda p: p.stem)]
    for s in slices:
        pred = np.asarray(Image.open(out / f"{s.stem}_pred.png"))
        assert pred.shape == (256, 256) and set(np.unique(pred).tolist()) <= {0, 255}, s.name
        assert np.array_equal(pred > 0, expected[s.stem]), s.name
        overlay = np.asarray(Image.open(out / f"{s.stem}_overlay.png"))
        assert overlay.shape[:2] == (256, 256), s.name
    row = features.set_index(features["file"].map(lambda f: Path(f).stem)).loc[slices[0].stem]
    assert row["area_px"] == int(expected[slices[0].stem].sum())
