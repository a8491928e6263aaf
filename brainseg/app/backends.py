"""The page's models: two segmenter backends with one interface, the survival model, provenance.

Segmenter backends::

    segment([(name, image), ...], groups=None) -> [(mask, features), ...]   # image (H, W, 3) or (H, W) uint8
    describe() -> provenance dict (see :func:`model_provenance`)

``InProcessBackend`` runs :class:`brainseg.inference.segmenter.Segmenter` with the model's stored inference
settings (the code path of ``brainseg predict`` and the served model, so the masks are the same);
``RestBackend`` posts the slices to a ``mlflow models serve`` endpoint of the same model.
``groups`` (a patient id per slice, slices in order) lets the stored 3-D post-processing see a
patient's whole volume, as predict does. Both raise :class:`SegmentError`. A scanner volume
(:mod:`brainseg.app.volumes`) goes through ``segment_volume(scans, files) -> (slices, masks)``: in
process, :func:`brainseg.inference.volume.segment_scans` (``brainseg predict --flair``'s path); over
REST, the NIfTI files in the served model's ``volume`` columns, the mask read back from its answer. ``limits``: what one
call may hold (None: no limit; the REST backend: the server's
:class:`brainseg.serving.limits.RequestLimits`, which cover a whole real patient by default).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.app.provenance import card_fields, empty_provenance, model_provenance
from brainseg.data import imageio
from brainseg.data.scan import BadScan
from brainseg.data.volumes import read_scan, rgb_slices
from brainseg.inference.volume import ScanRefused, check_channels, segment_scans
from brainseg.outcome.client import load, model_inputs
from brainseg.outcome.features import SLICE_FEATURE_COLUMNS, slice_features
from brainseg.serving.limits import RequestLimits


class SegmentError(RuntimeError):
    """A backend could not segment. ``per_item``: the input was refused (retry slices one by one);
    otherwise the backend itself failed (no point retrying)."""

    def __init__(self, message: str, per_item: bool = True):
        super().__init__(message)
        self.per_item = per_item


# ------------------------------------------------------------------------------ segmenters
def _check_channels(name: str, image: np.ndarray, channels: str) -> np.ndarray:
    try:
        imageio.check_model_channels(image, name, channels)
    except imageio.BadImage as exc:
        raise SegmentError(str(exc)) from exc
    return imageio.check_image(image, name)


class InProcessBackend:
    """A :class:`brainseg.inference.segmenter.Segmenter` in this process (predict's and serving's code path)."""

    limits = None

    def __init__(self, segmenter, provenance: dict):
        self.segmenter, self.provenance = segmenter, provenance

    @classmethod
    def load(cls, model_uri: str) -> InProcessBackend:
        """Load ``model_uri`` (a ``models:/NAME@ALIAS`` loads the version the alias names now)."""
        from brainseg.registry.model_registry import load_segmenter

        provenance = model_provenance(model_uri)
        segmenter = load_segmenter(provenance["resolved_uri"])
        if provenance.get("size") is None:
            provenance["size"] = int(segmenter.cfg.size)
        return cls(segmenter, provenance)

    def describe(self) -> dict:
        return dict(self.provenance)

    def segment(self, items: list[tuple[str, np.ndarray]], groups: list[str] | None = None
                ) -> list[tuple[np.ndarray, dict]]:
        images = [_check_channels(name, image, self.segmenter.cfg.channels) for name, image in items]
        try:
            masks = self.segmenter.segment(images, groups=groups).masks
        except Exception as exc:
            raise SegmentError(f"the model failed ({type(exc).__name__}: {exc})") from exc
        return [(mask, slice_features(mask, image)) for mask, image in zip(masks, images)]

    def segment_volume(self, scans, files=None) -> tuple[list[np.ndarray], np.ndarray]:
        """A patient's volumes (:class:`brainseg.inference.volume.PatientScans`) -> (slices, masks)."""
        try:
            check_channels(self.segmenter.cfg.channels, scans, self.provenance.get("model", "the model"),
                           given=("a pre-contrast T1 volume", "a post-contrast T1 volume"))
            return segment_scans(lambda images, groups: self.segmenter.segment(images, groups=groups).masks, scans)
        except ScanRefused as exc:
            raise SegmentError(str(exc)) from exc


