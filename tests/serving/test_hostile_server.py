"""Hostile input against the project's server of the segmenter (issues 13 and 37): MLflow's scoring
app behind :mod:`brainseg.serving.scoring_app` (the body limit, the body checks and the error
answers' cleaning), started as docs/serving.md says.

Every case asserts the status, that the message names the problem (row, column, parameter or
limit), that no stack trace, server path or path under the model's artifacts leaks, that the
answer is strict JSON (no NaN or Infinity tokens), that an error answer is bounded and does not
repeat the request, and that a good request still succeeds right after it. The memory test sends
decompression bombs and asserts the serving process's peak RSS grows by less than 100 MB. What
``mlflow models serve`` alone answers to the requests the wrapper fixes (docs/serving.md says it)
is checked on MLflow's own app, in process.

The server runs with the default request limits (:class:`brainseg.serving.limits.RequestLimits`; the
limit cases read them, so they follow a change of the defaults) and the decoder's default
per-image limit; the model is a tiny seeded untrained U-Net (masks arbitrary but deterministic).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import io
import json
import math
import struct
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import tifffile

from brainseg.bench import dataframe_split, experiment_in, register_champion, serve_model
from brainseg.data import imageio
from brainseg.serving.limits import RequestLimits
from brainseg.serving.pyfunc import OUTPUT_COLUMNS
from conftest import Tracking
from helpers import strict_json, tiff_bytes

pytestmark = pytest.mark.timeout(900)

LIMITS = RequestLimits()  # the defaults: the server's environment sets none of BRAINSEG_SERVE_*
ENV = RequestLimits.ENV
RSS_GROWTH_LIMIT_MB = 100
LEAKS = ("Traceback", "stack_trace", "site-packages", 'File "/')
MAX_ERROR_BODY = 1024 + 100  # docs/serving.md: at most 1 KiB of message, plus the JSON around it


# ------------------------------------------------------------------------------------ helpers
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a ``width`` x ``height`` grey image with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return imageio.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@functools.lru_cache(maxsize=2)
def png_zeros(width: int, height: int) -> bytes:
    """A valid, fully decodable RGB PNG of zeros: ``width`` x ``height`` x 3 bytes once decoded,
    a few KB per megapixel on the wire (rows are compressed as they are made)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(1 + 3 * width)  # filter byte 0, then the row's pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return imageio.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiff_bomb(shape: tuple[int, int, int], planar: bool, tile: int = 1024) -> bytes:
    """A small zlib TIFF of zeros declaring ``shape`` ((S, H, W) planar or (H, W, S) contiguous).

    Tiles are compressed once and repeated, so building it costs no memory.
    """
    if planar:
        s, h, w = shape
        n, tile_bytes = s * math.ceil(h / tile) * math.ceil(w / tile), tile * tile
        kwargs = {"photometric": "rgb", "planarconfig": "separate"}
    else:
        h, w, s = shape
        n, tile_bytes = math.ceil(h / tile) * math.ceil(w / tile), tile * tile * s
        kwargs = {"photometric": "minisblack", "planarconfig": "contig"}
    chunk = zlib.compress(bytes(tile_bytes), 9)
    buf = io.BytesIO()
    tifffile.imwrite(buf, data=(chunk for _ in range(n)), shape=shape, dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", **kwargs)
    return buf.getvalue()


def post(url: str, body, content_type: str = "application/json") -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{url}/invocations", data=data, headers={"Content-Type": content_type}, timeout=120)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-mlflow")
    with Tracking(folder / "mlflow.db") as t:
        t.artifacts = folder / "artifacts"
        yield t


@pytest.fixture(scope="module")
def good_slice(tmp_path_factory) -> bytes:
    """TIFF bytes of a 256x256 synthetic slice (RGB, uint8)."""
    from brainseg.data.synth import generate

    root = generate(tmp_path_factory.mktemp("synth") / "kaggle_3m", patients=1, slices=8, size=256, seed=0)
    return next(root.glob("*/*_4.tif")).read_bytes()


