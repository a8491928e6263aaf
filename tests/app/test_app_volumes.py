"""The page's scanner volumes (issue 35, item 4): a NIfTI upload (FLAIR, or FLAIR + pre + post) is
read by ``brainseg predict --flair``'s reader and segmented by its path, in process or through the
served model's ``volume`` column; the page shows the volume in mL, scrolls the slices with the
overlay and offers the mask in the upload's geometry; slice files say "spacing unknown"."""

from __future__ import annotations

import base64
import gzip
import http.server
import json
import threading
import types

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from brainseg.app import launch, logic
from brainseg.data.synth import synth_patient
from brainseg.outcome.features import slice_features
from helpers import invoke, json_reply, threshold_model

SPACING = (3.3, 0.9, 0.9)  # (slice, row, column) mm


def nifti(volume_zhw: np.ndarray, spacing=SPACING, descrip: bytes = b"") -> bytes:
    """A (Z, H, W) stack as .nii.gz bytes stored RAS (two axes flipped against the model's)."""
    z, r, c = spacing
    stored = np.ascontiguousarray(volume_zhw.transpose(2, 1, 0)[::-1, ::-1, :])
    affine = np.diag([c, r, z, 1.0])
    affine[:3, 3] = [10.0 - c * (volume_zhw.shape[2] - 1), -20.0 - r * (volume_zhw.shape[1] - 1), 30.0]
    img = nib.Nifti1Image(stored, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = descrip
    return gzip.compress(img.to_bytes(), mtime=0)


@pytest.fixture(scope="module")
def patient() -> np.ndarray:
    images, _ = synth_patient(np.random.default_rng(5), 10, 64)
    return images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):

    folder = tmp_path_factory.mktemp("app-volume-model")
    threshold_model(folder)
    return folder


class FakeBackend:
    """The slice interface only (as the page's test fake): tumor = FLAIR > 130 (the synthetic tumour)."""

    def describe(self) -> dict:
        return {"model": "fake", "version": "1", "run_id": "r", "data_version": "d"}

    def segment(self, items, groups=None):
        self.groups = groups
        return [((image[..., 1] > 130), slice_features(image[..., 1] > 130, image)) for _, image in items]


