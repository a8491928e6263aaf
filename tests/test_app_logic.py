"""The web page's logic: parsing uploads, backends (fake, REST, tiny in-process model), tables."""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import threading
import types
import typing
import zipfile

import numpy as np
import pandas as pd
import pytest
import tifffile

from brainseg.app import launch, logic
from brainseg.data import imageio
from brainseg.features import SLICE_FEATURE_COLUMNS, slice_features

FOLDER = "TCGA_CS_4941_19960909"


def tiff_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def slice_image(size: int = 32, box: tuple[int, int, int, int] = (8, 16, 8, 16)) -> np.ndarray:
    """(size, size, 3) uint8: head-grey background, FLAIR-bright box rows y0:y1, cols x0:x1."""
    image = np.full((size, size, 3), 60, np.uint8)
    y0, y1, x0, x1 = box
    image[y0:y1, x0:x1, 1] = 250
    return image


def box_mask(size: int = 32, box: tuple[int, int, int, int] = (8, 16, 8, 16)) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = 255
    return mask


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


class FakeBackend:
    """The backend interface without a network: tumor = FLAIR > 200. Refuses names with 'refuse'."""

    def __init__(self):
        self.calls = 0

    def describe(self) -> dict:
        return {"model": "fake", "version": "7", "run_id": "abc123", "data_version": "d" * 40}

    def segment(self, items):
        self.calls += 1
        for name, _ in items:
            if "refuse" in name:
                raise logic.SegmentError(f"{name}: refused")
        out = []
        for _, image in items:
            mask = (image[..., 1] if image.ndim == 3 else image) > 200
            out.append((mask, slice_features(mask, image)))
        return out


# ------------------------------------------------------------------------------------ uploads
@pytest.mark.parametrize("name, data, problem", [
    ("notes.tif", b"these are not pixels", "not a TIFF or PNG image"),
    ("empty.tif", b"", "empty file"),
    ("deep.tif", tiff_bytes(np.zeros((64, 64), np.uint16)), "dtype is uint16"),
    ("tiny.tif", tiff_bytes(np.zeros((8, 8, 3), np.uint8)), "at least 32x32"),
    ("rgba.png", imageio.encode_png(np.zeros((64, 64, 4), np.uint8)), "4 channels"),
    ("cut.tif", tiff_bytes(slice_image(64))[:200], "unreadable or truncated TIFF"),
    ("empty.zip", zip_bytes({}), "the zip archive is empty"),
    ("broken.zip", b"PK\x03\x04 not really a zip", "not a readable zip archive"),
    ("notes.zip", zip_bytes({"README.txt": b"hello"}), "no .tif/.png slices"),
])
def test_bad_upload_becomes_one_problem_line(name, data, problem):
    upload = logic.parse_uploads([(name, data)])
    assert upload.slices == []
    assert len(upload.problems) == 1
    assert upload.problems[0].startswith(name) and problem in upload.problems[0]


def test_slice_and_mask_are_paired_and_named():
    upload = logic.parse_uploads([
        (f"{FOLDER}_12.tif", tiff_bytes(slice_image())),
        (f"{FOLDER}_12_mask.tif", tiff_bytes(box_mask())),
        ("flair_3.png", imageio.encode_png(slice_image()[:, :, 1])),
    ])
    assert upload.problems == []
    by_name = {s.name: s for s in upload.slices}
    tumor = by_name[f"{FOLDER}_12.tif"]
    assert (tumor.patient, tumor.patient_dir, tumor.slice) == ("TCGA_CS_4941", FOLDER, 12)
    assert tumor.truth.dtype == bool and tumor.truth.sum() == 64 and not tumor.gray
    gray = by_name["flair_3.png"]
    assert (gray.patient, gray.slice, gray.gray, gray.truth) == ("flair", 3, True, None)
    assert gray.image.shape == (32, 32, 3) and gray.model_input().shape == (32, 32)


