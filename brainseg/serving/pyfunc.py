"""The served segmenter: a custom ``mlflow.pyfunc`` model, a thin wrapper over
:class:`brainseg.inference.segmenter.Segmenter`.

Request: a table with a column ``image`` of base64-encoded TIFF or PNG bytes, one slice per row
(``dataframe_split`` or ``dataframe_records``), and optionally a column ``patient``: rows with the
same patient id, in slice order, form one volume for the stored 3-D post-processing (component_confidence),
as in ``evaluate`` and ``brainseg predict`` (without it each row stands alone); and optionally a
column ``spacing``, each row's pixel spacing ``"y,x"`` in mm, for ``area_mm2``. Or a whole scanner
volume per row: a column ``volume`` of base64 NIfTI bytes (:mod:`brainseg.serving.volume_request`,
answered per patient, by the path of ``brainseg predict --flair``).
Params: ``threshold`` (float in (0, 1); default: the model's stored InferenceSettings) and
``return_mask`` (bool, default true). Everything else
(TTA, post-processing, ``precision``, batch size) is the InferenceSettings stored with the model.

Answer: one row per slice, columns :data:`OUTPUT_COLUMNS`: the per-slice features of
:mod:`brainseg.outcome.features`, ``area_mm2`` (null without a spacing) and ``spacing_mm`` (``0.9x0.9``,
or ``unknown``), ``mask_png`` (base64 PNG, 0/255, input size; null when
``return_mask`` is false), the params applied (``threshold``, ``return_mask``), ``model_run_id``,
``data_version``. The JSON is strict: an undefined feature (the centroid of an empty mask) is
``null``, never NaN.

Refusals are HTTP 400 (MLflow INVALID_PARAMETER_VALUE) naming the row, column, parameter or
limit, never a stack trace (:mod:`brainseg.serving.request`); an error the model did not foresee is
logged with its traceback by the server and answered with a generic HTTP 500 (:func:`http_errors`,
also used by the survival model). Limits per request are read from
the environment of the serving process when the model loads
(:class:`brainseg.serving.limits.RequestLimits`):

- ``BRAINSEG_SERVE_MAX_ROWS`` (default 128, more than the 88 slices of the largest real patient):
  slices per request;
- ``BRAINSEG_SERVE_MAX_PIXELS`` (default 10,485,760 = 160 slices of 256x256): total pixels of
  all slices of a request (each image also obeys the decoder's own per-image limit);
- ``BRAINSEG_SERVE_MAX_IMAGE_BYTES`` (default 16 MiB): encoded size of one image;
- ``BRAINSEG_SERVE_MAX_BODY_BYTES`` (default 64 MiB): the HTTP body, refused with a 413 before
  MLflow reads it, by the server of :mod:`brainseg.serving.scoring_app` only.

The signature declares the params and the answer's columns but no input schema: the model checks
the table itself, so a missing or extra column is refused by name, and MLflow's per-request
schema conversion is skipped (the logged input example shows the request). MLflow's scoring
server drops params the signature does not declare before the model sees them (it logs a
warning); the answer's ``threshold`` and ``return_mask`` columns show what was applied.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401

import base64
import contextlib
import io
import json
import logging
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from brainseg.data import imageio
from brainseg.data.scan import VolumeLimits
from brainseg.outcome.features import SLICE_FEATURE_COLUMNS, slice_features
from brainseg.serving.limits import RequestLimits
from brainseg.serving.request import (  # noqa: F401  (re-exported: the served model's request side)
    IMAGE_COLUMN,
    MIN_SIDE_PX,
    PARAMS,
    PATIENT_COLUMN,
    RequestError,
    bad_request,
    check_params,
    decode_cell,
    decode_image,
    decode_request,
    json_value,
    patient_groups,
    row_spacings,
)
from brainseg.serving.volume_request import answer_volumes, is_volume_request


class ReasonFirst(MlflowException):
    """An MLflow error answer (HTTP status from :attr:`ERROR_CODE`) whose message begins with its reason.

    MLflow's scoring server rewrites the message of an exception the model raises into
    ``"Failed to predict data '<the request table>'. \\nError: <reason>"``
    (``mlflow.pyfunc.scoring_server.invocations``), which put the reason after hundreds of
    characters of the table's dump. Here an assigned message that holds the reason later on is
    rearranged to the reason first, then what was added around it (the server of
    :mod:`brainseg.serving.scoring_app` then drops the dump: an answer never repeats the request).

    >>> e = BadRequest("row 0: not valid base64")
    >>> e.message = f"Failed to predict data '  image\\n0  @@@'. \\nError: {e.message}"
    >>> e.message.splitlines()[0]
    'row 0: not valid base64'
    """

    ERROR_CODE = INVALID_PARAMETER_VALUE

    def __init__(self, message: str):
        self.reason = str(message)
        super().__init__(self.reason, error_code=self.ERROR_CODE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value) -> None:
        value, reason = str(value), getattr(self, "reason", "")
        if reason and not value.startswith(reason) and reason in value:
            before, _, after = value.partition(reason)
            before = before.rstrip().removesuffix("Error:").rstrip()
            value = "\n".join(part for part in (reason, before, after.strip()) if part)
        self._message = value


class BadRequest(ReasonFirst):
    """An HTTP 400 (INVALID_PARAMETER_VALUE): the request is refused, the message says why."""


class ModelFailed(ReasonFirst):
    """An HTTP 500 (INTERNAL_ERROR) with a generic message: the model failed in a way it did not
    foresee. The traceback goes to the server's log, never into the answer."""

    ERROR_CODE = INTERNAL_ERROR
    MESSAGE = "the model failed on this request (an internal error, logged by the server)"

    def __init__(self, message: str = MESSAGE):
        super().__init__(message)


