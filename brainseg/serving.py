"""The served segmenter: a custom ``mlflow.pyfunc`` model, a thin wrapper over
:class:`brainseg.inference.Segmenter`.

Request: a table with a column ``image`` of base64-encoded TIFF or PNG bytes, one slice per row
(``dataframe_split`` or ``dataframe_records``), and optionally a column ``patient``: rows with the
same patient id, in slice order, form one volume for the stored ``largest_3d`` post-processing,
as in ``evaluate`` and ``brainseg predict`` (without it each row stands alone).
Params: ``threshold`` (float in (0, 1); default: the model's stored InferenceSettings) and
``return_mask`` (bool, default true). Everything else
(TTA, post-processing, ``precision``, batch size) is the InferenceSettings stored with the model.

Answer: one row per slice, columns :data:`OUTPUT_COLUMNS`: the per-slice features of
:mod:`brainseg.outcome.features`, ``mask_png`` (base64 PNG, 0/255, input size; null when
``return_mask`` is false), ``threshold`` (the one applied), ``model_run_id``, ``data_version``.
The JSON is strict: an undefined feature (the centroid of an empty mask) is ``null``, never NaN.

Refusals are HTTP 400 (MLflow INVALID_PARAMETER_VALUE) naming the row, column, parameter or
limit, never a stack trace. Limits per request, read from the environment of the serving process
when the model loads (:class:`RequestLimits`):

- ``BRAINSEG_SERVE_MAX_ROWS`` (default 64): slices per request;
- ``BRAINSEG_SERVE_MAX_PIXELS`` (default 8,388,608 = 128 slices of 256x256): total pixels of
  all slices of a request (each image also obeys the decoder's own per-image limit);
- ``BRAINSEG_SERVE_MAX_IMAGE_BYTES`` (default 16 MiB): encoded size of one image.

The signature declares the params and the answer's columns but no input schema: the model checks
the table itself, so a missing or extra column is refused by name, and MLflow's per-request
schema conversion is skipped (the logged input example shows the request). MLflow's scoring
server drops params the signature does not declare before the model sees them (it logs a
warning); the answer's ``threshold`` column shows the threshold that was applied.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import brainseg.keras_env  # noqa: F401
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from brainseg.data import imageio
from brainseg.outcome.features import SLICE_FEATURE_COLUMNS, slice_features

IMAGE_COLUMN = "image"
PATIENT_COLUMN = "patient"
OUTPUT_COLUMNS = [*SLICE_FEATURE_COLUMNS, "mask_png", "threshold", "model_run_id", "data_version"]
MODEL_DIR_ARTIFACT = "model_dir"
PACKAGE_DIR = Path(__file__).resolve().parent
MIN_SIDE_PX = 32  # smaller slices cannot hold a head at the data's resolution


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# ------------------------------------------------------------------------------------ limits
@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one request may hold; see the module docstring for the environment variables."""

    max_rows: int = 64
    max_pixels: int = 8_388_608
    max_image_bytes: int = 16 * 2**20

    ENV = {"max_rows": "BRAINSEG_SERVE_MAX_ROWS", "max_pixels": "BRAINSEG_SERVE_MAX_PIXELS",
           "max_image_bytes": "BRAINSEG_SERVE_MAX_IMAGE_BYTES"}

    @classmethod
    def from_env(cls, env=None) -> "RequestLimits":
        """Defaults overridden by the environment; ValueError naming a variable that is not an int >= 1."""
        env = os.environ if env is None else env
        values = {}
        for field, var in cls.ENV.items():
            raw = (env.get(var) or "").strip()
            if not raw:
                continue
            try:
                values[field] = int(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not an integer") from None
            if values[field] < 1:
                raise ValueError(f"{var}={raw!r} must be >= 1")
        return cls(**values)


# ------------------------------------------------------------------------------------ params
def check_params(params: dict | None, default_threshold: float) -> tuple[float, bool]:
    """``params`` -> (threshold, return_mask), or a 400 naming the parameter.

    MLflow's params schema already refuses wrong types over REST; this also covers null (which
    MLflow lets through), NaN and direct ``predict`` calls.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - {"threshold", "return_mask"})
    if unknown:
        raise bad_request(f"unknown param(s) {', '.join(map(repr, unknown))}; "
                          "known: 'threshold' (float in (0, 1)), 'return_mask' (bool)")
    threshold = params.get("threshold", default_threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise bad_request(f"param 'threshold': got {json.dumps(threshold, default=str)} "
                          f"({type(threshold).__name__}); expected a number in (0, 1)")
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:  # also NaN
        raise bad_request(f"param 'threshold': {threshold} is not in (0, 1)")
    return_mask = params.get("return_mask", True)
    if not isinstance(return_mask, (bool, np.bool_)):
        raise bad_request(f"param 'return_mask': got {json.dumps(return_mask, default=str)} "
                          f"({type(return_mask).__name__}); expected true or false")
    return threshold, bool(return_mask)


# ------------------------------------------------------------------------------------- input
def _kind(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    if isinstance(value, (int, float, np.number)):
        return "a number"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def decode_cell(value, row: int, limits: RequestLimits) -> bytes:
    """One request cell -> the image file's bytes, or a 400 naming the row, the column and the problem."""
    source = f"row {row}, column {IMAGE_COLUMN!r}"
    if not isinstance(value, str):
        raise bad_request(f"{source}: got {_kind(value)}; expected a string of base64-encoded TIFF or PNG bytes")
    value = value.strip()
    if not value:
        raise bad_request(f"{source}: empty string; expected base64-encoded TIFF or PNG bytes")
    if len(value) * 3 // 4 > limits.max_image_bytes:
        raise bad_request(f"{source}: image of about {len(value) * 3 // 4:,} bytes exceeds the limit of "
                          f"{limits.max_image_bytes:,} bytes per image ({RequestLimits.ENV['max_image_bytes']})")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{source}: not valid base64 ({exc})") from exc


def decode_image(data: bytes, row: int, channels: str) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8 slice (header checked first), or a 400 naming the row."""
    source = f"row {row}, column {IMAGE_COLUMN!r}"
    try:
        arr = imageio.decode_bytes(data, source)
        imageio.check_model_channels(arr, source, channels)
        return imageio.check_image(arr, source)
    except imageio.BadImage as exc:
        raise bad_request(str(exc)) from exc


def patient_groups(model_input: pd.DataFrame) -> list[str] | None:
    """The optional ``patient`` column as one id per row (None without the column)."""
    if PATIENT_COLUMN not in model_input.columns:
        return None
    groups = []
    for i, v in enumerate(model_input[PATIENT_COLUMN].tolist()):
        if isinstance(v, bool) or not isinstance(v, (str, int, np.integer)) or str(v).strip() == "":
            got = "an empty string" if isinstance(v, str) else _kind(v)
            raise bad_request(f"row {i}, column {PATIENT_COLUMN!r}: got {got}; expected a patient id (string)")
        groups.append(str(v))
    return groups


def decode_request(model_input, channels: str, limits: RequestLimits) -> list[np.ndarray]:
    """The request table -> its (H, W, 3) uint8 slices.

    Checks, before decoding any pixel: the table's columns, the row count, each cell's type and
    size, each image's header (declared size, channels, pages: :func:`imageio.probe_bytes`) and
    the request's total pixels. Any failure is a 400 naming the row/column/limit.
    """
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
        raise bad_request(f"input must be a table with a column {IMAGE_COLUMN!r} (got {got})")
    extra = [str(c) for c in model_input.columns if c not in (IMAGE_COLUMN, PATIENT_COLUMN)]
    if extra:
        raise bad_request(f"unknown column(s) {', '.join(map(repr, extra))}; the columns are {IMAGE_COLUMN!r} "
                          f"and, optionally, {PATIENT_COLUMN!r}")
    n = len(model_input)
    if n == 0:
        raise bad_request("the request holds no rows; send one base64 image per row")
    if n > limits.max_rows:
        raise bad_request(f"{n} rows exceed the limit of {limits.max_rows} rows per request "
                          f"({RequestLimits.ENV['max_rows']}); split the request")
    cells = [decode_cell(v, i, limits) for i, v in enumerate(model_input[IMAGE_COLUMN].tolist())]
    total = 0
    for i, data in enumerate(cells):
        source = f"row {i}, column {IMAGE_COLUMN!r}"
        try:
            info = imageio.probe_bytes(data, source)
        except imageio.BadImage as exc:
            raise bad_request(str(exc)) from exc
        if min(info.width, info.height) < MIN_SIDE_PX:
            raise bad_request(f"{source}: image of {info.width}x{info.height} pixels is too small; "
                              f"each side must be at least {MIN_SIDE_PX} pixels")
        total += info.pixels
        if total > limits.max_pixels:
            raise bad_request(f"row {i}: the request's slices hold more than the limit of {limits.max_pixels:,} "
                              f"pixels per request ({RequestLimits.ENV['max_pixels']}); split the request")
    return [decode_image(data, i, channels) for i, data in enumerate(cells)]


# ------------------------------------------------------------------------------------ output
def encode_mask_png(mask: np.ndarray) -> str:
    """(H, W) bool -> base64 PNG of 0/255 (fast zlib level: masks compress well anyway)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def json_value(v):
    """A feature as a strict-JSON Python value: NaN/inf -> None, NumPy scalars -> Python."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def answer_rows(masks, images, threshold: float, return_mask: bool, meta: dict) -> pd.DataFrame:
    """One row per slice (columns OUTPUT_COLUMNS, object dtype so None stays None in the JSON)."""
    rows = []
    for mask, image in zip(masks, images, strict=True):
        row = [json_value(v) for v in slice_features(mask, image).values()]
        row += [encode_mask_png(mask) if return_mask else None, threshold,
                meta.get("run_id", ""), meta.get("data_version", "")]
        rows.append(row)
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)


def output_schema():
    """The answer's columns and types; geometric features are optional (null on an empty mask)."""
    from mlflow.types.schema import ColSpec, Schema

    long_cols = {"area_px", "n_components", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"}
    always = {"tumor", "area_px", "area_pct", "n_components", "threshold", "model_run_id", "data_version"}
    specs = []
    for c in OUTPUT_COLUMNS:
        kind = ("boolean" if c == "tumor" else "long" if c in long_cols
                else "string" if c in ("mask_png", "model_run_id", "data_version") else "double")
        specs.append(ColSpec(kind, c, required=c in always))
    return Schema(specs)


# ------------------------------------------------------------------------------------- model
class SegmenterModel(mlflow.pyfunc.PythonModel):
    """Slices in, tumor features (and mask) out; all rows of a request in one forward pass
    (batches of the stored ``batch_size``)."""

    def load_context(self, context):
        from brainseg import inference

        model_dir = Path(context.artifacts[MODEL_DIR_ARTIFACT])
        model, cfg, settings = inference.load_model_dir(model_dir)
        _, _, meta = inference.read_settings(next(model_dir.rglob(inference.SETTINGS_FILE)))
        self.meta = {k: str(v) for k, v in meta.items()}
        self.limits = RequestLimits.from_env()
        self.segmenter = inference.Segmenter(model, cfg, settings)
        self.segmenter.warm_up()  # trace the graph before the first request

    def segment(self, images: list[np.ndarray], threshold: float, groups: list[str] | None = None
                ) -> list[np.ndarray]:
        """Masks under the stored settings; another ``threshold`` reuses the same network and
        probabilities (``Segmenter.with_settings`` would rebuild a bfloat16 network per value)."""
        from brainseg import inference

        seg = self.segmenter
        if threshold == seg.settings.threshold:
            return seg.segment(images, groups).masks
        X, boxes = seg.prepare(images)
        return inference.final_masks(seg.probs(X), [im.shape[:2] for im in images], boxes,
                                     seg.settings.replace(threshold=threshold), groups)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        threshold, return_mask = check_params(params, self.segmenter.settings.threshold)
        images = decode_request(model_input, self.segmenter.cfg.channels, self.limits)
        groups = patient_groups(model_input)
        try:
            masks = self.segment(images, threshold, groups)
        except MemoryError as exc:
            raise bad_request(f"out of memory segmenting {len(images)} slices; send fewer rows") from exc
        return answer_rows(masks, images, threshold, return_mask, self.meta)


SERVING_PACKAGES = ("mlflow", "tf-keras", "segmentation-models", "numpy", "pandas",
                    "opencv-python-headless", "tifffile", "pillow", "scikit-image", "pyyaml")
TENSORFLOW_PACKAGES = ("tensorflow-cpu", "tensorflow")  # the `cpu` / `gpu` extras; the first installed wins


def requirements() -> list[str]:
    """Pinned requirements of the served model, from this environment.

    Given explicitly, so MLflow does not infer them by loading the model in a subprocess
    (several seconds per logged model, i.e. per tuning trial).
    """
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in TENSORFLOW_PACKAGES:  # one TensorFlow only: both provide the same module
        try:
            out.append(f"{name}=={version(name)}")
            break
        except PackageNotFoundError:
            continue
    for name in SERVING_PACKAGES:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def example_input(image: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(imageio.encode_png(image)).decode("ascii")]})


