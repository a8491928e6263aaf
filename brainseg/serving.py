"""The served segmenter: a custom ``mlflow.pyfunc`` model around ``model.h5``.

Input: a DataFrame with a column ``image`` of base64-encoded TIFF or PNG bytes, one slice per row.
Params: ``threshold`` (float) and ``return_mask`` (bool). Output: one row per image with the
per-slice features of :mod:`brainseg.features`, ``mask_png`` (base64 PNG, 0/255, input size),
``model_run_id`` and ``data_version``. Preprocessing and features are the functions training,
evaluation and ``brainseg predict`` use. Bad rows raise an MLflow INVALID_PARAMETER_VALUE
error (HTTP 400 from ``mlflow models serve``) naming the row and the problem.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
from pathlib import Path

import brainseg.keras_env  # noqa: F401
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from brainseg.data import imageio

IMAGE_COLUMN = "image"
PACKAGE_DIR = Path(__file__).resolve().parent


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_row(value, row: int, channels: str) -> np.ndarray:
    """One request cell -> (H, W, 3) uint8 slice, or a 400 naming the row and the problem."""
    source = f"row {row}, column {IMAGE_COLUMN!r}"
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{source}: empty value; expected base64-encoded TIFF or PNG bytes")
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{source}: not valid base64 ({exc})") from exc
    try:
        arr = imageio.decode_bytes(data, source)
        one_channel = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)
        if one_channel and channels != "flair":
            raise imageio.BadImage(source, "1-channel image, but this model needs 3 channels "
                                           "(pre-contrast, FLAIR, post-contrast)")
        return imageio.check_image(arr, source)
    except imageio.BadImage as exc:
        raise bad_request(str(exc)) from exc


def encode_mask_png(mask: np.ndarray) -> str:
    return base64.b64encode(imageio.encode_png(mask.astype(np.uint8) * 255)).decode("ascii")


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """Slices in, tumor features (and mask) out."""

    def load_context(self, context):
        import tf_keras as keras

        from brainseg.config import TrainConfig

        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.cfg = TrainConfig.from_dict(settings["train"])
        self.meta = settings.get("meta", {})
        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)
        from brainseg.train import predict_probs  # warm-up: trace the graph before the first request

        predict_probs(self.model, np.zeros((1, self.cfg.size, self.cfg.size, self.cfg.prep.n_channels), np.float32))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from brainseg.evaluate import EvalSettings, segment_images
        from brainseg.features import slice_features

        params = params or {}
        threshold = float(params.get("threshold", self.cfg.threshold))
        return_mask = bool(params.get("return_mask", True))
        if not 0.0 < threshold < 1.0:
            raise bad_request(f"param 'threshold': {threshold} is not in (0, 1)")
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            raise bad_request(f"input must be a table with a column {IMAGE_COLUMN!r}")
        images = [decode_row(v, i, self.cfg.channels) for i, v in enumerate(model_input[IMAGE_COLUMN])]
        masks, _ = segment_images(self.model, self.cfg, images, EvalSettings(threshold=threshold))
        rows = []
        for image, mask in zip(images, masks):
            row = slice_features(mask, image)
            row["mask_png"] = encode_mask_png(mask) if return_mask else ""
            row["model_run_id"] = self.meta.get("run_id", "")
            row["data_version"] = self.meta.get("data_version", "")
            rows.append(row)
        return pd.DataFrame(rows)


SERVING_PACKAGES = ("mlflow", "tensorflow-cpu", "tf-keras", "segmentation-models", "numpy", "pandas",
                    "opencv-python-headless", "tifffile", "pillow", "scikit-image", "pyyaml")


def requirements() -> list[str]:
    """Pinned requirements of the served model, from this environment.

    Given explicitly, so MLflow does not infer them by loading the model in a subprocess
    (several seconds per logged model, i.e. per tuning trial).
    """
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in SERVING_PACKAGES:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def example_input(image: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(imageio.encode_png(image)).decode("ascii")]})


def log_pyfunc_segmenter(model_dir: Path, example_image: np.ndarray | None = None, meta: dict | None = None) -> str:
    """Log ``model_dir`` (model.h5 + brainseg.json) as the pyfunc model ``model`` of the active run."""
    from mlflow.models import infer_signature

    from brainseg.train import MODEL_FILE, SETTINGS_FILE

    model_dir = Path(model_dir)
    settings = json.loads((model_dir / SETTINGS_FILE).read_text())
    active = mlflow.active_run()
    settings["meta"] = {**settings.get("meta", {}), **(meta or {}),
                        "run_id": active.info.run_id if active else ""}
    with tempfile.TemporaryDirectory() as tmp:
        settings_path = Path(tmp) / SETTINGS_FILE
        settings_path.write_text(json.dumps(settings, indent=2))
        artifacts = {"keras_model": str(model_dir / MODEL_FILE), "settings": str(settings_path)}
        if example_image is None:
            size = settings["train"]["size"]
            example_image = np.zeros((size, size, 3), np.uint8)
        example = example_input(example_image)
        wrapper = SegmenterModel()

        class _Ctx:  # compute the example output with the same code the server runs
            pass

        ctx = _Ctx()
        ctx.artifacts = artifacts
        wrapper.load_context(ctx)
        output = wrapper.predict(ctx, example, {"threshold": wrapper.cfg.threshold, "return_mask": True})
        signature = infer_signature(example, output, params={"threshold": float(wrapper.cfg.threshold),
                                                             "return_mask": True})
        info = mlflow.pyfunc.log_model(name="model", python_model=SegmenterModel(), artifacts=artifacts,
                                       signature=signature, input_example=example,
                                       code_paths=[str(PACKAGE_DIR)], pip_requirements=requirements())
    return info.model_uri


def load_segmenter(uri: str):
    """Keras model and TrainConfig from a folder/.h5 path, ``runs:/...`` or ``models:/...`` URI."""
    from brainseg.train import load_model_dir

    if Path(uri).exists():
        return load_model_dir(Path(uri))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a bad URI
        raise FileNotFoundError(f"model {uri!r}: cannot be resolved ({exc})") from exc
    return load_model_dir(Path(local))
