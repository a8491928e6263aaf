"""One truth: the same slices give byte-identical masks through `brainseg predict`, the pyfunc
model loaded with `mlflow.pyfunc.load_model`, the REST server and the page's logic, for a model
whose stored settings turn on TTA and post-processing (per slice and per 3-D volume); on a
synthetic patient and on an 88-slice volume of real slices (the largest real patient's count),
which the page's REST backend and a REST client each send in one request. One server for the
module."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from brainseg.bench import experiment_in, register_champion, serve_model
from brainseg.data import imageio
from brainseg.data.synth import generate
from conftest import Tracking
from helpers import strict_json

SETTINGS = {"threshold": 0.5, "tta": True, "min_component_px": 4, "largest_3d": True, "precision": "auto"}
REAL_PATIENT_MAX_SLICES = 88  # the largest patient of the real LGG data set


def fixed_net(size: int):
    """(S, S, 1) z-scored FLAIR -> sigmoid(3 x - 1): deterministic, finds bright regions."""
    import tf_keras as keras

    inp = keras.Input((size, size, 1))
    conv = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")
    model = keras.Model(inp, conv(inp))
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[1, 1] = 2.0
    kernel[1, 2] = 1.0  # not mirror-symmetric: flip TTA changes the probabilities
    conv.set_weights([kernel, np.array([-1.0], np.float32)])
    return model


def decode_png(b64: str) -> np.ndarray:
    return imageio.check_mask(imageio.decode_bytes(base64.b64decode(b64), "answer"), "answer")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.settings.config import Train

    cfg = Train.from_dict({"arch": "plain_unet", "size": 32, "channels": "flair"})
    return save_model(fixed_net(32), cfg, InferenceSettings(**SETTINGS), tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory) -> Path:
    root = generate(tmp_path_factory.mktemp("synth") / "kaggle_3m", patients=1, slices=6, size=64, seed=3)
    return next(p for p in root.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def real_volume(real_sample, tmp_path_factory) -> Path:
    """88 real slices (as many as the largest real LGG patient has) as one patient folder: the
    sample's slices in patient and slice order, renumbered 1..88 (its patients have fewer each)."""
    def number(p: Path) -> int:
        return int(p.stem.rsplit("_", 1)[1])

    slices = sorted((p for p in real_sample.glob("*/*.tif") if not p.stem.endswith("_mask")),
                    key=lambda p: (p.parent.name, number(p)))[:REAL_PATIENT_MAX_SLICES]
    assert len(slices) == REAL_PATIENT_MAX_SLICES
    folder = tmp_path_factory.mktemp("real88") / "TCGA_ZZ_0088_20000101"
    folder.mkdir()
    for k, p in enumerate(slices, start=1):
        shutil.copyfile(p, folder / f"{folder.name}_{k}.tif")
    return folder


@pytest.fixture(scope="module")
def served(model_dir, synthetic_folder, tmp_path_factory):
    """The model registered as champion and served once for the module (``mlflow models serve``)."""
    folder = tmp_path_factory.mktemp("one-truth-mlflow")
    with Tracking(folder / "mlflow.db"):
        experiment_in("one-truth", folder / "artifacts")
        image = imageio.read_image(next(synthetic_folder.glob("*_1.tif")))
        uri = register_champion(model_dir, image, folder / "artifacts")
        with serve_model(uri, mlflow.get_tracking_uri(), folder / "serve", timeout_s=300) as server:
            yield uri, server


@pytest.mark.parametrize("data", ["synthetic", pytest.param("real", marks=pytest.mark.real)])
def test_predict_pyfunc_rest_and_page_give_the_same_masks(data, model_dir, served, request, tmp_path):
    from brainseg.app import logic
    from brainseg.inference.segmenter import Segmenter
    from brainseg.pipeline.predict import collect_inputs, predict_files

    folder = request.getfixturevalue("real_volume" if data == "real" else "synthetic_folder")
    uri, server = served
    files, _ = collect_inputs([folder])
    images = [imageio.read_image(f) for f in files]
    patient = [folder.name.rsplit("_", 1)[0]] * len(files)

    # brainseg predict (a patient folder at a time)
    predict_files(Segmenter.from_dir(model_dir), files, tmp_path / "pred")
    by_predict = [imageio.check_mask(imageio.decode_bytes((tmp_path / "pred" / f"{f.stem}_pred.png").read_bytes(),
                                                          "p"), "p") for f in files]
    assert sum(int(m.sum()) for m in by_predict) > 0, "the fixed network should find something"

    # the page's logic, with the model in-process and with the served model (its REST backend)
    upload = logic.parse_uploads((f"{folder.name}/{f.name}", f.read_bytes()) for f in files)
    by_page = {}
    for name, backend in (("page", logic.make_segmenter(logic.AppSettings(model_uri=str(model_dir)))),
                          ("page over REST", logic.RestBackend(server.url))):
        results, problems = logic.analyse(upload.slices, backend)
        assert problems == [] and len(results) == len(files), name
        by_page[name] = {r.item.name.rsplit("/", 1)[-1]: r.mask for r in results}

    frame = pd.DataFrame({"image": [base64.b64encode(imageio.encode_png(im)).decode() for im in images],
                          "patient": patient})
    by_pyfunc = [decode_png(v) for v in mlflow.pyfunc.load_model(uri).predict(frame)["mask_png"]]
    body = {"dataframe_split": {"columns": ["image", "patient"], "data": frame.values.tolist()}}
    answer = requests.post(f"{server.url}/invocations", json=body, timeout=120)  # the volume in one request
    assert answer.status_code == 200, answer.text[:500]
    by_rest = [decode_png(row["mask_png"]) for row in strict_json(answer.text)["predictions"]]

    for i, f in enumerate(files):
        for name, masks in (("pyfunc", by_pyfunc), ("REST", by_rest)):
            np.testing.assert_array_equal(masks[i], by_predict[i], err_msg=f"{name} vs predict, {f.name}")
        for name, masks in by_page.items():
            np.testing.assert_array_equal(masks[f.name], by_predict[i], err_msg=f"{name} vs predict, {f.name}")


@pytest.mark.parametrize("data, step", [
    ("synthetic", {"tta": False}),
    pytest.param("real", {"tta": False}, marks=pytest.mark.real),
    pytest.param("real", {"largest_3d": False}, marks=pytest.mark.real),  # the synthetic patient has one blob
])
def test_the_stored_settings_matter_here(data, step, model_dir, request):
    """Guard: with these images, TTA (and on the real volume the 3-D step) change the masks
    (else the test above proves little)."""
    from brainseg.inference.segmenter import Segmenter

    folder = request.getfixturevalue("real_volume" if data == "real" else "synthetic_folder")
    images = [imageio.read_image(f) for f in sorted(folder.glob("*[0-9].tif"))]
    groups = ["p"] * len(images)
    stored = Segmenter.from_dir(model_dir)
    a, b = stored.segment(images, groups).masks, stored.with_settings(**step).segment(images, groups).masks
    assert any((x != y).any() for x, y in zip(a, b))