class RestBackend:
    """A served model (``mlflow models serve``): POST base64 PNG slices to its /invocations.

    ``limits``: the server's request limits (default: the ``BRAINSEG_SERVE_*`` variables of this
    process, else the server's defaults); the page sends no more rows or pixels per request.
    """

    def __init__(self, endpoint: str, timeout: float = 120.0, limits: RequestLimits | None = None):
        base = endpoint.rstrip("/")
        self.url = base if base.endswith("/invocations") else base + "/invocations"
        self.timeout = timeout
        self.limits = limits or RequestLimits.from_env()
        self.provenance = empty_provenance(self.url)

    def describe(self) -> dict:
        return dict(self.provenance)

    def _post(self, payload: dict) -> dict:
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            try:
                message = json.loads(body).get("message", body)
            except ValueError:
                message = body
            raise SegmentError(f"endpoint refused the request (HTTP {exc.code}): {message[:500]}",
                               per_item=400 <= exc.code < 500) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SegmentError(f"endpoint {self.url} cannot be reached ({reason})",
                               per_item=False) from exc

    def segment(self, items: list[tuple[str, np.ndarray]], groups: list[str] | None = None
                ) -> list[tuple[np.ndarray, dict]]:
        columns = ["image"] + (["patient"] if groups is not None else [])
        cells = [[base64.b64encode(imageio.encode_png(image)).decode("ascii")]
                 + ([str(groups[i])] if groups is not None else []) for i, (_, image) in enumerate(items)]
        body = self._post({"dataframe_split": {"columns": columns, "data": cells},
                           "params": {"return_mask": True}})
        rows = body.get("predictions") if isinstance(body, dict) else None
        if not isinstance(rows, list) or len(rows) != len(items):
            raise SegmentError(f"endpoint answered {type(rows).__name__} instead of "
                               f"{len(items)} predictions", per_item=False)
        out = []
        for (name, _), row in zip(items, rows):
            source = f"{name} (mask from the endpoint)"
            try:
                png = base64.b64decode(row["mask_png"])
                mask = imageio.check_mask(imageio.decode_bytes(png, source), source)
            except (KeyError, TypeError, ValueError) as exc:
                raise SegmentError(f"{source}: unusable ({exc})", per_item=False) from exc
            out.append((mask, {k: _nan_if_none(row.get(k)) for k in SLICE_FEATURE_COLUMNS}))
        self._note_model(rows)
        return out

    def _note_model(self, rows: list) -> None:
        run_id = rows[0].get("model_run_id", "") if rows else ""
        if run_id and run_id != self.provenance["run_id"]:
            self.provenance.update(run_id=run_id, data_version=rows[0].get("data_version", ""),
                                   **registered_version(run_id))

    def segment_volume(self, scans, files: dict) -> tuple[list[np.ndarray], np.ndarray]:
        """POST the uploaded NIfTI files (``files``: sequence -> (name, bytes)) as one ``volume`` row;
        the answer's mask (in the FLAIR's geometry) is read back into the model's orientation."""
        columns = {"flair": "volume", "pre": "pre_volume", "post": "post_volume"}
        names = [columns[k] for k in files]
        cells = [base64.b64encode(data).decode("ascii") for _, data in files.values()]
        body = self._post({"dataframe_split": {"columns": names + ["patient"], "data": [cells + [scans.name]]},
                           "params": {"return_mask": True}})
        rows = body.get("predictions") if isinstance(body, dict) else None
        if not isinstance(rows, list) or len(rows) != 1 or not isinstance(rows[0], dict):
            raise SegmentError(f"endpoint answered {type(rows).__name__} instead of one volume row", per_item=False)
        with tempfile.TemporaryDirectory(prefix="brainseg-mask-") as tmp:
            path = Path(tmp) / "mask.nii.gz"
            try:
                path.write_bytes(base64.b64decode(rows[0]["mask_nifti"], validate=True))
                mask = read_scan(path)
            except (KeyError, TypeError, binascii.Error, BadScan) as exc:
                raise SegmentError(f"the endpoint's mask is unusable ({exc})", per_item=False) from exc
        if mask.array.shape != scans.flair.array.shape:
            raise SegmentError(f"the endpoint's mask is {mask.array.shape}, the volume {scans.flair.array.shape}",
                               per_item=False)
        self._note_model(rows)
        return rgb_slices(scans.flair, scans.pre, scans.post), mask.array > 0


