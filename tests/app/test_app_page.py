"""The Streamlit page driven by ``AppTest``, with a fake segmenter and survival model (no MLflow, no TF)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from brainseg.app import launch, logic
from brainseg.outcome.features import slice_features
from helpers import tiff_bytes

FOLDER = "TCGA_CS_4941_19960909"


def tumor_slice() -> tuple[bytes, bytes]:
    """A 64x64 slice with a FLAIR-bright 16x16 square, and its mask, as TIFF bytes."""
    image = np.full((64, 64, 3), 60, np.uint8)
    image[20:36, 20:36, 1] = 250
    mask = np.zeros((64, 64), np.uint8)
    mask[20:36, 20:36] = 255
    return tiff_bytes(image), tiff_bytes(mask)


class FakeBackend:
    """Tumor = FLAIR > 200; counts its calls."""

    def __init__(self):
        self.calls = 0

    def describe(self) -> dict:
        return {"model": "models:/brainseg-segmenter@champion", "version": "3", "run_id": "abcdef123456",
                "data_version": "0123456789abcdef", **self.card}

    card = {"data_kind": "real", "val_dice": "0.8123", "val_n_patients": "13", "size": 256,
            "card": "# Model card: brainseg-segmenter v3"}

    def segment(self, items, groups=None):
        self.calls += 1
        out = []
        for _, image in items:
            mask = (image[..., 1] if image.ndim == 3 else image) > 200
            out.append((mask, slice_features(mask, image)))
        return out


class FakeSurvival:
    def describe(self) -> dict:
        return {"model": "models:/brainseg-survival@champion", "version": "2", "run_id": "", "data_version": "x"}

    def probabilities(self, patients: pd.DataFrame, clinical):
        return pd.DataFrame({"patient": patients["patient"], "death01_probability": 0.25, **self.evidence})

    evidence = {"status": "ok", "message": None, "cv_roc_auc": 0.62, "cv_n_patients": 80,
                "data_version": "0123456789abcdef", "fitted_on": "real", "features_from": "oof_predicted"}


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv(logic.ENV_SURVIVAL, "")
    at = AppTest.from_file(str(launch.PAGE), default_timeout=60)
    at.session_state["backend"] = FakeBackend()
    at.session_state["survival"] = FakeSurvival()
    return at.run()


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_page_opens_with_model_version_and_no_results(app):
    assert not app.exception
    assert "version 3" in texts(app.sidebar.markdown) and "data version 0123456789ab" in texts(app.sidebar.markdown)
    assert "Upload" in texts(app.info)
    assert app.file_uploader[0].accept_multiple_files
    assert len(app.dataframe) == 0


def test_upload_shows_features_dice_and_downloads(app):
    image, mask = tumor_slice()
    app.file_uploader[0].set_value([(f"{FOLDER}_5.tif", image, "image/tiff"),
                                    (f"{FOLDER}_5_mask.tif", mask, "image/tiff")]).run()
    assert not app.exception and not app.error
    table = app.dataframe[0].value
    assert table[["patient", "slice", "tumor", "area_px", "dice_vs_truth"]].iloc[0].tolist() == [
        "TCGA_CS_4941", 5, True, 256, 1.0]
    assert "Features per slice" in texts(app.subheader)
    assert "version 3" in texts(app.caption)
    assert [b.label for b in app.get("download_button")][:2] == [
        "Download features (CSV)", "Download predicted masks (zip of PNG)"]


def test_bad_uploads_get_messages_and_the_page_keeps_working(app):
    image, _ = tumor_slice()
    app.file_uploader[0].set_value([("notes.tif", b"not an image", "image/tiff"),
                                    ("deep.tif", tiff_bytes(np.zeros((64, 64), np.uint16)), "image/tiff"),
                                    ("empty.zip", b"PK\x05\x06" + b"\0" * 18, "application/zip"),
                                    (f"{FOLDER}_5.tif", image, "image/tiff")]).run()
    assert not app.exception
    errors = texts(app.error)
    assert "notes.tif: not a TIFF or PNG image" in errors
    assert "deep.tif: image dtype is uint16" in errors
    assert "empty.zip: the zip archive is empty" in errors
    assert len(app.dataframe) == 1  # the good slice still went through
    app.file_uploader[0].set_value([("corrupt.zip", b"PK\x03\x04garbage", "application/zip")]).run()
    assert not app.exception and "corrupt.zip: not a readable zip archive" in texts(app.error)
    assert len(app.dataframe) == 0
    app.file_uploader[0].set_value([(f"{FOLDER}_5.tif", image, "image/tiff")]).run()
    assert not app.exception and not app.error and len(app.dataframe) == 1


def test_example_patient_shows_volume_plot_survival_and_disclaimer(app):
    app.radio[0].set_value("Bundled synthetic example").run()
    assert not app.exception
    backend = app.session_state["backend"]
    calls = backend.calls
    assert app.slider[0].max == 16
    assert "Research model, not a diagnosis" in texts(app.warning)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Survival model: probability of death01 = 1"] == "25.0%"
    assert "Volume Dice vs truth" in metrics
    assert len(app.get("vega_lite_chart")) == 1  # tumor area by slice
    assert len(app.get("image")) == 3  # FLAIR, predicted overlay, truth overlay
    assert len(app.dataframe) == 2  # features per slice and per patient
    app.slider[0].set_value(3).run()  # scrolling reuses the segmentation
    assert not app.exception and backend.calls == calls
    assert "Slice number 3" in texts(app.caption)


def test_a_patient_opens_on_its_largest_predicted_tumor_not_the_largest_true_one(app):
    def slice_bytes(side: int) -> bytes:  # FLAIR-bright square of side x side: the fake's tumor
        image = np.full((64, 64, 3), 60, np.uint8)
        image[8:8 + side, 8:8 + side, 1] = 250
        return tiff_bytes(image)

    big_truth = np.zeros((64, 64), np.uint8)
    big_truth[4:60, 4:60] = 255
    files = [(f"{FOLDER}_{k}.tif", slice_bytes(side), "image/tiff") for k, side in ((1, 4), (2, 20), (3, 10))]
    files.append((f"{FOLDER}_3_mask.tif", tiff_bytes(big_truth), "image/tiff"))  # the largest true tumor: slice 3
    app.file_uploader[0].set_value(files).run()
    assert not app.exception and not app.error
    assert app.slider[0].value == 2  # the largest predicted tumor (20x20) is on slice 2


def test_model_that_cannot_load_is_a_message(monkeypatch):
    def broken(settings):
        raise FileNotFoundError("models:/brainseg-segmenter@champion: cannot be resolved")

    monkeypatch.setattr(logic, "make_segmenter", broken)
    monkeypatch.setenv(logic.ENV_MODEL, "models:/brainseg-segmenter@champion-missing")
    at = AppTest.from_file(str(launch.PAGE), default_timeout=60).run()
    assert not at.exception
    assert "cannot be loaded: models:/brainseg-segmenter@champion: cannot be resolved" in texts(at.error)


def test_survival_model_missing_is_said_plainly(app):
    del app.session_state["survival"]
    app.radio[0].set_value("Bundled synthetic example").run()
    assert not app.exception
    assert "No survival model is configured" in texts(app.info)
    assert "Research model, not a diagnosis" in texts(app.warning)



def test_sidebar_shows_the_model_cards_provenance(app):
    sidebar = texts(app.sidebar.caption)
    assert "Trained on real data (TCGA-LGG), data version 0123456789ab" in sidebar
    assert "Validation per-patient volume Dice 0.812 (n=13 patients), from the model card" in sidebar
    assert "smoke" not in sidebar + texts(app.sidebar.warning)
    assert "# Model card: brainseg-segmenter v3" in texts(app.sidebar.markdown)


def test_a_synthetic_smoke_model_is_flagged(monkeypatch):
    monkeypatch.setenv(logic.ENV_SURVIVAL, "")
    at = AppTest.from_file(str(launch.PAGE), default_timeout=60)
    backend = FakeBackend()
    backend.card = {"data_kind": "synthetic", "val_dice": "0.5", "val_n_patients": "3", "size": 64, "card": ""}
    at.session_state["backend"] = backend
    at.run()
    warnings = texts(at.sidebar.warning)
    assert "Trained on SYNTHETIC data" in warnings and "64-px smoke-test model" in warnings


def test_features_come_with_units_and_a_glossary(app):
    image, mask = tumor_slice()
    app.file_uploader[0].set_value([(f"{FOLDER}_5.tif", image, "image/tiff")]).run()
    assert "Lengths and areas are in pixels (px)" in texts(app.caption)
    glossary = app.table[0].value
    assert glossary.set_index("column").loc["area_px", "unit"] == "px"
    assert "no pixel spacing" in glossary.set_index("column").loc["area_px", "meaning"]


@pytest.mark.parametrize("evidence, shown, words", [
    ({"fitted_on": "synthetic"}, True, "Fitted on SYNTHETIC data"),
    ({"cv_roc_auc": None}, False, "does not report its cross-validated ROC-AUC"),
    ({"status": "insufficient_data", "message": "too few clinical fields"}, False, "too few clinical fields"),
])
def test_survival_probability_needs_its_evidence(app, evidence, shown, words):
    app.session_state["survival"].evidence = {**FakeSurvival.evidence, **evidence}
    app.radio[0].set_value("Bundled synthetic example").run()
    assert not app.exception
    metrics = {m.label for m in app.metric}
    assert ("Survival model: probability of death01 = 1" in metrics) == shown
    assert words in texts(app.warning) + texts(app.info)