@pytest.fixture(scope="module")
def server(tracking, tmp_path_factory, good_slice):
    import tf_keras as keras

    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.models.factory import build_model
    from brainseg.settings.config import Train

    cfg = Train.from_dict({"arch": "plain_unet", "base_filters": 4, "size": 64, "channels": "flair"})
    keras.utils.set_random_seed(0)
    model_dir = save_model(build_model(cfg), cfg, InferenceSettings(threshold=0.5),
                           tmp_path_factory.mktemp("tiny-model"))
    experiment_in("hostile", tracking.artifacts)
    uri = register_champion(model_dir, imageio.read_image(_as_file(tmp_path_factory, good_slice)),
                            tracking.artifacts)
    with serve_model(uri, tracking.uri, tmp_path_factory.mktemp("serve"), timeout_s=300, body_limit=True,
                     env={var: "" for var in ENV.values()}) as s:  # "" = unset: the defaults
        s.model_uri, s.artifacts = uri, tracking.artifacts
        yield s


def assert_clean(r: requests.Response, server, sent: bytes = b"") -> None:
    """No stack trace, site-packages, path under the model's artifacts; an error answer is bounded
    and does not repeat (a 64-byte piece of) what was sent."""
    for leak in (*LEAKS, str(server.artifacts), str(Path(server.artifacts).resolve())):
        assert leak not in r.text, f"the answer leaks {leak!r}: {r.text[-500:]!r}"
    if r.status_code >= 400:
        assert len(r.content) <= MAX_ERROR_BODY, f"an error answer of {len(r.content):,} bytes"
        if len(sent) >= 64:
            middle = sent[len(sent) // 2:len(sent) // 2 + 64]
            assert middle not in r.content and repr(middle)[2:-1].encode() not in r.content, "the answer echoes"


def _as_file(tmp_path_factory, data: bytes) -> Path:
    path = tmp_path_factory.mktemp("slice") / "slice.tif"
    path.write_bytes(data)
    return path


def assert_still_serves(url: str, good: bytes) -> dict:
    r = post(url, dataframe_split([b64(good)]))
    assert r.status_code == 200, r.text[:300]
    row = strict_json(r.text)["predictions"][0]
    assert list(row) == OUTPUT_COLUMNS
    return row


# ------------------------------------------------------------------------------- the cases
GOOD = "GOOD"  # placeholder for the good slice's base64 in a case's body


def split_of(*cells, params=None) -> dict:
    return dataframe_split(list(cells), params)


def _pixels_side() -> int:
    """The side of a square image of which 2 fit in the request's pixel limit and 3 do not."""
    side = math.isqrt(LIMITS.max_pixels // 2)
    assert 3 * side * side > LIMITS.max_pixels and 32 <= side and side * side <= imageio.pixel_limit()
    return side


def _cases() -> list[tuple[str, object, int, list[str]]]:
    """(name, body, status, words the message must hold). GOOD in a body stands for the good slice."""
    rgb = np.full((64, 64, 3), 90, np.uint8)
    cell = ["row 0", "column 'image'"]
    side = _pixels_side()
    return [
        # ---- params
        ("threshold null", split_of(GOOD, params={"threshold": None}), 400, ["threshold", "null"]),
        ("threshold string", split_of(GOOD, params={"threshold": "0.5"}), 400, ["threshold"]),
        ("threshold list", split_of(GOOD, params={"threshold": [0.5]}), 400, ["threshold"]),
        ("threshold object", split_of(GOOD, params={"threshold": {"v": 0.5}}), 400, ["threshold"]),
        ("threshold boolean", split_of(GOOD, params={"threshold": True}), 400, ["threshold"]),
        ("threshold 1.5", split_of(GOOD, params={"threshold": 1.5}), 400, ["threshold", "1.5", "(0, 1)"]),
        ("threshold 0", split_of(GOOD, params={"threshold": 0}), 400, ["threshold", "(0, 1)"]),
        ("threshold 1", split_of(GOOD, params={"threshold": 1}), 400, ["threshold", "(0, 1)"]),
        ("threshold negative", split_of(GOOD, params={"threshold": -0.2}), 400, ["threshold", "-0.2"]),
        ("threshold NaN token", json.dumps(split_of(GOOD, params={"threshold": float("nan")})), 400,
         ["threshold", "nan"]),
        ("threshold Infinity token", json.dumps(split_of(GOOD, params={"threshold": float("inf")})), 400,
         ["threshold", "inf"]),
        ("return_mask string", split_of(GOOD, params={"return_mask": "yes"}), 400, ["return_mask"]),
        ("return_mask 1", split_of(GOOD, params={"return_mask": 1}), 400, ["return_mask"]),
        ("return_mask null", split_of(GOOD, params={"return_mask": None}), 400, ["return_mask", "null"]),
        ("params a list", {**split_of(GOOD), "params": [0.5]}, 400, ["arameters", "dictionary"]),
        # ---- the image cell
        ("image number", split_of(5), 400, [*cell, "got a number", "expected a string"]),
        ("image float", split_of(0.5), 400, [*cell, "got a number", "expected a string"]),
        ("image list", split_of([1, 2, 3]), 400, [*cell, "got a list", "expected a string"]),
        ("image object", {"dataframe_records": [{"image": {"a": 1}}]}, 400, [*cell, "got an object"]),
        ("image null", split_of(None), 400, [*cell, "null"]),
        ("image boolean", split_of(True), 400, [*cell, "got a boolean", "expected a string"]),
        ("image empty string", split_of(""), 400, ["row 0", "column 'image'", "empty"]),
        ("image blanks", split_of("   "), 400, ["row 0", "empty"]),
        ("not base64", split_of("this is not base64!"), 400, ["row 0", "not valid base64"]),
        ("base64 of text", split_of(b64(b"%PDF-1.4 a document")), 400, ["row 0", "not a TIFF or PNG"]),
        ("TIFF magic only", split_of(b64(b"II*\x00")), 400, ["row 0", "TIFF"]),
        ("truncated PNG", split_of(b64(imageio.encode_png(rgb)[:60])), 400, ["row 0", "PNG"]),
        ("1x1 image", split_of(b64(imageio.encode_png(np.zeros((1, 1, 3), np.uint8)))), 400,
         ["row 0", "1x1", "too small"]),
        ("16x300 image", split_of(b64(imageio.encode_png(np.zeros((16, 300), np.uint8)))), 400,
         ["row 0", "300x16", "too small"]),
        ("16-bit image", split_of(b64(tiff_bytes(np.full((64, 64), 1000, np.uint16)))), 400, ["row 0", "uint16"]),
        ("float image", split_of(b64(tiff_bytes(np.zeros((64, 64), np.float32)))), 400, ["row 0", "float32"]),
        ("5 channels", split_of(b64(tiff_bytes(np.zeros((64, 64, 5), np.uint8), photometric="minisblack",
                                               planarconfig="contig"))), 400, ["row 0", "5 channels"]),
        ("RGBA", split_of(b64(imageio.encode_png(np.zeros((64, 64, 4), np.uint8)))), 400, ["row 0", "4"]),
        ("page stack", split_of(b64(tiff_bytes(np.zeros((6, 64, 64), np.uint8), photometric="minisblack"))), 400,
         ["row 0", "stack of 6 pages"]),
        ("PNG claiming 100000x100000", split_of(b64(png_claiming(100_000, 100_000))), 400,
         ["row 0", "decompression bomb", "limit"]),
        ("image over the byte limit", split_of(b64(bytes(LIMITS.max_image_bytes + 3))), 400,
         ["row 0", f"limit of {LIMITS.max_image_bytes:,} bytes per image", ENV["max_image_bytes"]]),
        ("bad row among good ones", split_of(GOOD, GOOD, GOOD, "@@@"), 400, ["row 3", "base64"]),
        # ---- the table and the request
        ("too many rows", split_of(*[b64(imageio.encode_png(rgb))] * (LIMITS.max_rows + 1)), 400,
         [f"{LIMITS.max_rows + 1} rows", f"limit of {LIMITS.max_rows} rows", ENV["max_rows"]]),
        ("too many pixels", split_of(*[b64(png_claiming(side, side))] * 3), 400,
         ["row 2", f"limit of {LIMITS.max_pixels:,} pixels", ENV["max_pixels"]]),
        ("no rows", {"dataframe_split": {"columns": ["image"], "data": []}}, 400, ["no rows"]),
        ("wrong column", {"dataframe_split": {"columns": ["img"], "data": [["x"]]}}, 400, ["image"]),
        ("extra column", {"dataframe_records": [{"image": GOOD, "slice_no": 3}]}, 400, ["slice_no", "unknown column"]),
        ("patient null", {"dataframe_records": [{"image": GOOD, "patient": None}]}, 400,
         ["row 0", "column 'patient'", "null"]),
        ("body not JSON", b"{not json", 400, ["JSON"]),
        ("no dataframe key", {"rows": [GOOD]}, 400, ["dataframe_split"]),
        ("split data not a list", {"dataframe_split": {"columns": ["image"], "data": "abc"}}, 400,
         ["dataframe_split", "not a valid dataframe", "'split' format"]),
        ("wrong content type", b"image=abc", 415, ["content type"]),
    ]


CASES = _cases()
CASE_IDS = [c[0] for c in CASES]


def _fill(body, good: str):
    if isinstance(body, dict):
        return {k: _fill(v, good) for k, v in body.items()}
    if isinstance(body, list):
        return [_fill(v, good) for v in body]
    if isinstance(body, str) and GOOD in body and body.startswith("{"):
        return body.replace(f'"{GOOD}"', json.dumps(good))
    return good if body == GOOD else body


@pytest.mark.parametrize("name, body, status, words", CASES, ids=CASE_IDS)
def test_a_hostile_request_is_refused_by_name_then_the_server_still_serves(server, good_slice, name, body,
                                                                           status, words):
    content_type = "text/plain" if name == "wrong content type" else "application/json"
    r = post(server.url, _fill(body, b64(good_slice)), content_type)
    assert r.status_code == status, f"{name}: HTTP {r.status_code} {r.text[:400]}"
    message = strict_json(r.text)["message"]
    for word in words:
        assert word.lower() in message.lower(), f"{name}: {word!r} not in {message[-500:]!r}"
    assert_clean(r, server)
    assert_still_serves(server.url, good_slice)


REASON_FIRST = [  # (name, body, the reason the 400's message must begin with)
    ("not base64", split_of("this is not base64!"), "row 0, column 'image': not valid base64"),
    ("bad row among good ones", split_of(GOOD, GOOD, GOOD, "@@@"), "row 3, column 'image': not valid base64"),
    ("threshold 1.5", split_of(GOOD, params={"threshold": 1.5}), "param 'threshold': 1.5 is not in (0, 1)"),
    ("16-bit image", split_of(b64(tiff_bytes(np.full((64, 64), 1000, np.uint16)))), "row 0, column 'image': "),
]


@pytest.mark.parametrize("name, body, reason", REASON_FIRST, ids=[c[0] for c in REASON_FIRST])
def test_a_400_is_its_reason_without_mlflows_dump_of_the_request(server, good_slice, name, body, reason):
    """MLflow's scoring app puts "Failed to predict data '<the request table>'" before the model's
    message; the model puts its reason first (brainseg.serving.pyfunc.BadRequest) and the server
    drops the dump (brainseg.serving.answers.clean_message)."""
    r = post(server.url, _fill(body, b64(good_slice)))
    assert r.status_code == 400, r.text[:300]
    message = strict_json(r.text)["message"]
    assert message.startswith(reason) and "\n" not in message, f"{name}: {message[:300]!r}"
    assert "Failed to predict data" not in message and strict_json(r.text).keys() == {"error_code", "message"}


# ------------------------------------------------------------------- requests MLflow's app echoed or 500ed
def _noise(n: int) -> bytes:
    """``n`` bytes that are not UTF-8 (0xff first), the same on every run."""
    return b"\xff" + np.random.default_rng(0).bytes(n - 1)


def _gzip_of_a_good_request(good: str) -> bytes:
    return gzip.compress(json.dumps(split_of(good)).encode())


RAW_CASES = [  # (name, body (GOOD: the good slice's base64), extra headers, status, the message's beginning)
    ("random bytes", _noise(4096), {}, 400, "the request body is not UTF-8 text (byte 0xff at offset 0)"),
    ("2 MiB of random bytes", _noise(2 * 2**20), {}, 400, "the request body is not UTF-8 text (byte 0xff"),
    ("gzip with Content-Encoding: gzip", "GZIP", {"Content-Encoding": "gzip"}, 415,
     "Content-Encoding 'gzip' is not accepted: this server decodes no compressed body"),
    ("gzip without Content-Encoding", "GZIP", {}, 400, "the request body is not UTF-8 text (byte 0x8b at offset 1)"),
    ("Content-Encoding: br", b'{"dataframe_split": {}}', {"Content-Encoding": "br"}, 415, "Content-Encoding 'br'"),
    ("latin-1 text", '{"dataframe_records": [{"image": "caf\xe9"}]}'.encode("latin-1"), {}, 400,
     "the request body is not UTF-8 text (byte 0xe9 at offset 37)"),
    ("JSON nested 10,000 levels", ('{"dataframe_split": ' + "[" * 10_000 + "]" * 10_000 + "}").encode(), {}, 400,
     "the request's JSON is nested more than 64 levels deep"),
    ("JSON nested 100 levels", ('{"dataframe_split": {"columns": ["image"], "data": ' + "[" * 100 + "]" * 100
                                + "}}").encode(), {}, 400, "the request's JSON is nested more than 64 levels deep"),
    ("a 5,000-digit integer", ('{"dataframe_split": {"columns": ["image"], "data": [[' + "9" * 5000
                               + "]]}}").encode(), {}, 400,
     "the request body holds a number of more than 4,300 digits"),
    ("not JSON after good bytes", b'{"dataframe_split": {"columns": ["image"], "data": [["' + b"A" * 5000 + b'"]]',
     {}, 400, "the request body is not valid JSON: Expecting ',' delimiter at line 1 column "),
    ("return_mask \"false\"", split_of(GOOD, params={"return_mask": "false"}), {}, 400,
     "param 'return_mask': expected boolean; Can not safely convert `<class 'str'>` to `DataType.boolean` for value "
     "`false`"),
    ("threshold \"0.9\"", split_of(GOOD, params={"threshold": "0.9"}), {}, 400,
     "param 'threshold': expected double; Can not safely convert `<class 'str'>` to `DataType.double` for value "
     "`0.9`"),
]


def _raw(body, good: str) -> bytes:
    if body == "GZIP":
        return _gzip_of_a_good_request(good)
    return body if isinstance(body, bytes) else json.dumps(_fill(body, good)).encode()


@pytest.mark.parametrize("name, body, headers, status, reason", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_a_body_mlflow_would_echo_or_answer_with_500_gets_a_bounded_answer_naming_the_problem(
        server, good_slice, name, body, headers, status, reason):
    data = _raw(body, b64(good_slice))
    r = requests.post(f"{server.url}/invocations", data=data, timeout=120,
                      headers={"Content-Type": "application/json", **headers})
    assert r.status_code == status, f"{name}: HTTP {r.status_code} {r.text[:400]}"
    answer = strict_json(r.text)
    assert answer.keys() == {"error_code", "message"} and answer["message"].startswith(reason), answer
    assert "\n" not in answer["message"] and "Failed to predict data" not in answer["message"], answer
    assert_clean(r, server, data)
    assert_still_serves(server.url, good_slice)


# --------------------------------------------------------- what `mlflow models serve` alone answers (docs)
def asgi_post(app, body: bytes, headers: dict) -> tuple[int, bytes]:
    """One POST /invocations to an ASGI ``app`` in process: (status, body)."""
    sent, inbox = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/invocations", "raw_path": b"/invocations", "query_string": b"",
             "root_path": "", "server": ("127.0.0.1", 5000), "client": ("127.0.0.1", 1),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    try:
        asyncio.run(app(scope, receive, send))
    except Exception:  # noqa: BLE001 - the framework re-raises after sending its 500
        pass
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


MLFLOW_ALONE = {  # name -> (status, what its answer holds), as docs/serving.md states them for MLflow 3.17
    "random bytes": (400, "the body, escaped"),
    "gzip with Content-Encoding: gzip": (400, "the body, escaped"),
    "JSON nested 10,000 levels": (500, "Internal Server Error"),
    "a 5,000-digit integer": (500, "Internal Server Error"),
    "return_mask \"false\"": (400, "the dump first"),
}


@pytest.fixture(scope="module")
def loaded(server):
    """The served model, loaded in this process."""
    return mlflow.pyfunc.load_model(server.model_uri)


@pytest.fixture(scope="module")
def mlflow_app(loaded):
    """MLflow's own scoring app (what ``mlflow models serve`` runs) for the same model, in process."""
    from mlflow.pyfunc import scoring_server

    return scoring_server.init(loaded)


def test_an_error_the_segmenter_did_not_foresee_is_logged_and_answered_with_a_generic_500(
        loaded, mlflow_app, good_slice, monkeypatch, caplog):
    """MLflow alone answers an unforeseen exception of a model with a 400 holding its traceback."""
    def broken(*args, **kwargs):
        raise RuntimeError("boom in /secret/place/segmenter.py")

    monkeypatch.setattr(loaded.unwrap_python_model(), "segment", broken)
    with caplog.at_level("ERROR", logger="brainseg.serving.pyfunc"):
        status, answer = asgi_post(mlflow_app, json.dumps(split_of(b64(good_slice))).encode(),
                                   {"Content-Type": "application/json"})
    assert status == 500 and b"Traceback" not in answer and b"/secret" not in answer, answer[:300]
    message = json.loads(answer)["message"]
    assert message.startswith("the model failed on this request (an internal error, logged by the server)")
    logged = [r for r in caplog.records if r.name == "brainseg.serving.pyfunc"]
    assert logged and "boom in /secret/place/segmenter.py" in logged[0].exc_text  # the traceback, server-side


@pytest.mark.parametrize("name", list(MLFLOW_ALONE))
def test_what_mlflow_models_serve_alone_answers_is_what_the_docs_say(mlflow_app, good_slice, name):
    _, body, headers, _, _ = next(c for c in RAW_CASES if c[0] == name)
    data = _raw(body, b64(good_slice))
    status, answer = asgi_post(mlflow_app, data, {"Content-Type": "application/json", **headers})
    expected, holds = MLFLOW_ALONE[name]
    assert status == expected, answer[:300]
    if holds == "the body, escaped":
        message = json.loads(answer)["message"]
        assert "\nInput: \nb'" in message and len(answer) > 3 * len(data)  # the whole body, escaped
    elif holds == "the dump first":
        assert json.loads(answer)["message"].startswith("Failed to predict data '")
    else:
        assert answer == holds.encode()
    assert b"Traceback" not in answer


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len(set(CASE_IDS)) == len(CASE_IDS)


# ---------------------------------------------------------------------- good answers, strict JSON
def _declared_types(model_uri: str) -> dict[str, tuple[str, bool]]:
    schema = mlflow.models.get_model_info(model_uri).signature.outputs
    return {c.name: (c.type.name, c.required) for c in schema.inputs}


PY_TYPES = {"boolean": (bool,), "long": (int,), "double": (int, float), "string": (str,)}


@pytest.mark.parametrize("threshold, tumor", [(0.999999, False), (1e-9, True)])
def test_answers_are_strict_json_with_the_declared_types(server, good_slice, threshold, tumor):
    """An empty prediction gives null (not NaN) geometry; a full one numbers; types as declared."""
    declared = _declared_types(server.model_uri)
    assert declared["bbox_x0"] == ("long", False) and declared["area_px"] == ("long", True)
    r = post(server.url, split_of(b64(good_slice), params={"threshold": threshold}))
    assert r.status_code == 200, r.text[:300]
    row = strict_json(r.text)["predictions"][0]
    assert row["tumor"] is tumor and row["threshold"] == threshold
    assert (row["area_px"] == 0) is (not tumor) and (row["centroid_x"] is None) is (not tumor)
    assert (row["bbox_x1"] is None) is (not tumor)
    for column, value in row.items():
        kind, required = declared[column]
        if value is None:
            assert not required, f"{column}: null but declared required"
        else:
            assert isinstance(value, PY_TYPES[kind]) and not (kind != "boolean" and isinstance(value, bool)), \
                f"{column}: {value!r} is not {kind}"


def test_return_mask_false_gives_null_masks_and_unknown_params_are_listed_as_not_applied(server, good_slice):
    r = post(server.url, split_of(b64(good_slice), params={"return_mask": False, "thresold": 0.9}))
    assert r.status_code == 200, r.text[:300]
    row = strict_json(r.text)["predictions"][0]
    assert row["mask_png"] is None and row["return_mask"] is False  # the answer lists what was applied
    assert row["threshold"] == 0.5 and "thresold" not in row  # the misspelt param was not applied


def test_a_batch_equals_its_rows_sent_one_by_one(server, good_slice, tmp_path):
    from brainseg.data.synth import generate

    root = generate(tmp_path / "kaggle_3m", patients=1, slices=5, size=256, seed=3)
    cells = [b64(p.read_bytes()) for p in sorted(root.glob("*/*_[0-9].tif"))]
    batch = strict_json(post(server.url, split_of(*cells)).text)["predictions"]
    singles = [strict_json(post(server.url, split_of(c)).text)["predictions"][0] for c in cells]
    assert len(batch) == len(cells) == 5
    assert batch == singles
    assert len({row["mask_png"] for row in batch}) > 1  # different slices, different masks


def test_a_planar_rgb_tiff_is_accepted_as_its_interleaved_twin(server):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    planar = tiff_bytes(np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    r1 = post(server.url, split_of(b64(planar)))
    r2 = post(server.url, split_of(b64(imageio.encode_png(rgb))))
    assert r1.status_code == r2.status_code == 200, r1.text[:300]
    assert strict_json(r1.text) == strict_json(r2.text)


# ------------------------------------------------------------------------------------- memory
BOMBS = {  # name -> (declared shape, planar, words of the refusal)
    "planar 3x12000x12000": ((3, 12000, 12000), True, ["12000x12000", "limit"]),
    "400 samples per pixel": ((1024, 1024, 400), False, ["400 channels"]),
    "planar 3x20000x20000": ((3, 20000, 20000), True, ["20000x20000", "limit"]),
}


def _peak_growth_mb(server, body) -> tuple[requests.Response, float]:
    """POST ``body``; (answer, growth of the model worker's peak RSS during it, MB)."""
    pid = server.worker_pid()
    before = _status_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    r = post(server.url, body)
    return r, (_status_kb(pid, "VmHWM") - before) / 1024


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_a_bomb_is_refused_without_the_server_growing(server, good_slice, bomb):
    shape, planar, words = BOMBS[bomb]
    data = tiff_bomb(shape, planar)
    assert len(data) < 1_500_000  # small on the wire, hundreds of MB if decoded
    assert_still_serves(server.url, good_slice)
    r, growth_mb = _peak_growth_mb(server, split_of(b64(data)))
    assert r.status_code == 400, r.text[:300]
    message = strict_json(r.text)["message"]
    for word in ["row 0", *words]:
        assert word in message, f"{bomb}: {word!r} not in {message[-400:]!r}"
    assert growth_mb < RSS_GROWTH_LIMIT_MB, f"{bomb}: peak RSS grew by {growth_mb:.0f} MB"
    assert_still_serves(server.url, good_slice)


ROWS_BOMBS = {  # name -> (rows, the limit variable the refusal must name)
    "the row limit's worth of images at the pixel limit": (LIMITS.max_rows, ENV["max_pixels"]),
    "one row more than the row limit": (LIMITS.max_rows + 1, ENV["max_rows"]),
}


@pytest.mark.parametrize("bomb", list(ROWS_BOMBS))
def test_a_rows_bomb_is_refused_without_the_server_growing(server, good_slice, bomb):
    """Many rows, each a real zero-filled PNG at the decoder's per-image pixel limit (the issue's
    "32 rows at the pixel limit: 20 s and +2.1 GB"), at the server's default request limits."""
    rows, variable = ROWS_BOMBS[bomb]
    side = math.isqrt(imageio.pixel_limit())
    cell = b64(png_zeros(side, side))
    assert rows * side * side * 3 > 500 * 2**20 and len(cell) * rows < 20 * 2**20  # GBs decoded, MBs sent
    assert_still_serves(server.url, good_slice)
    r, growth_mb = _peak_growth_mb(server, split_of(*[cell] * rows))
    assert r.status_code in (400, 413), r.text[:300]
    message = strict_json(r.text)["message"]
    assert variable in message and "limit" in message, f"{bomb}: {message[-400:]!r}"
    for leak in LEAKS:
        assert leak not in r.text
    assert growth_mb < RSS_GROWTH_LIMIT_MB, f"{bomb}: peak RSS grew by {growth_mb:.0f} MB"
    assert_still_serves(server.url, good_slice)
