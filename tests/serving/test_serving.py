"""The served segmenter end to end: registered, loaded back by alias, served over REST, and
``brainseg predict``; each must give exactly the masks ``evaluate`` gives.

The model is a tiny untrained U-Net (seeded): its masks are arbitrary but deterministic, which is
all an equality test between paths needs. The REST tests start the MLflow scoring server once
for the module, on 127.0.0.1 only, behind the body limit of :mod:`brainseg.serving.scoring_app`
(test_hostile_server.py and test_one_truth.py serve with plain ``mlflow models serve``). Hostile
input is in test_hostile_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from brainseg.bench import dataframe_split, experiment_in, serve_model
from brainseg.data import imageio
from brainseg.outcome.features import SLICE_FEATURE_COLUMNS, slice_features
from brainseg.registry import model_registry
from brainseg.serving.limits import RequestLimits
from brainseg.serving.pyfunc import OUTPUT_COLUMNS
from conftest import Tracking, noise
from helpers import PROJECT_ROOT, invoke, strict_json

BODY_TIMEOUT = RequestLimits.ENV["body_timeout_s"]

pytestmark = pytest.mark.timeout(600)

MODEL_NAME = "brainseg-segmenter"
CHAMPION_URI = f"models:/{MODEL_NAME}@{model_registry.CHAMPION}"
SERVER_READY_S = 90
HTTP_TIMEOUT_S = 60
MiB = 2**20
RSS_GROWTH_LIMIT_MB = 100


# ------------------------------------------------------------------------------------ helpers
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_mask(value: str) -> np.ndarray:
    """``mask_png`` -> (H, W) bool; the PNG must hold only 0 and 255."""
    arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(value))))
    assert arr.dtype == np.uint8 and set(np.unique(arr).tolist()) <= {0, 255}
    return arr > 0


def post(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=body, timeout=HTTP_TIMEOUT_S)


def as_floats(frame: pd.DataFrame) -> pd.DataFrame:
    """The answer's feature columns (object dtype, None for undefined) as floats with NaN."""
    return frame[SLICE_FEATURE_COLUMNS].astype(float).reset_index(drop=True)


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

    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.models.factory import build_model
    from brainseg.settings.config import Train

    cfg = Train.from_dict({"arch": "plain_unet", "base_filters": 4, "size": 64, "channels": "flair"})
    keras.utils.set_random_seed(0)
    return save_model(build_model(cfg), cfg, InferenceSettings(threshold=0.5), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def champion(tracking, tiny_model_dir) -> str:
    """The tiny model logged as pyfunc in a run, registered and made champion; returns the run id."""
    from brainseg.serving.pyfunc import log_pyfunc_segmenter

    experiment_in("serving-test", tracking.artifacts)  # the evaluation run below logs here too
    with mlflow.start_run(run_name="tiny-segmenter") as run:
        model_uri = log_pyfunc_segmenter(tiny_model_dir, meta={"data_version": "test-data"})
    mv, created = model_registry.register(MODEL_NAME, model_uri, run.info.run_id, {"source_run_id": run.info.run_id},
                                    "Tiny untrained test model. Not for use.")
    assert created
    model_registry.apply(model_registry.decide(MODEL_NAME, mv.version, "val_patient_dice_mean", 0.0, None, None,
                                               force=False))
    assert model_registry.champion(MODEL_NAME).version == mv.version
    return run.info.run_id


@pytest.fixture(scope="module")
def server(champion, tracking, tmp_path_factory):
    """MLflow's scoring server for ``models:/brainseg-segmenter@champion`` behind the body limit
    (:mod:`brainseg.serving.scoring_app`), default limits but a 3 s body timeout; always stopped afterwards."""
    try:
        with serve_model(CHAMPION_URI, tracking.uri, tmp_path_factory.mktemp("serve"),
                         timeout_s=SERVER_READY_S, body_limit=True, env={BODY_TIMEOUT: "3"}) as s:
            yield s
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def synth_images(tmp_path_factory) -> list[np.ndarray]:
    """Six 256x256 synthetic slices of one patient, in slice order."""
    from brainseg.data.synth import generate

    root = generate(tmp_path_factory.mktemp("synth") / "kaggle_3m", patients=1, slices=6, size=256, seed=0)
    files = sorted(root.glob("*/*_[0-9].tif"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return [imageio.read_image(p) for p in files]


# --------------------------------------------------------------- in process: the pyfunc's pieces
@pytest.mark.parametrize("env, expected", [
    ({}, (128, 10_485_760, 16 * MiB, 64 * MiB)),
    ({"BRAINSEG_SERVE_MAX_ROWS": "3", "BRAINSEG_SERVE_MAX_PIXELS": "1000"}, (3, 1000, 16 * MiB, 64 * MiB)),
    ({"BRAINSEG_SERVE_MAX_IMAGE_BYTES": " ", "BRAINSEG_SERVE_MAX_BODY_BYTES": "99"}, (128, 10_485_760, 16 * MiB, 99)),
])
def test_request_limits_come_from_the_environment_with_safe_defaults(env, expected):
    limits = RequestLimits.from_env(env)
    assert (limits.max_rows, limits.max_pixels, limits.max_image_bytes, limits.max_body_bytes) == expected


def test_the_default_limits_take_a_whole_real_patient_in_one_request():
    limits = RequestLimits()
    largest_patient = 88  # slices of the largest patient of the real LGG data set, 256x256 each
    assert limits.max_rows >= largest_patient and limits.max_pixels >= largest_patient * 256 * 256
    base64_tiff = 4 * (256 * 256 * 3 + 4096) // 3  # an uncompressed RGB TIFF slice, base64-encoded
    assert limits.max_body_bytes >= limits.max_rows * base64_tiff


@pytest.mark.parametrize("env, words", [
    ({"BRAINSEG_SERVE_MAX_ROWS": "abc"}, "BRAINSEG_SERVE_MAX_ROWS='abc' is not an integer"),
    ({"BRAINSEG_SERVE_MAX_PIXELS": "0"}, "BRAINSEG_SERVE_MAX_PIXELS='0' must be >= 1"),
])
def test_a_bad_limit_setting_is_refused_by_name(env, words):
    with pytest.raises(ValueError) as info:
        RequestLimits.from_env(env)
    assert str(info.value) == words


@pytest.mark.parametrize("params, expected", [
    (None, (0.4, True)), ({}, (0.4, True)), ({"threshold": 0.7}, (0.7, True)), ({"threshold": 1}, None),
    ({"return_mask": False}, (0.4, False)), ({"threshold": None}, None), ({"threshold": float("nan")}, None),
    ({"threshold": "0.5"}, None), ({"threshold": True}, None), ({"return_mask": 0}, None), ({"tta": True}, None),
])
def test_params_are_checked_by_name(params, expected):
    from brainseg.serving.pyfunc import BadRequest, RequestError, check_params

    if expected is not None:
        assert check_params(params, 0.4) == expected
        return
    with pytest.raises(RequestError) as info:
        check_params(params, 0.4)
    assert next(iter(params)) in str(info.value)
    served = BadRequest(str(info.value))  # what the served model's predict raises for it: a 400, reason first
    assert served.get_http_status_code() == 400 and served.message == str(info.value)


def test_an_empty_mask_answers_null_geometry_and_python_types():
    from brainseg.serving.pyfunc import answer_rows

    image = np.zeros((40, 50, 3), np.uint8)
    empty, box = np.zeros((40, 50), bool), np.zeros((40, 50), bool)
    box[10:20, 5:15] = True
    out = answer_rows([empty, box], [image, image], 0.5, False, {"run_id": "r1"})
    rows = json.loads(json.dumps(out.to_dict(orient="records")), parse_constant=lambda t: pytest.fail(t))
    assert list(out.columns) == OUTPUT_COLUMNS and rows[0]["mask_png"] is None
    assert (rows[0]["threshold"], rows[0]["return_mask"]) == (0.5, False)  # the params applied
    assert rows[0]["centroid_x"] is None and rows[0]["bbox_x0"] is None and rows[0]["area_px"] == 0
    assert rows[0]["area_pct_brain"] is None  # no head pixels: undefined, not NaN
    assert (rows[1]["bbox_x0"], rows[1]["bbox_y0"], rows[1]["bbox_x1"], rows[1]["bbox_y1"]) == (5, 10, 15, 20)
    assert type(rows[1]["bbox_x0"]) is int and rows[1]["centroid_x"] == 9.5 and rows[1]["model_run_id"] == "r1"


@pytest.mark.parametrize("stored", [
    {"threshold": 0.45, "min_component_px": 30, "largest_3d": True},
    {"threshold": 0.5, "keep_largest": True, "precision": "bfloat16"},
])
def test_the_pyfunc_applies_the_stored_inference_settings(tracking, tiny_model_dir, synth_images, tmp_path, stored):
    """Served masks = ``Segmenter.from_dir(model).segment(images, groups)``, stored settings and all."""
    from brainseg.inference.segmenter import SETTINGS_FILE, Segmenter
    from brainseg.serving.pyfunc import log_pyfunc_segmenter

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    doc = json.loads((model_dir / SETTINGS_FILE).read_text())
    doc["inference"].update(stored)
    (model_dir / SETTINGS_FILE).write_text(json.dumps(doc))
    experiment_in("serving-test", tracking.artifacts)
    with mlflow.start_run():
        uri = log_pyfunc_segmenter(model_dir)
    pyfunc = mlflow.pyfunc.load_model(uri)
    served = pyfunc.unwrap_python_model().segmenter
    assert served.settings.to_dict() == {**doc["inference"]} and served.precision == stored.get("precision", "float32")

    frame = pd.DataFrame({"image": [b64(imageio.encode_png(im)) for im in synth_images], "patient": ["p1"] * 6})
    out = pyfunc.predict(frame)
    want = Segmenter.from_dir(model_dir).segment(synth_images, groups=["p1"] * 6).masks
    assert [decode_mask(v).tolist() for v in out["mask_png"]] == [m.tolist() for m in want]
    assert set(out["threshold"]) == {stored["threshold"]} and 0 < sum(m.sum() for m in want)


@pytest.fixture(scope="module")
def real_slice(real_sample) -> Path:
    """The real sample slice with the most tumor pixels (a fixed choice)."""
    masks = sorted(real_sample.glob("*/*_mask.tif"))
    best = max(masks, key=lambda p: (int(imageio.read_mask(p).sum()), str(p)))
    return best.with_name(best.name.replace("_mask.tif", ".tif"))


# ----------------------------------------------------------------- registry -> pyfunc = evaluate
@pytest.mark.real
def test_champion_by_alias_gives_the_masks_and_features_of_evaluate(champion, real_sample, monkeypatch):
    from brainseg.data.context import DataContext
    from brainseg.evaluation.evaluate_run import tracked_evaluation
    from brainseg.settings.config import validate_settings

    ctx = DataContext.from_folder(real_sample)
    rows = ctx.rows("test")
    evaluated = tracked_evaluation(validate_settings({"profile": "test"}), CHAMPION_URI, ctx, "test")
    assert evaluated["metrics"]["n_slices"] == len(rows) == 176

    monkeypatch.setenv("BRAINSEG_SERVE_MAX_ROWS", "500")  # the whole sample in one call (default limits:
    monkeypatch.setenv("BRAINSEG_SERVE_MAX_PIXELS", str(500 * 256 * 256))  # 128 rows, 8.4 M pixels)
    served = mlflow.pyfunc.load_model(CHAMPION_URI)
    frame = pd.DataFrame({"image": [b64(Path(p).read_bytes()) for p in rows["image_path"]],
                          "patient": rows["patient"].tolist()})  # volumes, as evaluate segments them
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
    pd.testing.assert_frame_equal(as_floats(out), want.astype(float))
    assert set(out["model_run_id"]) == {champion} and set(out["data_version"]) == {"test-data"}


# ------------------------------------------------------------------------------------ REST: good
@pytest.mark.real
def test_server_segments_a_real_slice_in_split_and_records_form(server, real_slice, champion):
    value = b64(real_slice.read_bytes())
    split = post(server.url, dataframe_split([value]))
    records = post(server.url, {"dataframe_records": [{"image": value}]})
    assert split.status_code == 200, split.text[:500]
    assert records.status_code == 200, records.text[:500]
    a, b = strict_json(split.text)["predictions"][0], strict_json(records.text)["predictions"][0]
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
    at_half = decode_mask(strict_json(png.text)["predictions"][0]["mask_png"])
    at_03 = decode_mask(strict_json(low.text)["predictions"][0]["mask_png"])
    assert np.array_equal(at_half, decode_mask(strict_json(tiff.text)["predictions"][0]["mask_png"]))
    assert at_03.sum() > at_half.sum() and not (at_half & ~at_03).any()  # a lower threshold only adds


@pytest.mark.real
def test_server_resizes_a_128px_slice_and_answers_at_its_size(server, real_slice):
    import cv2

    small = cv2.resize(imageio.read_image(real_slice), (128, 128), interpolation=cv2.INTER_AREA)
    r = post(server.url, dataframe_split([b64(imageio.encode_png(small))]))
    assert r.status_code == 200, r.text[:500]
    assert decode_mask(strict_json(r.text)["predictions"][0]["mask_png"]).shape == (128, 128)


@pytest.mark.real
def test_server_accepts_a_one_channel_flair_png_for_a_flair_model(server, real_slice):
    image = imageio.read_image(real_slice)
    gray = post(server.url, dataframe_split([b64(imageio.encode_png(image[:, :, 1]))]))
    rgb = post(server.url, dataframe_split([b64(imageio.encode_png(image))]))
    assert gray.status_code == rgb.status_code == 200, gray.text[:500]
    assert np.array_equal(decode_mask(strict_json(gray.text)["predictions"][0]["mask_png"]),
                          decode_mask(strict_json(rgb.text)["predictions"][0]["mask_png"]))


# ------------------------------------------------------------------------- the body-size limit
def call_asgi(headers: dict, chunks: list[bytes], max_bytes: int = 10, guard=None
              ) -> tuple[int, bytes, list[bytes], int]:
    """One POST through ``guard`` (default ``BodyLimit``) around an app that echoes the body's length.

    Returns (status, answer body, the bodies the app saw, messages left unread)."""
    from brainseg.serving.scoring_app import BodyLimit

    inbox = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent, seen = [], []

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def echo(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    app = (guard or (lambda inner: BodyLimit(inner, max_bytes)))(echo)
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], seen, len(inbox)


@pytest.mark.parametrize("headers, chunks, status, seen, unread", [
    ({"content-length": "10"}, [b"x" * 10], 200, [b"x" * 10], 0),
    ({"content-length": "11"}, [b"x" * 5, b"x" * 6], 413, [], 2),  # refused from the header, no byte read
    ({"content-length": str(70 * MiB)}, [], 413, [], 0),  # declared, never sent: answered at once
    ({"content-length": "1e9"}, [b"x"], 413, [], 1),
    ({}, [b"x" * 5, b"x" * 5], 200, [b"x" * 10], 0),  # chunked: read, then handed on whole
    ({}, [b"x" * 4] * 5, 413, [], 2),  # chunked: refused once past the limit (3 chunks), the rest unread
])
def test_the_body_limit_refuses_a_body_over_the_limit_before_the_app_reads_it(headers, chunks, status, seen,
                                                                              unread):
    got, answer, app_saw, left = call_asgi(headers, chunks)
    assert (got, app_saw, left) == (status, seen, unread)
    if status == 413:
        message = strict_json(answer)["message"]
        assert "exceeds the limit of 10 bytes per request (BRAINSEG_SERVE_MAX_BODY_BYTES)" in message


@pytest.mark.parametrize("headers, status", [
    ({"content-type": "application/json", "content-length": "2"}, 200),
    ({"content-length": "2"}, 415),
    ({"content-type": " ", "content-length": "2"}, 415),
])
def test_a_post_without_a_content_type_gets_a_415_naming_the_header(headers, status):
    from brainseg.serving.scoring_app import BodyLimit, ContentTypeRequired

    got, answer, app_saw, left = call_asgi(headers, [b"{}"],
                                           guard=lambda echo: ContentTypeRequired(BodyLimit(echo, 10)))
    assert (got, app_saw, left) == ((200, [b"{}"], 0) if status == 200 else (415, [], 1))
    if status == 415:
        message = strict_json(answer)["message"]
        assert message.startswith("the request has no Content-Type header") and "\n" not in message


def test_a_body_that_stops_arriving_gets_a_408_and_the_app_never_sees_it():
    from brainseg.serving.scoring_app import BodyLimit

    seen = []

    async def stalled():  # 4 of 10 declared bytes, then nothing
        if not seen:
            seen.append(1)
            return {"type": "http.request", "body": b"x" * 4, "more_body": True}
        await asyncio.sleep(3600)

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": [(b"content-length", b"10")]}
    start = time.monotonic()
    asyncio.run(BodyLimit(app, 100, timeout_s=0.2)(scope, stalled, send))
    assert sent[0]["status"] == 408 and time.monotonic() - start < 2
    message = strict_json(sent[1]["body"])["message"]
    assert message.startswith("request body incomplete: 4 of the 10 declared bytes arrived in 0.2 s")
    assert BODY_TIMEOUT in message


def test_a_partial_body_is_refused_while_three_good_clients_get_their_answers(server, synth_images):
    """A client declares 5,000 bytes, sends 100 and stalls: it gets a 408 after the body timeout, and
    three clients posting meanwhile get their 200s (a stalled body holds no worker)."""
    import concurrent.futures

    host = server.url.split("//", 1)[1].encode()
    cell = b64(imageio.encode_png(synth_images[0]))
    head = (b"POST /invocations HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b"{" * 100)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        partial = pool.submit(raw_post, server.url, head, 30.0)
        time.sleep(0.5)  # the partial request is in, then the good ones
        good = [pool.submit(post, server.url, dataframe_split([cell])) for _ in range(3)]
        answers = [f.result() for f in good]
        assert not partial.done() or partial.result()[0].startswith(b"HTTP/1.1 408")
        answer, seconds = partial.result()
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert answer.startswith(b"HTTP/1.1 408") and b"request body incomplete: 100 of the 5,000 declared" in answer
    assert 2.5 < seconds < 15, seconds


def raw_post(url: str, head: bytes, timeout_s: float = 10.0) -> tuple[bytes, float]:
    """Send only ``head`` (request line and headers) to the server; (what it answers, seconds to answer)."""
    parts = urlsplit(url)
    start = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer, time.monotonic() - start


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_the_server_answers_a_huge_declared_body_at_once_and_a_missing_content_type_with_415(
        server, synth_images):
    """70 MiB declared and nothing sent: the 413 comes before any byte (it used to wait for the body);
    no Content-Type: a 415 naming the header, where MLflow's app answers 500 with a traceback in its log."""
    host = server.url.split("//", 1)[1].encode()
    answer, seconds = raw_post(server.url, b"POST /invocations HTTP/1.1\r\nHost: " + host + b"\r\n"
                               b"Content-Type: application/json\r\nContent-Length: " +
                               str(70 * MiB).encode() + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and seconds < 3, (answer[:300], seconds)
    assert b"exceeds the limit of" in answer and b"BRAINSEG_SERVE_MAX_BODY_BYTES" in answer
    cell = b64(imageio.encode_png(synth_images[0]))
    log_before = len(server.log_path.read_bytes())
    r = requests.post(f"{server.url}/invocations", data=json.dumps(dataframe_split([cell])).encode(),
                      timeout=HTTP_TIMEOUT_S)  # bytes: requests sends no Content-Type
    assert "content-type" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 415, r.text[:300]
    assert strict_json(r.text)["message"].startswith("the request has no Content-Type header")
    assert post(server.url, dataframe_split([cell])).status_code == 200  # and it keeps answering
    assert "Traceback" not in server.log_path.read_bytes()[log_before:].decode(errors="replace")


def test_a_400_body_begins_with_its_reason(server):
    r = post(server.url, dataframe_split(["@@@ not base64"]))
    assert r.status_code == 400, r.text[:300]
    message = strict_json(r.text)["message"]
    assert message.startswith("row 0, column 'image': not valid base64"), message[:300]
    assert "Failed to predict data" not in message  # MLflow's dump of the request is dropped (issue 37)


def test_the_server_refuses_an_oversized_body_with_413_and_flat_memory(server, synth_images):
    """160 MiB bodies, with a length and chunked: MLflow alone would read and parse all of them."""
    limits = RequestLimits()
    worker = server.worker_pid()
    Path(f"/proc/{worker}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = server.memory_mb()["worker_peak_rss_mb"]
    cell = b64(imageio.encode_png(synth_images[0]))
    head = b'{"dataframe_split": {"columns": ["image"], "data": [["'
    size = limits.max_body_bytes * 5 // 2

    def chunked():
        yield head
        for _ in range(size // MiB):
            yield b"A" * MiB
        yield b'"]]}}'

    answers = [requests.post(f"{server.url}/invocations", data=head + b"A" * size + b'"]]}}',
                             headers={"Content-Type": "application/json"}, timeout=HTTP_TIMEOUT_S),
               requests.post(f"{server.url}/invocations", data=chunked(),
                             headers={"Content-Type": "application/json"}, timeout=HTTP_TIMEOUT_S)]
    growth = server.memory_mb()["worker_peak_rss_mb"] - before
    for r in answers:
        assert r.status_code == 413, r.text[:300]
        assert f"limit of {limits.max_body_bytes:,} bytes per request (BRAINSEG_SERVE_MAX_BODY_BYTES)" in \
            strict_json(r.text)["message"]
    assert growth < RSS_GROWTH_LIMIT_MB, f"peak RSS grew {growth:.0f} MB"
    over = post(server.url, dataframe_split([cell] * (limits.max_rows + 1)))  # small body, too many rows
    assert over.status_code == 400 and (f"{limits.max_rows + 1} rows exceed the limit of {limits.max_rows} rows "
                                        "per request (BRAINSEG_SERVE_MAX_ROWS)") in strict_json(over.text)["message"]
    assert post(server.url, dataframe_split([cell])).status_code == 200  # and it keeps answering


def test_the_answer_lists_the_params_applied_and_mlflow_drops_undeclared_ones(server, synth_images):
    cell = b64(imageio.encode_png(synth_images[0]))
    r = post(server.url, dataframe_split([cell], {"return_mask": False, "thresold": 0.9}))
    assert r.status_code == 200, r.text[:300]
    row = strict_json(r.text)["predictions"][0]
    assert row["mask_png"] is None and (row["threshold"], row["return_mask"]) == (0.5, False)
    assert "thresold" not in row and list(row) == OUTPUT_COLUMNS
    default = strict_json(post(server.url, dataframe_split([cell], {"threshold": 0.3})).text)["predictions"][0]
    assert (default["threshold"], default["return_mask"]) == (0.3, True) and default["mask_png"]
    log = server.log_path.read_text(errors="replace")
    assert "Unrecognized params ['thresold'] are ignored" in log  # MLflow's warning, in the server's log


def test_the_served_models_log_has_no_tensorflow_noise(server, synth_images):
    assert post(server.url, dataframe_split([b64(imageio.encode_png(synth_images[0]))])).status_code == 200
    lines = server.log_path.read_text(errors="replace").splitlines()
    assert any("Application startup complete" in line for line in lines), lines[-20:]
    dropped_param = "Unrecognized params"  # MLflow's warning for a client's undeclared param (test above)
    assert [line for line in noise(lines) if dropped_param not in line] == []


# ------------------------------------------------------------------------------ brainseg predict
@pytest.mark.real
def test_predict_writes_masks_overlays_and_features_and_names_a_corrupt_file(
        real_sample, tiny_model_dir, tmp_path, monkeypatch):
    from brainseg.data.arrays import load_full_images
    from brainseg.data.context import DataContext
    from brainseg.evaluation.evaluate import evaluate
    from brainseg.inference.segmenter import Segmenter

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
    rows = ctx.rows("test")
    evaluated = evaluate(Segmenter.from_dir(tiny_model_dir), rows, load_full_images(rows), ctx.truths("test"))
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