def test_patient_zip_with_masks_data_csv_and_junk():
    files = {"__MACOSX/._x": b"junk", f"kaggle_3m/{FOLDER}/.DS_Store": b"junk",
             "kaggle_3m/data.csv": b"Patient,age_at_initial_pathologic\nTCGA_CS_4941,40\n",
             f"kaggle_3m/{FOLDER}/notes.txt": b"ignored"}
    for n in (10, 2, 1):
        files[f"kaggle_3m/{FOLDER}/{FOLDER}_{n}.tif"] = tiff_bytes(slice_image())
        files[f"kaggle_3m/{FOLDER}/{FOLDER}_{n}_mask.tif"] = tiff_bytes(box_mask())
    upload = logic.parse_uploads([("patient.zip", zip_bytes(files))])
    assert upload.problems == []
    assert [s.slice for s in upload.slices] == [1, 2, 10]
    assert {s.patient for s in upload.slices} == {"TCGA_CS_4941"}
    assert all(s.truth is not None for s in upload.slices)
    assert upload.clinical.startswith(b"Patient") and upload.clinical_name == "patient.zip/kaggle_3m/data.csv"


def test_bad_masks_keep_their_slice_and_orphans_are_reported():
    upload = logic.parse_uploads([
        ("a_1.tif", tiff_bytes(slice_image())), ("a_1_mask.tif", tiff_bytes(box_mask(64))),
        ("a_2.tif", tiff_bytes(slice_image())), ("a_2_mask.tif", tiff_bytes(np.full((32, 32), 7, np.uint8))),
        ("a_3_mask.tif", tiff_bytes(box_mask())),
    ])
    assert [s.truth for s in upload.slices] == [None, None]
    assert len(upload.problems) == 3
    assert "a_1_mask.tif: mask is 64x64 but its slice is 32x32" in upload.problems[0]
    assert "a_2_mask.tif: mask values" in upload.problems[1]
    assert upload.problems[2].startswith("a_3_mask.tif: mask without its slice")


@pytest.mark.parametrize("name, expected", [
    (f"{FOLDER}_12.tif", ("TCGA_CS_4941", FOLDER, 12)),
    (f"up.zip/{FOLDER}/{FOLDER}_3.tif", ("TCGA_CS_4941", FOLDER, 3)),
    ("scan_4.PNG", ("scan", "scan", 4)),
    ("case7/slice.png", ("case7", "case7", 0)),
])
def test_identify(name, expected):
    assert logic.identify(name) == expected


def test_examples_are_deterministic_with_truth():
    for title, (_, n) in logic.EXAMPLES.items():
        first, second = logic.example_upload(title), logic.example_upload(title)
        assert len(first.slices) == n and first.problems == []
        assert all(s.truth is not None for s in first.slices)
        assert all(np.array_equal(a.image, b.image) for a, b in zip(first.slices, second.slices))
    single = logic.example_upload("Synthetic single slice (truth mask)").slices[0]
    assert single.truth.any()


# ----------------------------------------------------------------------------------- analysis
def three_slices(truth: bool = True) -> list[logic.SliceInput]:
    boxes = [(0, 0, 0, 0), (8, 16, 8, 16), (4, 20, 4, 12)]  # empty, 8x8, 16x8
    return [logic.SliceInput(f"{FOLDER}/{FOLDER}_{k + 1}.tif", "TCGA_CS_4941", FOLDER, k + 1,
                             slice_image(32, b), truth=(box_mask(32, b) > 0) if truth else None)
            for k, b in enumerate(boxes)]


def test_analyse_tables_and_downloads():
    backend = FakeBackend()
    steps = []
    results, problems = logic.analyse(three_slices(), backend, batch=2,
                                      progress=lambda done, n: steps.append((done, n)))
    assert problems == [] and backend.calls == 2 and steps == [(2, 3), (3, 3)]
    table = logic.slice_table(results)
    assert list(table.columns) == ["file", "patient", "slice"] + SLICE_FEATURE_COLUMNS + [
        "truth_area_px", "dice_vs_truth"]
    assert table["area_px"].tolist() == [0, 64, 128]
    assert table["truth_area_px"].tolist() == [0, 64, 128]
    assert math.isnan(table["dice_vs_truth"][0]) and table["dice_vs_truth"][1:].tolist() == [1.0, 1.0]
    patients, notes = logic.patient_table(results)
    assert notes == []
    row = patients.iloc[0]
    assert (row["patient"], row["slices"], row["tumor_volume_px"], row["tumor_slices"]) == (
        "TCGA_CS_4941", 3, 192, 2)
    assert (row["truth_volume_px"], row["volume_dice"]) == (192, 1.0)
    assert logic.area_by_slice(results).to_dict("list") == {"predicted": [0, 64, 128], "truth": [0, 64, 128]}
    assert logic.default_slice(results) == 2
    with zipfile.ZipFile(io.BytesIO(logic.masks_zip(results))) as zf:
        assert zf.namelist() == [f"{FOLDER}/{FOLDER}_{k}_pred.png" for k in (1, 2, 3)]
        assert imageio.check_mask(imageio.decode_bytes(zf.read(zf.namelist()[1]), "m"), "m").sum() == 64
    csv = pd.read_csv(io.BytesIO(logic.csv_bytes(logic.with_provenance(table, backend.describe()))))
    assert csv[["model_version", "model_run_id"]].iloc[0].tolist() == [7, "abc123"]
    captions = [c for c, _ in logic.slice_views(results[1])]
    assert captions[1] == "predicted tumor (red): 64 px" and captions[2].endswith("Dice 1.000")