@contextlib.contextmanager
def http_errors(*refusals: type[Exception]):
    """Exceptions of a served model's ``predict`` as HTTP answers: ``refusals`` (the model's own
    "bad input" types) a 400 whose message begins with the reason; an MlflowException as it is;
    a MemoryError a 400 asking for fewer rows; anything else logged here with its traceback and
    answered with :class:`ModelFailed` (MLflow would put the traceback in the answer's
    ``stack_trace``)."""
    try:
        yield
    except refusals as exc:
        raise BadRequest(str(exc)) from None
    except MlflowException:
        raise
    except MemoryError:
        raise BadRequest("out of memory answering the request; send fewer rows") from None
    except Exception:
        LOG.exception("unexpected error inside the served model; answered with a generic HTTP 500")
        raise ModelFailed() from None


LOG = logging.getLogger(__name__)
OUTPUT_COLUMNS = [*SLICE_FEATURE_COLUMNS, "area_mm2", "spacing_mm", "mask_png", *PARAMS, "model_run_id",
                  "data_version"]
MODEL_DIR_ARTIFACT = "model_dir"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the brainseg package, shipped with the model


# ------------------------------------------------------------------------------------ output
def encode_mask_png(mask: np.ndarray) -> str:
    """(H, W) bool -> base64 PNG of 0/255 (fast zlib level: masks compress well anyway)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def area_mm2(mask: np.ndarray, spacing: tuple[float, float] | None) -> float | None:
    """Tumor pixels x the pixel's area (``spacing``: (y, x) in mm); None when the spacing is unknown.

    >>> area_mm2(np.ones((2, 3), bool), (0.5, 0.9)), area_mm2(np.ones((2, 3), bool), None)
    (2.7, None)
    """
    return None if spacing is None else round(float(np.count_nonzero(mask)) * spacing[0] * spacing[1], 9)


def answer_rows(masks, images, threshold: float, return_mask: bool, meta: dict, spacings=None) -> pd.DataFrame:
    """One row per slice (columns OUTPUT_COLUMNS, object dtype so None stays None in the JSON);
    ``spacings``: each slice's (y, x) pixel spacing in mm or None (unknown)."""
    rows = []
    spacings = spacings or [None] * len(masks)
    for mask, image, spacing in zip(masks, images, spacings, strict=True):
        row = [json_value(v) for v in slice_features(mask, image).values()]
        row += [area_mm2(mask, spacing), "unknown" if spacing is None else f"{spacing[0]:g}x{spacing[1]:g}"]
        row += [encode_mask_png(mask) if return_mask else None, threshold, return_mask,
                meta.get("run_id", ""), meta.get("data_version", "")]
        rows.append(row)
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)


