"""The served outcome model's input contract: columns, types, plausible ranges, enough known fields.

Pure pandas. :func:`check_frame` turns a request frame into the float frame the pipeline takes, or
raises :class:`InvalidInput` naming the column and the row. A row that is valid but holds too few
known fields is not refused: it is marked (``reasons``) so the model answers ``insufficient_data``
instead of a confident class.

Rules:

- code columns hold integer codes (as numbers or strings of digits, ``"2"``), null when unknown;
  a code the model never saw in training is refused (the message lists the codes it knows). The
  texts ``"None"`` and ``"nan"`` are null too: MLflow turns a null of a string column into them in
  the ``instances`` and ``inputs`` request formats (``{"gender": null}`` arrives as ``"None"``).
- ``age_at_initial_pathologic`` is in 0-120 years; imaging features are finite and >= 0; infinity
  is refused, and so is a boolean or a text in a number column (``true`` is not an age of 1 year).
  NaN is null (unknown), as in pandas: over REST a JSON ``null`` of a number column reaches the
  model as NaN, so the two cannot be told apart. :func:`unknown_fields` names, per
  row, what was unknown (the answer's ``message`` lists them: the pipeline imputes them).
- a row needs at least ``min_known_clinical`` known clinical fields when the model uses clinical
  fields, and a known ``tumor_volume_px`` when it uses imaging features.
- at most ``max_rows`` rows per request.
- a column the model does not read is refused by name (a misspelt ``gendr`` would otherwise leave
  ``gender`` unknown without a word). Over REST, MLflow's schema enforcement drops such columns
  before the model sees them, so this holds for frames given to the model directly.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

import numpy as np
import pandas as pd

from brainseg.data.clinical import CLINICAL_COLUMNS
from brainseg.outcome.model import CODE_COLUMNS, IMAGING_COLUMNS

AGE = "age_at_initial_pathologic"
NULL_TEXTS = {"", "none", "nan", "null"}  # a code cell holding one of these (any case) is unknown
RANGES = {AGE: (0.0, 120.0), **{c: (0.0, 1e9) for c in IMAGING_COLUMNS}}
MAX_ROWS = 10_000
CODE_TEXT = re.compile(r"-?[0-9]{1,9}")  # a code as text: ASCII digits, short (int() of 5,000 digits raises)


class InvalidInput(ValueError):
    """A request the model cannot answer; the message names the column and the row."""


@dataclasses.dataclass
class InputSpec:
    """What the fitted model accepts. ``codes``: code column -> codes seen in training."""

    columns: list[str]
    codes: dict[str, list[int]]
    min_known_clinical: int
    max_rows: int = MAX_ROWS

    @property
    def clinical(self) -> list[str]:
        return [c for c in self.columns if c in CLINICAL_COLUMNS]

    @property
    def imaging(self) -> list[str]:
        return [c for c in self.columns if c in IMAGING_COLUMNS]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        return cls(list(d["columns"]), {k: [int(v) for v in vs] for k, vs in d["codes"].items()},
                   int(d["min_known_clinical"]), int(d.get("max_rows", MAX_ROWS)))


def build_spec(X: pd.DataFrame, columns: list[str], min_known_fraction: float = 0.5) -> InputSpec:
    """The spec of a model fitted on ``X[columns]`` (codes seen: the non-missing values)."""
    codes = {c: sorted({int(v) for v in X[c].dropna()}) for c in columns if c in CODE_COLUMNS}
    clinical = [c for c in columns if c in CLINICAL_COLUMNS]
    return InputSpec(list(columns), codes, math.ceil(min_known_fraction * len(clinical)) if clinical else 0)


def _code(value, column: str, row: int) -> float:
    """One code cell -> float code (NaN when missing), or InvalidInput."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInput(f"column {column!r}, row {row}: {value!r} is not an integer code")
    if isinstance(value, numbers.Integral):
        return float(value)
    if isinstance(value, numbers.Real):
        if math.isfinite(value) and float(value).is_integer():
            return float(value)
        raise InvalidInput(f"column {column!r}, row {row}: {value!r} is not an integer code")
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in NULL_TEXTS:
            return math.nan
        if CODE_TEXT.fullmatch(text):
            return float(int(text))
    raise InvalidInput(f"column {column!r}, row {row}: {_shown(value)} is not an integer code")