def test_slice_table_without_truth_has_no_truth_columns():
    results, _ = logic.analyse(three_slices(truth=False), FakeBackend())
    assert "dice_vs_truth" not in logic.slice_table(results).columns
    patients, _ = logic.patient_table(results)
    assert "volume_dice" not in patients.columns
    assert list(logic.area_by_slice(results).columns) == ["predicted"]


def test_one_refused_slice_costs_only_itself():
    slices = three_slices()
    slices[1].name = "refuse_me_2.tif"
    results, problems = logic.analyse(slices, FakeBackend(), batch=3)
    assert [r.item.slice for r in results] == [1, 3]
    assert problems == ["refuse_me_2.tif: refuse_me_2.tif: refused"]


def test_backend_failure_stops_with_one_line():
    class Down(FakeBackend):
        def segment(self, items):
            raise logic.SegmentError("endpoint http://x cannot be reached", per_item=False)

    results, problems = logic.analyse(three_slices(), Down(), batch=1)
    assert results == [] and problems == ["segmenter: endpoint http://x cannot be reached"]


def test_patients_with_mixed_sizes_or_repeated_numbers_get_no_volume():
    slices = [logic.SliceInput("p_1.tif", "P", "P", 1, slice_image(64)),
              logic.SliceInput("p_2.tif", "P", "P", 2, slice_image(32)),
              logic.SliceInput("q/a.png", "Q", "Q", 0, slice_image(32)),
              logic.SliceInput("q/b.png", "Q", "Q", 0, slice_image(32))]
    results, _ = logic.analyse(slices, FakeBackend())
    table, problems = logic.patient_table(results)
    assert table.empty and len(problems) == 2
    assert problems[0].startswith("patient P: slices of different sizes")
    assert problems[1].startswith("patient Q: slice numbers repeat")