def output_schema():
    """The answer's columns and types; geometric features are optional (null on an empty mask)."""
    long_cols = {"area_px", "n_components", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"}
    always = {"tumor", "area_px", "area_pct", "n_components", "spacing_mm", *PARAMS, "model_run_id", "data_version"}
    specs = []
    for c in OUTPUT_COLUMNS:
        kind = ("boolean" if c in ("tumor", "return_mask") else "long" if c in long_cols
                else "string" if c in ("spacing_mm", "mask_png", "model_run_id", "data_version") else "double")
        specs.append(ColSpec(kind, c, required=c in always))
    return Schema(specs)


# ------------------------------------------------------------------------------------- model
class SegmenterModel(mlflow.pyfunc.PythonModel):
    """Slices in, tumor features (and mask) out; all rows of a request in one forward pass
    (batches of the stored ``batch_size``)."""

    def load_context(self, context):
        from brainseg.inference import segmenter

        model_dir = Path(context.artifacts[MODEL_DIR_ARTIFACT])
        model, cfg, settings = segmenter.load_model_dir(model_dir)
        _, _, meta = segmenter.read_settings(next(model_dir.rglob(segmenter.SETTINGS_FILE)))
        self.meta = {k: str(v) for k, v in meta.items()}
        self.limits = RequestLimits.from_env()
        self.volume_limits = VolumeLimits.from_env()  # the volume reader's (brainseg predict --flair)
        self.segmenter = segmenter.Segmenter(model, cfg, settings)
        self.segmenter.warm_up()  # trace the graph before the first request

    def segment(self, images: list[np.ndarray], threshold: float, groups: list[str] | None = None
                ) -> list[np.ndarray]:
        """Masks under the stored settings; another ``threshold`` reuses the same network and
        probabilities (``Segmenter.with_settings`` would rebuild a bfloat16 network per value)."""
        from brainseg.inference import segmenter

        seg = self.segmenter
        if threshold == seg.settings.threshold:
            return seg.segment(images, groups).masks
        X, boxes = seg.prepare(images)
        return segmenter.final_masks(seg.probs(X), [im.shape[:2] for im in images], boxes,
                                     seg.settings.replace(threshold=threshold), groups)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        with http_errors(RequestError):  # a 400 whose message begins with the reason; never a traceback
            threshold, return_mask = check_params(params, self.segmenter.settings.threshold)
            if is_volume_request(model_input):  # a whole scanner volume per row: brainseg predict --flair's path
                return answer_volumes(model_input, lambda images, groups: self.segment(images, threshold, groups),
                                      self.segmenter.cfg.channels, self.limits, self.volume_limits, threshold,
                                      return_mask, self.meta)
            images = decode_request(model_input, self.segmenter.cfg.channels, self.limits)
            groups, spacings = patient_groups(model_input), row_spacings(model_input)
            try:
                masks = self.segment(images, threshold, groups)
            except MemoryError as exc:
                raise bad_request(f"out of memory segmenting {len(images)} slices; send fewer rows") from exc
            return answer_rows(masks, images, threshold, return_mask, self.meta, spacings)


SERVING_PACKAGES = ("mlflow", "tf-keras", "segmentation-models", "numpy", "pandas",
                    "opencv-python-headless", "tifffile", "imagecodecs", "pillow", "scikit-image", "pyyaml",
                    "nibabel", "pydicom", "scipy")  # the last three: the `volume` column's NIfTI reader
TENSORFLOW_PACKAGES = ("tensorflow-cpu", "tensorflow")  # the `cpu` / `gpu` extras; the first installed wins


def requirements() -> list[str]:
    """Pinned requirements of the served model, from this environment.

    Given explicitly, so MLflow does not infer them by loading the model in a subprocess
    (several seconds per logged model, i.e. per tuning trial).
    """
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
    added to its brainseg.json; the served model loads it with ``segmenter.load_model_dir``, so it
    uses exactly the stored InferenceSettings.
    """
    from brainseg.inference import segmenter

    model_dir = Path(model_dir)
    cfg, settings, _ = segmenter.read_settings(next(model_dir.rglob(segmenter.SETTINGS_FILE)))
    active = mlflow.active_run()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / MODEL_DIR_ARTIFACT
        shutil.copytree(model_dir, staged)
        settings_path = next(staged.rglob(segmenter.SETTINGS_FILE))
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