def registered_version(run_id: str) -> dict:
    """``version`` (registry versions logged from ``run_id``) and their model card's fields, when
    a tracking URI is configured (else nothing: no default ./mlflow.db is created just to look)."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return {}
    try:
        from brainseg.registry import model_registry

        versions = model_registry.versions_of_run(run_id)
    except Exception:  # noqa: BLE001 - best effort: the version is extra information
        return {}
    if not versions:
        return {}
    latest = max(versions, key=lambda v: int(v.version))
    return {"version": ", ".join(f"{v.name} v{v.version}" for v in versions), "card": latest.description or "",
            **card_fields(latest.tags)}


def _nan_if_none(value):
    return math.nan if value is None else value


def make_segmenter(settings):
    """The REST backend when ``settings.endpoint`` is set, else the model loaded in-process."""
    if settings.endpoint:
        return RestBackend(settings.endpoint)
    return InProcessBackend.load(settings.model_uri)


# --------------------------------------------------------------------------------- survival
EVIDENCE = ("status", "message", "cv_roc_auc", "cv_n_patients", "data_version", "fitted_on", "features_from")


class SurvivalBackend:
    """The survival pyfunc model: per-patient features (+ data.csv) -> P(death01 = 1) with its evidence."""

    def __init__(self, model, provenance: dict):
        self.model, self.provenance = model, provenance  # model: a loaded mlflow pyfunc model

    @classmethod
    def load(cls, model_uri: str) -> SurvivalBackend:
        provenance = model_provenance(model_uri)
        return cls(load(provenance["resolved_uri"]), provenance)

    def describe(self) -> dict:
        return dict(self.provenance)

    def probabilities(self, patients: pd.DataFrame, clinical: bytes | None) -> pd.DataFrame:
        """``patient``, ``death01_probability`` and the model's evidence columns (:data:`EVIDENCE`)
        where it answers them. data.csv values are joined when given, else the model's imputer fills them."""
        with tempfile.TemporaryDirectory() as tmp:
            csv = None
            if clinical is not None:
                csv = Path(tmp) / "data.csv"
                csv.write_bytes(clinical)
            X = model_inputs(self.model, patients, csv)
        out = pd.DataFrame(self.model.predict(X), index=X.index).rename_axis("patient").reset_index()
        return out[["patient", "death01_probability"] + [c for c in EVIDENCE if c in out.columns]]


def survival_context(answer: dict) -> tuple[str, str]:
    """(``show`` | ``refuse``, text) for one patient's survival answer.

    A probability is shown only with its evidence (status ``ok``, cross-validated ROC-AUC and the
    patients behind it, data version, real or synthetic); otherwise the text says why not.
    """
    status = answer.get("status")
    if status is not None and status != "ok":
        return "refuse", f"No probability: {answer.get('message') or status}."
    prob = answer.get("death01_probability")
    if prob is None or (isinstance(prob, float) and math.isnan(prob)):
        return "refuse", "No probability: the model gave none for this patient."
    auc, n, kind = answer.get("cv_roc_auc"), answer.get("cv_n_patients"), answer.get("fitted_on")
    if auc is None or n is None or kind not in ("real", "synthetic"):
        return "refuse", ("No probability shown: this survival model does not report its cross-validated "
                          "ROC-AUC, patient count and training data (re-fit it with `brainseg survival`).")
    data = f"data version {str(answer.get('data_version') or 'unknown')[:12]}"
    text = (f"Cross-validated ROC-AUC {float(auc):.2f} over {int(n)} patients ({kind} {data}; "
            f"0.5 = chance); imaging features from {answer.get('features_from') or '?'} masks.")
    if kind == "synthetic":
        text = ("Fitted on SYNTHETIC data: this probability says nothing about a real patient. " + text)
    return "show", text