# ----------------------------------------------------------------------------- REST backend
class FakeServer(http.server.BaseHTTPRequestHandler):
    """Answers /invocations like ``mlflow models serve`` does; an all-black slice gets a 400."""

    requests: typing.ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeServer.requests.append((self.path, body))
        images = [imageio.check_image(imageio.decode_bytes(base64.b64decode(row[0]), "row"), "row")
                  for row in body["dataframe_split"]["data"]]
        if any(image.max() == 0 for image in images):
            return self.reply(400, {"error_code": "INVALID_PARAMETER_VALUE",
                                    "message": "row 0, column 'image': all black"})
        rows = []
        for image in images:
            mask = image[..., 1] > 200
            features = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                        for k, v in slice_features(mask, image).items()}
            rows.append({**features, "mask_png": base64.b64encode(
                imageio.encode_png(mask.astype(np.uint8) * 255)).decode(),
                "model_run_id": "run42", "data_version": "v1"})
        self.reply(200, {"predictions": rows})

    def reply(self, code: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeServer.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_rest_backend_posts_dataframe_split_and_reads_masks(endpoint):
    backend = logic.make_segmenter(logic.AppSettings(endpoint=endpoint + "/"))
    results, problems = logic.analyse(three_slices(), backend)
    assert problems == []
    path, body = FakeServer.requests[0]
    assert path == "/invocations" and body["dataframe_split"]["columns"] == ["image"]
    assert body["params"] == {"return_mask": True}
    assert [int(r.mask.sum()) for r in results] == [0, 64, 128]
    assert math.isnan(results[0].features["centroid_x"]) and results[1].features["centroid_x"] == 11.5
    assert backend.describe() == {"model": endpoint + "/invocations", "version": "",
                                  "run_id": "run42", "data_version": "v1"}


def test_rest_backend_errors(endpoint):
    black = ("black.tif", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(logic.SegmentError, match="HTTP 400.*all black") as refused:
        logic.RestBackend(endpoint).segment([black])
    assert refused.value.per_item
    slices = three_slices() + [logic.SliceInput(*black[:1], "B", "B", 1, black[1])]
    results, problems = logic.analyse(slices, logic.RestBackend(endpoint))
    assert len(results) == 3 and problems == [
        "black.tif: endpoint refused the slice (HTTP 400): row 0, column 'image': all black"]
    with pytest.raises(logic.SegmentError, match="cannot be reached") as down:
        logic.RestBackend("http://127.0.0.1:9", timeout=5).segment([black])
    assert not down.value.per_item


# ------------------------------------------------------------------ settings and provenance
def test_settings_travel_through_the_environment():
    settings = logic.AppSettings(model_uri="/m", survival_uri=None, endpoint="http://h:1")
    assert logic.AppSettings.from_env(settings.to_env()) == settings
    assert logic.AppSettings.from_env({}) == logic.AppSettings()
    argv, env = launch.command(host="0.0.0.0", port=8600, model_uri="/m", survival_uri=None)
    assert argv[argv.index("--server.address") + 1] == "0.0.0.0"
    assert argv[argv.index("--server.headless") + 1] == "true"
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"
    assert argv[4] == str(launch.PAGE) and launch.PAGE.is_file()
    assert logic.AppSettings.from_env(env) == logic.AppSettings(model_uri="/m", survival_uri=None)


def test_provenance_of_a_local_model_folder(tmp_path):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "brainseg.json").write_text(json.dumps(
        {"train": {}, "meta": {"run_id": "0123456789abcdef", "data_version": "fedcba9876543210"}}))
    prov = logic.model_provenance(str(tmp_path))
    assert (prov["version"], prov["run_id"], prov["data_version"]) == (
        "local file", "0123456789abcdef", "fedcba9876543210")
    assert logic.provenance_line(prov) == (f"{tmp_path} (version local file, run 0123456789ab); "
                                           "trained on data version fedcba987654")


def test_survival_backend_joins_clinical_data():
    class Model:
        metadata = types.SimpleNamespace(get_input_schema=lambda: types.SimpleNamespace(
            input_names=lambda: ["tumor_volume_px", "age_at_initial_pathologic"]))

        def predict(self, X):
            self.X = X
            return pd.DataFrame({"death01_probability": [0.25], "death01_class": [0]}, index=X.index)

    model = Model()
    backend = logic.SurvivalBackend(model, {"model": "m"})
    patients = pd.DataFrame({"patient": ["TCGA_CS_4941"], "tumor_volume_px": [192], "slices": [3]})
    out = backend.probabilities(patients, b"Patient,age_at_initial_pathologic\nTCGA_CS_4941,40\n")
    assert out.to_dict("list") == {"patient": ["TCGA_CS_4941"], "death01_probability": [0.25]}
    assert model.X.to_dict("list") == {"tumor_volume_px": [192.0], "age_at_initial_pathologic": [40.0]}
    backend.probabilities(patients, None)
    assert math.isnan(model.X["age_at_initial_pathologic"].iloc[0])


# ------------------------------------------------------------------------ in-process backend
def test_in_process_backend_with_a_tiny_untrained_model(tmp_path):
    from brainseg.config import TrainConfig
    from brainseg.models.factory import build_model
    from brainseg.train import save_model

    cfg = TrainConfig.from_dict({"arch": "plain_unet", "base_filters": 4, "size": 32})
    save_model(build_model(cfg), cfg, tmp_path / "model")
    backend = logic.make_segmenter(logic.AppSettings(model_uri=str(tmp_path / "model")))
    assert backend.describe()["version"] == "local file"
    slices = three_slices()
    slices[0].image = slices[0].image[:, :, 1].repeat(3).reshape(32, 32, 3)
    slices[0].gray = True
    results, problems = logic.analyse(slices + [logic.SliceInput("big.tif", "B", "B", 1, slice_image(96))],
                                      backend)
    assert problems == []
    assert [r.mask.shape for r in results] == [(32, 32)] * 3 + [(96, 96)]
    assert all(r.mask.dtype == bool for r in results)
    assert set(results[0].features) == set(SLICE_FEATURE_COLUMNS)