# ------------------------------------------------------------------------------------ logic
def test_an_upload_is_read_by_the_scan_reader_and_bad_ones_are_one_line_naming_the_file(patient):
    good = nifti(patient[..., 1])
    upload, problems = logic.parse_volume_uploads({"flair": ("sub01_flair.nii.gz", good), "pre": None, "post": None})
    assert problems == [] and upload.scans.name == "sub01" and upload.scans.flair.array.shape == (10, 64, 64)
    cases = {
        "truncated": ({"flair": ("cut.nii.gz", good[: len(good) // 2])}, "cut.nii.gz: truncated or damaged data"),
        "not a scan": ({"flair": ("notes.nii", b"hello")}, "notes.nii: not a readable NIfTI file"),
        "no FLAIR": ({"flair": None, "pre": ("t1.nii.gz", good)}, "a pre- or post-contrast volume needs its FLAIR"),
        "other grid": ({"flair": ("f.nii.gz", good), "pre": ("t1.nii.gz", nifti(patient[1:, ..., 0]))},
                       "t1.nii.gz: not on the grid of f.nii.gz (shape 9x64x64 vs 10x64x64"),
    }
    for case, (files, words) in cases.items():
        upload, problems = logic.parse_volume_uploads(files)
        assert upload is None and len(problems) == 1 and problems[0].startswith(words), (case, problems)
        assert "/tmp" not in problems[0], case


def test_in_process_the_page_gives_predict_flairs_mask_ml_and_geometry(patient, model_dir, tmp_path):
    data = nifti(patient[..., 1])
    (tmp_path / "sub01_flair.nii.gz").write_bytes(data)
    result = invoke("predict", "--flair", tmp_path / "sub01_flair.nii.gz", "--out", tmp_path / "out",
                    "--model", model_dir)
    assert result.exit_code == 0, result.output
    predicted = pd.read_csv(tmp_path / "out" / "patients.csv").iloc[0]

    from brainseg.inference.segmenter import Segmenter, load_model_dir

    backend = logic.InProcessBackend(Segmenter(*load_model_dir(model_dir)), {"model": str(model_dir)})
    upload, _ = logic.parse_volume_uploads({"flair": ("sub01_flair.nii.gz", data)})
    got, problems = logic.analyse_volume(upload, backend)
    assert problems == [] and got.patient["tumor_volume_px"] == predicted["tumor_volume_px"] > 0
    assert got.patient["tumor_volume_ml"] == pytest.approx(predicted["tumor_volume_ml"], rel=1e-9)
    assert logic.volume_metric(got.patient) == f"{predicted['tumor_volume_ml']:.2f} mL"
    (tmp_path / "page_mask.nii.gz").write_bytes(logic.mask_download(got))
    page, cli = nib.load(tmp_path / "page_mask.nii.gz"), nib.load(tmp_path / "out" / "sub01_mask.nii.gz")
    assert np.array_equal(page.affine, cli.affine) and np.array_equal(np.asarray(page.dataobj), np.asarray(cli.dataobj))
    captions = [c for c, _ in logic.volume_views(got, logic.default_volume_slice(got))]
    assert "mm²" in captions[1] and captions[0].startswith("sub01 slice ")


def test_a_three_channel_model_given_flair_alone_is_a_problem_line(patient, tmp_path):
    import tf_keras as keras

    from brainseg.inference.segmenter import InferenceSettings, Segmenter
    from brainseg.settings.config import Train

    inp = keras.Input((32, 32, 3))
    net = keras.Model(inp, keras.layers.Conv2D(1, 1, activation="sigmoid")(inp))
    backend = logic.InProcessBackend(Segmenter(net, Train(arch="plain_unet", size=32, channels="all"),
                                               InferenceSettings(precision="float32")), {"model": "models:/m@champion"})
    upload, _ = logic.parse_volume_uploads({"flair": ("f.nii.gz", nifti(patient[..., 1]))})
    result, problems = logic.analyse_volume(upload, backend)
    assert result is None and problems == [
        "segmenter: models:/m@champion: this model reads 3 channels (pre-contrast, FLAIR, post-contrast; "
        "train.channels: all): give a pre-contrast T1 volume and a post-contrast T1 volume too, or use a "
        "FLAIR-only model (train.channels: flair)"]


class PyfuncServer(http.server.BaseHTTPRequestHandler):
    """/invocations answered by the served segmenter's pyfunc, in process (the server's code, no MLflow)."""

    model = None

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        split = body["dataframe_split"]
        frame = pd.DataFrame(split["data"], columns=split["columns"])
        answer = self.model.predict(None, frame, body.get("params"))
        json_reply(self, 200, {"predictions": answer.to_dict(orient="records")})

    def log_message(self, *args):
        pass


def test_over_rest_the_volume_is_sent_whole_and_its_mask_read_back(patient, model_dir):
    from brainseg.serving.pyfunc import SegmenterModel

    model = SegmenterModel()
    model.load_context(types.SimpleNamespace(artifacts={"model_dir": str(model_dir)}))
    PyfuncServer.model = model
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PyfuncServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        upload, _ = logic.parse_volume_uploads({"flair": ("sub01_flair.nii.gz", nifti(patient[..., 1]))})
        rest, _ = logic.analyse_volume(upload, logic.RestBackend(f"http://127.0.0.1:{server.server_port}"))
        local = model.predict(None, pd.DataFrame({"volume": [base64.b64encode(nifti(patient[..., 1])).decode()]}))
    finally:
        server.shutdown()
    assert rest.patient["tumor_volume_px"] == local["tumor_volume_px"][0] > 0
    assert rest.patient["tumor_volume_ml"] == pytest.approx(local["tumor_volume_ml"][0], rel=1e-12)
    assert rest.masks.shape == (10, 64, 64)


def test_a_volume_without_real_spacing_says_so(patient):
    no_spacing = nifti(patient[..., 1], (1.0, 1.0, 1.0), b"brainseg: slices without spacing, 1 mm written")
    upload, _ = logic.parse_volume_uploads({"flair": ("case_0000.nii.gz", no_spacing)})
    result, _ = logic.analyse_volume(upload, FakeBackend())
    assert logic.volume_metric(result.patient) == "spacing unknown"
    assert logic.volume_line(result.patient).startswith("spacing unknown: ")
    assert result.slices["area_mm2"].isna().all()
    assert "spacing unknown" in logic.volume_views(result, 0)[1][0]


# ------------------------------------------------------------------------------------ the page
@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv(logic.ENV_SURVIVAL, "")
    at = AppTest.from_file(str(launch.PAGE), default_timeout=60)
    at.session_state["backend"] = FakeBackend()
    return at.run()


def test_the_page_shows_a_scans_ml_and_scrolls_its_slices(app, patient):
    app.radio[0].set_value("Upload a scan (NIfTI volumes)").run()
    assert not app.exception and "Upload the patient's FLAIR volume" in "\n".join(i.value for i in app.info)
    app.file_uploader[0].set_value([("sub01_flair.nii.gz", nifti(patient[..., 1]), "application/gzip")]).run()
    assert not app.exception and not app.error
    metrics = {m.label: m.value for m in app.metric}
    masks = np.stack([FakeBackend().segment([("s", im)])[0][0] for im in patient])
    assert metrics["Tumor volume (predicted)"] == f"{masks.sum() * 3.3 * 0.81 / 1000:.2f} mL" != "0.00 mL"
    assert app.slider[0].max == 10 and len(app.get("image")) == 2
    app.slider[0].set_value(4).run()
    captions = [image.proto.imgs[0].caption for image in app.get("image")]
    assert not app.exception and captions[0] == "sub01 slice 4 of 10: FLAIR" and "mm²" in captions[1]
    labels = [b.label for b in app.get("download_button")]
    assert labels == ["Download the mask (.nii.gz, the FLAIR's geometry)", "Download features (CSV)"]
    app.file_uploader[0].set_value([("bad.nii.gz", b"\x1f\x8b not a gzip", "application/gzip")]).run()
    assert not app.exception and app.error[0].value.startswith("bad.nii.gz: ")


def test_slice_files_say_spacing_unknown(app):
    app.radio[0].set_value("Bundled synthetic example").run()
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Tumor volume (mL)"] == "spacing unknown"