def log_pyfunc_segmenter(model_dir: Path, example_image: np.ndarray | None = None, meta: dict | None = None) -> str:
    """Log ``model_dir`` (model.h5 + brainseg.json) as the pyfunc model ``model`` of the active run.

    The folder is logged whole as artifact ``model_dir``, with ``meta`` (run id, data version)
    added to its brainseg.json; the served model loads it with ``inference.load_model_dir``, so it
    uses exactly the stored InferenceSettings.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from brainseg import inference

    model_dir = Path(model_dir)
    cfg, settings, _ = inference.read_settings(next(model_dir.rglob(inference.SETTINGS_FILE)))
    active = mlflow.active_run()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / MODEL_DIR_ARTIFACT
        shutil.copytree(model_dir, staged)
        settings_path = next(staged.rglob(inference.SETTINGS_FILE))
        stored = json.loads(settings_path.read_text())
        stored["meta"] = {**stored.get("meta", {}), **(meta or {}), "run_id": active.info.run_id if active else ""}
        settings_path.write_text(json.dumps(stored, indent=2))
        if example_image is None:
            example_image = np.zeros((cfg.size, cfg.size, 3), np.uint8)
        signature = ModelSignature(  # no input schema: predict checks the table itself (see module doc)
            inputs=None, outputs=output_schema(),
            params=ParamSchema([ParamSpec("threshold", "double", float(settings.threshold)),
                                ParamSpec("return_mask", "boolean", True)]))
        info = mlflow.pyfunc.log_model(name="model", python_model=SegmenterModel(),
                                       artifacts={MODEL_DIR_ARTIFACT: str(staged)}, signature=signature,
                                       input_example=example_input(example_image),
                                       code_paths=[str(PACKAGE_DIR)], pip_requirements=requirements())
    return info.model_uri


def resolve_model_dir(uri: str) -> Path:
    """A local folder holding model.h5 + brainseg.json for a folder/.h5 path, ``runs:/...`` or
    ``models:/...`` URI (resolved against the current tracking store: MLFLOW_TRACKING_URI, else
    ``sqlite:///mlflow.db`` in the working folder). FileNotFoundError naming the URI otherwise."""
    if Path(uri).exists():
        return Path(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a bad URI
        raise FileNotFoundError(f"model {uri!r}: cannot be resolved in the tracking store "
                                f"{mlflow.get_tracking_uri()} ({exc})") from exc


def load_segmenter(uri: str):
    """Keras model and TrainConfig from a folder/.h5 path, ``runs:/...`` or ``models:/...`` URI
    (the stored InferenceSettings: ``inference.Segmenter.from_dir(resolve_model_dir(uri))``)."""
    from brainseg import inference

    model, cfg, _ = inference.load_model_dir(resolve_model_dir(uri))
    return model, cfg
