"""One truth: the same slices give byte-identical masks through `brainseg predict`, the pyfunc
model loaded with `mlflow.pyfunc.load_model`, the REST server and the page's logic, for a model
whose stored settings turn on TTA and post-processing (per slice and per 3-D volume)."""

from __future__ import annotations

import base64

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from brainseg.bench import experiment_in, register_champion, serve_model
from brainseg.data import imageio
from brainseg.data.synth import generate
from conftest import Tracking

SETTINGS = {"threshold": 0.5, "tta": True, "min_component_px": 4, "largest_3d": True, "precision": "auto"}


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
def case(tmp_path_factory):
    from brainseg.config import TrainConfig
    from brainseg.inference import InferenceSettings, save_model

    root = generate(tmp_path_factory.mktemp("synth") / "kaggle_3m", patients=1, slices=6, size=64, seed=3)
    folder = next(p for p in root.iterdir() if p.is_dir())
    cfg = TrainConfig.from_dict({"arch": "plain_unet", "size": 32, "channels": "flair"})
    model_dir = save_model(fixed_net(32), cfg, InferenceSettings(**SETTINGS), tmp_path_factory.mktemp("m"))
    return folder, model_dir


def test_predict_pyfunc_rest_and_page_give_the_same_masks(case, tmp_path):
    from brainseg.app import logic
    from brainseg.inference import Segmenter
    from brainseg.predict import collect_inputs, predict_files

    folder, model_dir = case
    files, _ = collect_inputs([folder])
    images = [imageio.read_image(f) for f in files]
    patient = [folder.name.rsplit("_", 1)[0]] * len(files)

    # brainseg predict (a patient folder at a time)
    predict_files(Segmenter.from_dir(model_dir), files, tmp_path / "pred")
    by_predict = [imageio.check_mask(imageio.decode_bytes((tmp_path / "pred" / f"{f.stem}_pred.png").read_bytes(),
                                                          "p"), "p") for f in files]
    assert sum(int(m.sum()) for m in by_predict) > 0, "the fixed network should find something"

    # the page's in-process backend
    upload = logic.parse_uploads((f"{folder.name}/{f.name}", f.read_bytes()) for f in files)
    results, problems = logic.analyse(upload.slices, logic.make_segmenter(logic.AppSettings(model_uri=str(model_dir))))
    assert problems == []
    by_page = {r.item.name.rsplit("/", 1)[-1]: r.mask for r in results}

    with Tracking(tmp_path / "mlflow.db"):
        experiment_in("one-truth", tmp_path / "artifacts")
        uri = register_champion(model_dir, images[0], tmp_path / "artifacts")
        frame = pd.DataFrame({"image": [base64.b64encode(imageio.encode_png(im)).decode() for im in images],
                              "patient": patient})
        by_pyfunc = [decode_png(v) for v in mlflow.pyfunc.load_model(uri).predict(frame)["mask_png"]]
        with serve_model(uri, mlflow.get_tracking_uri(), tmp_path / "serve", timeout_s=300) as server:
            body = {"dataframe_split": {"columns": ["image", "patient"], "data": frame.values.tolist()}}
            answer = requests.post(f"{server.url}/invocations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text[:500]
    by_rest = [decode_png(row["mask_png"]) for row in answer.json()["predictions"]]

    for i, f in enumerate(files):
        for name, masks in (("pyfunc", by_pyfunc), ("REST", by_rest)):
            np.testing.assert_array_equal(masks[i], by_predict[i], err_msg=f"{name} vs predict, {f.name}")
        np.testing.assert_array_equal(by_page[f.name], by_predict[i], err_msg=f"page vs predict, {f.name}")


def test_the_stored_settings_matter_here(case):
    """Guard: with these images, TTA and the 3-D step change the masks (else the test above proves little)."""
    from brainseg.inference import Segmenter

    folder, model_dir = case
    images = [imageio.read_image(f) for f in sorted(folder.glob("*[0-9].tif"))]
    groups = ["p"] * len(images)
    stored = Segmenter.from_dir(model_dir)
    plain = stored.with_settings(tta=False, min_component_px=0, largest_3d=False)
    a, b = stored.segment(images, groups).masks, plain.segment(images, groups).masks
    assert any((x != y).any() for x, y in zip(a, b))