def _shown(value) -> str:
    """A cell as quoted in a refusal: its text cut to 40 characters (never the whole request)."""
    text = str(value)
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _number(value, column: str, row: int) -> float:
    """One number cell -> float (NaN when missing), or InvalidInput. A boolean or a text is refused
    (over REST the signature types these columns ``Any``, so MLflow hands over what was sent)."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        kind = "a boolean" if isinstance(value, (bool, np.bool_)) else "not a number"
        raise InvalidInput(f"column {column!r}, row {row}: {_shown(value)} is {kind}; expected a number or null")
    try:
        value = float(value)
    except OverflowError:  # an integer of hundreds of digits
        value = math.inf if value > 0 else -math.inf
    if math.isnan(value):
        return value
    low, high = RANGES.get(column, (-math.inf, math.inf))
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidInput(f"column {column!r}, row {row}: {value!r} is outside the plausible range "
                           f"{low:g}-{high:g}")
    return value


def check_frame(frame: pd.DataFrame, spec: InputSpec) -> tuple[pd.DataFrame, list[str | None]]:
    """Request frame -> (float frame with exactly ``spec.columns``, per-row reason or None).

    Missing columns are all-unknown. Raises InvalidInput for no rows or no known column, too many
    rows, a column the model does not read, a value of the wrong type, a value out of range or a
    code not seen in training. A reason (``"2 of 16 clinical fields known, need 8"``) marks a row
    with too few known fields.
    """
    if len(frame) > spec.max_rows:
        raise InvalidInput(f"{len(frame)} rows in one request; the limit is {spec.max_rows}")
    unknown = [str(c) for c in frame.columns if c not in spec.columns]
    if unknown:
        raise InvalidInput(f"unknown column(s) {', '.join(_shown(c) for c in unknown[:10])}"
                           f"{' ...' if len(unknown) > 10 else ''}: the model reads only "
                           f"{', '.join(spec.columns)}")
    if not len(frame) or not set(frame.columns) & set(spec.columns):
        raise InvalidInput(f"no row with a known column (the model reads {', '.join(spec.columns[:4])}, ... "
                           f"{len(spec.columns)} columns in all)")
    out = pd.DataFrame(index=frame.index, columns=spec.columns, dtype=float)
    for column in spec.columns:
        if column not in frame.columns:
            continue
        convert = _code if column in spec.codes else _number
        values = [convert(v, column, i) for i, v in enumerate(frame[column].tolist())]
        if column in spec.codes:
            known = set(spec.codes[column])
            for i, v in enumerate(values):
                if not math.isnan(v) and int(v) not in known:
                    raise InvalidInput(f"column {column!r}, row {i}: code {int(v)} was not seen in training "
                                       f"(known codes: {', '.join(map(str, spec.codes[column]))})")
        out[column] = values
    reasons: list[str | None] = []
    clinical, imaging = spec.clinical, spec.imaging
    known_clinical = out[clinical].notna().sum(axis=1) if clinical else None
    for i in range(len(out)):
        why = []
        if clinical and known_clinical.iloc[i] < spec.min_known_clinical:
            why.append(f"{int(known_clinical.iloc[i])} of {len(clinical)} clinical fields known, "
                       f"need {spec.min_known_clinical}")
        if imaging and ("tumor_volume_px" not in imaging or pd.isna(out["tumor_volume_px"].iloc[i])):
            why.append("imaging features unknown (tumor_volume_px missing)")
        reasons.append("; ".join(why) or None)
    return out, reasons


def unknown_fields(X: pd.DataFrame) -> list[list[str]]:
    """Per row of a checked frame (:func:`check_frame`), the columns that are unknown (null, NaN,
    absent): the pipeline imputes them."""
    missing = X.isna()
    return [[c for c in X.columns if missing.at[i, c]] for i in X.index]
