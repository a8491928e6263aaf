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
from brainseg.outcome.features import SLICE_FEATURE_COLUMNS, slice_features
from helpers import json_reply, tiff_bytes

FOLDER = "TCGA_CS_4941_19960909"


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
    """A zip of ``files``, the same bytes on every call: a fixed date (zipfile's default is the time of
    the call), so that the parametrized ids below are the same in every pytest-xdist process."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o600 << 16  # as writestr(name) sets it
            zf.writestr(info, data)
    return buf.getvalue()


class FakeBackend:
    """The backend interface without a network: tumor = FLAIR > 200. Refuses names with 'refuse'."""

    def __init__(self):
        self.calls = 0

    def describe(self) -> dict:
        return {"model": "fake", "version": "7", "run_id": "abc123", "data_version": "d" * 40}

    def segment(self, items, groups=None):
        self.calls += 1
        self.groups = groups
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
    results, problems = logic.analyse(three_slices(), backend, progress=lambda done, n: steps.append((done, n)))
    assert problems == [] and backend.calls == 1 and steps == [(3, 3)]  # one patient volume, one call
    assert backend.groups == ["TCGA_CS_4941"] * 3  # the patient of each slice, for largest_3d
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


@pytest.mark.parametrize("image_boxes, truth_boxes, expected", [
    # predicted areas 0, 64, 128; the largest true tumor is on slice 1: the predicted one wins
    ([(0, 0, 0, 0), (8, 16, 8, 16), (4, 20, 4, 12)], [(0, 0, 0, 0), (2, 30, 2, 30), (0, 0, 0, 0)], 2),
    # nothing predicted: the largest true tumor
    ([(0, 0, 0, 0)] * 3, [(2, 30, 2, 30), (8, 16, 8, 16), (0, 0, 0, 0)], 0),
    # neither: the middle slice
    ([(0, 0, 0, 0)] * 3, [(0, 0, 0, 0)] * 3, 1),
])
def test_default_slice_is_the_largest_predicted_tumor(image_boxes, truth_boxes, expected):
    slices = [logic.SliceInput(f"{FOLDER}/{FOLDER}_{k + 1}.tif", "TCGA_CS_4941", FOLDER, k + 1,
                               slice_image(32, b), truth=box_mask(32, t) > 0)
              for k, (b, t) in enumerate(zip(image_boxes, truth_boxes))]
    results, _ = logic.analyse(slices, FakeBackend())
    assert logic.default_slice(results) == expected


def test_slice_table_without_truth_has_no_truth_columns():
    results, _ = logic.analyse(three_slices(truth=False), FakeBackend())
    assert "dice_vs_truth" not in logic.slice_table(results).columns
    patients, _ = logic.patient_table(results)
    assert "volume_dice" not in patients.columns
    assert list(logic.area_by_slice(results).columns) == ["predicted"]


def test_one_refused_slice_costs_only_itself():
    slices = three_slices()
    slices[1].name = "refuse_me_2.tif"
    backend = FakeBackend()
    results, problems = logic.analyse(slices, backend)
    assert [r.item.slice for r in results] == [1, 3]
    assert backend.groups == ["TCGA_CS_4941"] * 2  # the rest of the volume went again, together
    assert problems == ["refuse_me_2.tif: refuse_me_2.tif: refused"]


def test_backend_failure_stops_with_one_line():
    class Down(FakeBackend):
        def segment(self, items, groups=None):
            raise logic.SegmentError("endpoint http://x cannot be reached", per_item=False)

    results, problems = logic.analyse(three_slices(), Down())
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
    max_rows: typing.ClassVar[int] = 1000  # more rows get a 400 naming the limit, as the served model's

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeServer.requests.append((self.path, body))
        if len(body["dataframe_split"]["data"]) > FakeServer.max_rows:
            return self.reply(400, {"error_code": "INVALID_PARAMETER_VALUE", "message":
                                    f"{len(body['dataframe_split']['data'])} rows exceed the limit of "
                                    f"{FakeServer.max_rows} rows per request"})
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
        json_reply(self, code, payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeServer.requests, FakeServer.max_rows = [], 1000
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_rest_backend_posts_dataframe_split_and_reads_masks(endpoint):
    backend = logic.make_segmenter(logic.AppSettings(endpoint=endpoint + "/"))
    results, problems = logic.analyse(three_slices(), backend)
    assert problems == []
    path, body = FakeServer.requests[0]
    assert path == "/invocations" and body["dataframe_split"]["columns"] == ["image", "patient"]
    assert [row[1] for row in body["dataframe_split"]["data"]] == ["TCGA_CS_4941"] * 3  # one volume
    assert body["params"] == {"return_mask": True}
    assert [int(r.mask.sum()) for r in results] == [0, 64, 128]
    assert math.isnan(results[0].features["centroid_x"]) and results[1].features["centroid_x"] == 11.5
    described = backend.describe()
    assert {k: described[k] for k in ("model", "version", "run_id", "data_version")} == {
        "model": endpoint + "/invocations", "version": "", "run_id": "run42", "data_version": "v1"}


def test_rest_backend_errors(endpoint):
    black = ("black.tif", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(logic.SegmentError, match="HTTP 400.*all black") as refused:
        logic.RestBackend(endpoint).segment([black])
    assert refused.value.per_item
    slices = three_slices() + [logic.SliceInput(*black[:1], "B", "B", 1, black[1])]
    results, problems = logic.analyse(slices, logic.RestBackend(endpoint))
    assert len(results) == 3 and problems == [
        "black.tif: endpoint refused the request (HTTP 400): row 0, column 'image': all black"]
    with pytest.raises(logic.SegmentError, match="cannot be reached") as down:
        logic.RestBackend("http://127.0.0.1:9", timeout=5).segment([black])
    assert not down.value.per_item


def test_rest_backend_sends_no_more_than_the_servers_limits(endpoint):
    from brainseg.serving.limits import RequestLimits

    assert logic.RestBackend(endpoint).limits == RequestLimits()  # the server's defaults
    slices = three_slices()  # 32x32: 1,024 pixels each
    for limits in (RequestLimits(max_rows=2), RequestLimits(max_pixels=2 * 1024)):
        FakeServer.requests = []
        results, problems = logic.analyse(slices, logic.RestBackend(endpoint, limits=limits))
        assert [len(body["dataframe_split"]["data"]) for _, body in FakeServer.requests] == [2, 1]
        assert [int(r.mask.sum()) for r in results] == [0, 64, 128]
        assert len(problems) == 1 and problems[0].startswith("patient TCGA_CS_4941: 3 slices were not segmented "
                                                             "together (the segmenter's request limits)")


def test_a_volume_refused_as_a_whole_keeps_its_slices_with_a_problem_line(endpoint):
    FakeServer.max_rows = 2  # the server takes fewer rows than the page believes
    results, problems = logic.analyse(three_slices(), logic.RestBackend(endpoint))
    assert [int(r.mask.sum()) for r in results] == [0, 64, 128]  # one by one, no exception
    assert problems == [("patient TCGA_CS_4941: 3 slices were not segmented together (refused together: endpoint "
                         "refused the request (HTTP 400): 3 rows exceed the limit of 2 rows per request); the "
                         "per-volume post-processing (largest 3-D component) saw only part of the volume")]


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
        metadata = types.SimpleNamespace(get_input_schema=lambda: types.SimpleNamespace(inputs=[
            types.SimpleNamespace(name=n, type=types.SimpleNamespace(name="double"))
            for n in ("tumor_volume_px", "age_at_initial_pathologic")]))

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
def tiny_model(path, size: int = 32, **settings):
    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.models.factory import build_model
    from brainseg.settings.config import Train

    cfg = Train.from_dict({"arch": "plain_unet", "base_filters": 4, "size": size})
    return save_model(build_model(cfg), cfg, InferenceSettings(**settings), path)


def test_in_process_backend_with_a_tiny_untrained_model(tmp_path):
    tiny_model(tmp_path / "model")
    backend = logic.make_segmenter(logic.AppSettings(model_uri=str(tmp_path / "model")))
    assert backend.describe()["version"] == "local file" and backend.describe()["size"] == 32
    slices = three_slices()
    slices[0].image = slices[0].image[:, :, 1].repeat(3).reshape(32, 32, 3)
    slices[0].gray = True
    results, problems = logic.analyse(slices + [logic.SliceInput("big.tif", "B", "B", 1, slice_image(96))],
                                      backend)
    assert problems == []
    assert [r.mask.shape for r in results] == [(32, 32)] * 3 + [(96, 96)]
    assert all(r.mask.dtype == bool for r in results)
    assert set(results[0].features) == set(SLICE_FEATURE_COLUMNS)


def test_page_masks_equal_brainseg_predicts(tmp_path):
    """Same model, same files: the page's masks and patient features are predict's (largest_3d on)."""
    from brainseg.inference.segmenter import Segmenter
    from brainseg.pipeline.predict import collect_inputs, predict_files

    tiny_model(tmp_path / "model", threshold=0.45, largest_3d=True, min_component_px=2)
    folder = tmp_path / "in" / FOLDER
    folder.mkdir(parents=True)
    boxes = [(0, 0, 0, 0), (8, 16, 8, 16), (4, 20, 4, 12), (2, 30, 2, 30)]
    for k, b in enumerate(boxes):
        tifffile.imwrite(folder / f"{FOLDER}_{k + 1}.tif", slice_image(32, b))
    files, _ = collect_inputs([tmp_path / "in"])
    pred = predict_files(Segmenter.from_dir(tmp_path / "model"), files, tmp_path / "out")
    upload = logic.parse_uploads((f"{FOLDER}/{f.name}", f.read_bytes()) for f in files)
    results, problems = logic.analyse(upload.slices, logic.make_segmenter(
        logic.AppSettings(model_uri=str(tmp_path / "model"))))
    assert problems == [] and len(results) == len(files) == 4
    for r in results:
        stem = r.item.name.rsplit("/", 1)[-1][:-4]
        served = imageio.check_mask(imageio.decode_bytes((tmp_path / "out" / f"{stem}_pred.png").read_bytes(),
                                                         "m"), "m")
        np.testing.assert_array_equal(r.mask, served)
    patients, _ = logic.patient_table(results)
    shared = [c for c in pred.patients.columns if c in patients.columns]
    pd.testing.assert_frame_equal(patients[shared], pred.patients[shared], check_dtype=False)


# ------------------------------------------------------------------ model card, units, survival evidence
@pytest.mark.parametrize("provenance, present, absent", [
    ({"data_kind": "synthetic", "val_dice": "0.7000", "val_n_patients": "3", "size": 64},
     ["Trained on SYNTHETIC data", "Validation per-patient volume Dice 0.700 (n=3 patients)", "64-px smoke-test"],
     ["Trained on real data"]),
    ({"data_kind": "real", "data_version": "0123456789abcdef", "val_dice": "0.81", "size": 256},
     ["Trained on real data (TCGA-LGG), data version 0123456789ab", "Dice 0.810"], ["smoke", "SYNTHETIC"]),
    ({"data_kind": "", "val_dice": "", "size": None},
     ["not recorded (no model card", "No validation Dice recorded"], ["smoke"]),
])
def test_card_lines_state_data_kind_validation_dice_and_the_smoke_model(provenance, present, absent):
    text = "\n".join(t for _, t in logic.card_lines(provenance))
    for p in present:
        assert p in text, p
    for a in absent:
        assert a not in text, a
    levels = dict((t[:20], level) for level, t in logic.card_lines(provenance))
    assert all(level == "warning" for t, level in levels.items() if "SYNTHETIC" in t or "smoke" in t)


EVIDENCE = {"status": "ok", "message": None, "death01_probability": 0.25, "cv_roc_auc": 0.62, "cv_n_patients": 80,
            "data_version": "0123456789abcdef", "fitted_on": "real", "features_from": "oof_predicted"}


@pytest.mark.parametrize("changes, verdict, words", [
    ({}, "show", ["ROC-AUC 0.62 over 80 patients (real data version 0123456789ab", "oof_predicted masks"]),
    ({"fitted_on": "synthetic"}, "show", ["Fitted on SYNTHETIC data", "says nothing about a real patient"]),
    ({"status": "insufficient_data", "message": "3 of 9 clinical fields known", "death01_probability": None},
     "refuse", ["No probability: 3 of 9 clinical fields known."]),
    ({"cv_roc_auc": None}, "refuse", ["does not report its cross-validated ROC-AUC"]),
    ({"fitted_on": None, "status": None}, "refuse", ["does not report"]),
    ({"death01_probability": float("nan")}, "refuse", ["gave none"]),
])
def test_survival_probability_is_shown_only_with_its_evidence(changes, verdict, words):
    got, text = logic.survival_context({**EVIDENCE, **changes})
    assert got == verdict
    for w in words:
        assert w in text, w


def test_every_feature_column_has_a_unit_and_a_meaning():
    from brainseg.outcome.features import PATIENT_FEATURE_COLUMNS

    for column in SLICE_FEATURE_COLUMNS:
        unit, meaning = logic.SLICE_GLOSSARY[column]
        assert unit and meaning, column
    for column in PATIENT_FEATURE_COLUMNS + ["slices", "volume_dice"]:
        unit, meaning = logic.PATIENT_GLOSSARY[column]
        assert unit and meaning, column
    assert logic.SLICE_GLOSSARY["area_px"][0] == "px" and "no pixel spacing" in logic.SLICE_GLOSSARY["area_px"][1]
    assert logic.column_label("area_px", logic.SLICE_GLOSSARY) == "area_px (px)"
    assert logic.column_label("tumor", logic.SLICE_GLOSSARY) == "tumor"
    table = logic.glossary_table(["file", "area_px", "not_a_feature"], logic.SLICE_GLOSSARY)
    assert table["column"].tolist() == ["file", "area_px"] and table["unit"].tolist() == ["", "px"]


def test_provenance_of_a_local_folder_reads_its_model_card(tmp_path):
    from brainseg.registry import modelcard

    (tmp_path / "brainseg.json").write_text(json.dumps({"train": {"size": 64}, "meta": {"run_id": "r1"}}))
    facts = {"data": {"version": "abcdef0123456789", "synthetic": False}, "recipe": {"size": 64},
             "val": {"patient_dice_mean": 0.71, "n_patients": 6}}
    (tmp_path / modelcard.FACTS_FILE).write_text(json.dumps(facts))
    (tmp_path / modelcard.CARD_FILE).write_text("# Model card")
    prov = logic.model_provenance(str(tmp_path))
    assert {k: prov[k] for k in ("data_version", "data_kind", "val_dice", "val_n_patients", "size", "card")} == {
        "data_version": "abcdef0123456789", "data_kind": "real", "val_dice": "0.7100", "val_n_patients": "6",
        "size": 64, "card": "# Model card"}
