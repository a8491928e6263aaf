"""A request to the served segmenter -> checked params and decoded slices, or a
:class:`RequestError` (an HTTP 400 once the pyfunc raises it) naming the row, column, parameter or limit.

Nothing is decoded before the table's shape, the row count, each cell's size and each image's
header have been checked against :class:`brainseg.serving.limits.RequestLimits`.

A slice request may carry a column ``spacing``: each row's pixel spacing ``"y,x"`` in mm (rows,
then columns), from which the answer's ``area_mm2`` is computed (:func:`row_spacings`); without it
(or with a null cell) the spacing is unknown and ``area_mm2`` is null. A whole volume (a ``volume``
column) is :mod:`brainseg.serving.volume_request`'s.
"""

from __future__ import annotations

import base64
import binascii
import json
import math

import numpy as np
import pandas as pd

from brainseg.data import imageio
from brainseg.serving.limits import RequestLimits

IMAGE_COLUMN = "image"
PATIENT_COLUMN = "patient"
SPACING_COLUMN = "spacing"
PARAMS = ("threshold", "return_mask")  # the params the signature declares, echoed in the answer
MIN_SIDE_PX = RequestLimits.MIN_SIDE_PX  # the same for brainseg predict (RequestLimits.image_problem)
SHOWN_CHARS = 40  # a value quoted in a refusal is cut here: an answer never repeats the request


class RequestError(ValueError):
    """A request the served model refuses, naming the row, column, parameter or limit: the pyfunc
    answers it as an HTTP 400 whose message begins with this reason
    (:class:`brainseg.serving.pyfunc.BadRequest`)."""


def bad_request(message: str) -> RequestError:
    return RequestError(message)


def shown(value) -> str:
    """``value`` as JSON for a refusal, cut to :data:`SHOWN_CHARS` characters.

    >>> shown("x" * 100)
    '"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'
    """
    text = json.dumps(value, default=str)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def names(columns) -> str:
    """Column names for a refusal: each cut to :data:`SHOWN_CHARS`, at most 10 of them."""
    columns = [str(c) for c in columns]
    cut = [repr(c if len(c) <= SHOWN_CHARS else c[:SHOWN_CHARS] + "...") for c in columns[:10]]
    return ", ".join(cut) + (f" and {len(columns) - 10} more" if len(columns) > 10 else "")


def json_value(v):
    """A feature as a strict-JSON Python value: NaN/inf -> None, NumPy scalars -> Python."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ------------------------------------------------------------------------------------ params
def check_params(params: dict | None, default_threshold: float) -> tuple[float, bool]:
    """``params`` -> (threshold, return_mask), or a 400 naming the parameter.

    MLflow's params schema already refuses wrong types over REST; this also covers null (which
    MLflow lets through), NaN and direct ``predict`` calls.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise bad_request(f"unknown param(s) {names(unknown)}; "
                          "known: 'threshold' (float in (0, 1)), 'return_mask' (bool)")
    threshold = params.get("threshold", default_threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise bad_request(f"param 'threshold': got {shown(threshold)} "
                          f"({type(threshold).__name__}); expected a number in (0, 1)")
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:  # also NaN
        raise bad_request(f"param 'threshold': {threshold} is not in (0, 1)")
    return_mask = params.get("return_mask", True)
    if not isinstance(return_mask, (bool, np.bool_)):
        raise bad_request(f"param 'return_mask': got {shown(return_mask)} "
                          f"({type(return_mask).__name__}); expected true or false")
    return threshold, bool(return_mask)


# ------------------------------------------------------------------------------------- input
def value_kind(value) -> str:
    """What a request cell holds, for a refusal ("null", "a number", "a list", ...)."""
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
    return base64_cell(value, f"row {row}, column {IMAGE_COLUMN!r}", "TIFF or PNG", limits)


def base64_cell(value, source: str, kind: str, limits: RequestLimits, noun: str = "image") -> bytes:
    """A base64 cell (an image, a volume file) -> its bytes within the body limit, or a 400 naming
    ``source`` and what ``kind`` of file was expected; nothing is decoded past the limit."""
    if not isinstance(value, str):
        raise bad_request(f"{source}: got {value_kind(value)}; expected a string of base64-encoded {kind} bytes")
    value = value.strip()
    if not value:
        raise bad_request(f"{source}: empty string; expected base64-encoded {kind} bytes")
    too_big = limits.bytes_problem(len(value) * 3 // 4, about=True)
    if too_big:
        raise bad_request(f"{source}: {too_big.replace('image', noun, 1)}")
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
            got = "an empty string" if isinstance(v, str) else value_kind(v)
            raise bad_request(f"row {i}, column {PATIENT_COLUMN!r}: got {got}; expected a patient id (string)")
        groups.append(str(v))
    return groups


def parse_spacing(value, row: int) -> tuple[float, float] | None:
    """A ``spacing`` cell -> (row, column) pixel spacing in mm; None for a null cell (unknown); a 400
    naming the row otherwise.

    >>> parse_spacing("0.9, 0.45", 0), parse_spacing(None, 1)
    ((0.9, 0.45), None)
    """
    if value_kind(value) == "null":
        return None
    source = f"row {row}, column {SPACING_COLUMN!r}"
    expected = 'expected "y,x": the pixel spacing in mm (rows, then columns), e.g. "0.9,0.9"'
    if not isinstance(value, str):
        raise bad_request(f"{source}: got {value_kind(value)}; {expected}")
    parts = value.split(",")
    try:
        numbers = tuple(float(p) for p in parts)
    except ValueError:
        numbers = ()
    if len(parts) != 2 or len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
        raise bad_request(f"{source}: {shown(value)} is not two positive numbers; {expected}")
    return numbers


def row_spacings(model_input: pd.DataFrame) -> list[tuple[float, float] | None]:
    """Each row's (y, x) pixel spacing in mm from the optional ``spacing`` column (None: unknown)."""
    if SPACING_COLUMN not in model_input.columns:
        return [None] * len(model_input)
    return [parse_spacing(v, i) for i, v in enumerate(model_input[SPACING_COLUMN].tolist())]


def decode_request(model_input, channels: str, limits: RequestLimits) -> list[np.ndarray]:
    """The request table -> its (H, W, 3) uint8 slices.

    Checks, before decoding any pixel: the table's columns, the row count, each cell's type and
    size, each image's header (declared size, channels, pages: :func:`imageio.probe_bytes`) and
    the request's total pixels. Any failure is a 400 naming the row/column/limit.
    """
    if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
        got = (f"columns {names(model_input.columns)}" if isinstance(model_input, pd.DataFrame)
               else type(model_input).__name__)
        raise bad_request(f"input must be a table with a column {IMAGE_COLUMN!r} (got {got})")
    extra = [str(c) for c in model_input.columns if c not in (IMAGE_COLUMN, PATIENT_COLUMN, SPACING_COLUMN)]
    if extra:
        raise bad_request(f"unknown column(s) {names(extra)}; the columns are {IMAGE_COLUMN!r} "
                          f"and, optionally, {PATIENT_COLUMN!r} and {SPACING_COLUMN!r} (or, for a whole volume, "
                          "'volume')")
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
        too_small = limits.image_problem(info.width, info.height)
        if too_small:
            raise bad_request(f"{source}: {too_small}")
        total += info.pixels
        if total > limits.max_pixels:
            raise bad_request(f"row {i}: the request's slices hold more than the limit of {limits.max_pixels:,} "
                              f"pixels per request ({RequestLimits.ENV['max_pixels']}); split the request")
    return [decode_image(data, i, channels) for i, data in enumerate(cells)]
