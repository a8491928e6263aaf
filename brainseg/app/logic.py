"""What the web page does, as plain functions: parse uploads, segment, tabulate, summarise.

Nothing here imports Streamlit. Two segmenter backends share one interface::

    segment([(name, image), ...]) -> [(mask, features), ...]   # image (H, W, 3) or (H, W) uint8
    describe() -> {"model", "version", "run_id", "data_version"}

``InProcessBackend`` loads a model (``models:/...``, ``runs:/...`` or a folder) and runs the
function ``brainseg predict`` and the served model run; ``RestBackend`` posts the slices to a
``mlflow models serve`` endpoint of the same model. Both raise :class:`SegmentError`.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

import brainseg.keras_env  # noqa: F401  (Keras variables before anything touches TensorFlow)
from brainseg.data import imageio
from brainseg.data.layout import SLICE_RE, parse_folder
from brainseg.data.synth import synth_patient
from brainseg.features import SLICE_FEATURE_COLUMNS, patient_features_from_masks, slice_features
from brainseg.metrics import confusion, dice_from_counts

DEFAULT_MODEL = "models:/brainseg-segmenter@champion"
DEFAULT_SURVIVAL = "models:/brainseg-survival@champion"
ENV_MODEL = "BRAINSEG_APP_MODEL"
ENV_SURVIVAL = "BRAINSEG_APP_SURVIVAL_MODEL"  # empty: no survival model
ENV_ENDPOINT = "BRAINSEG_APP_ENDPOINT"        # empty: segment in-process

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
UPLOAD_TYPES = ["tif", "tiff", "png", "zip", "csv"]  # what the file picker offers
MIN_SIDE = 32                   # smaller images are refused: the network needs at least 32x32
MAX_ZIP_MEMBERS = 5000          # a patient folder has at most ~200 files (slices and masks)
MAX_ZIP_BYTES = 1 << 30         # uncompressed total; refuses zip bombs before reading
SURVIVAL_DISCLAIMER = ("Research model, not a diagnosis: the probability of death (death01) comes "
                       "from a model fitted on a small public research cohort (TCGA-LGG) and "
                       "must not be used for clinical decisions.")


# ------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class AppSettings:
    """What ``brainseg app`` hands the page (through environment variables)."""

    model_uri: str = DEFAULT_MODEL
    survival_uri: str | None = DEFAULT_SURVIVAL
    endpoint: str | None = None

    @classmethod
    def from_env(cls, env=None) -> AppSettings:
        env = os.environ if env is None else env
        return cls(model_uri=env.get(ENV_MODEL) or DEFAULT_MODEL,
                   survival_uri=env.get(ENV_SURVIVAL, DEFAULT_SURVIVAL) or None,
                   endpoint=env.get(ENV_ENDPOINT) or None)

    def to_env(self) -> dict[str, str]:
        return {ENV_MODEL: self.model_uri, ENV_SURVIVAL: self.survival_uri or "",
                ENV_ENDPOINT: self.endpoint or ""}


# ------------------------------------------------------------------------------------- uploads
@dataclasses.dataclass
class SliceInput:
    """One slice ready to segment."""

    name: str                       # file name as uploaded, or "<archive>.zip/<member path>"
    patient: str
    patient_dir: str
    slice: int
    image: np.ndarray               # (H, W, 3) uint8 (a 1-channel file is repeated)
    gray: bool = False              # the file had one channel (taken as FLAIR)
    truth: np.ndarray | None = None  # (H, W) bool, from a paired ``*_mask`` file

    def model_input(self) -> np.ndarray:
        """What a backend gets: (H, W, 3), or (H, W) for a 1-channel file (the model decides)."""
        return self.image[:, :, 0] if self.gray else self.image


@dataclasses.dataclass
class Upload:
    slices: list[SliceInput]
    problems: list[str]             # one line per refused file: "<name>: <problem>"
    clinical: bytes | None = None   # a data.csv, uploaded or found in a zip
    clinical_name: str = ""


def identify(name: str) -> tuple[str, str, int]:
    """(patient, patient folder, slice number) from an uploaded name, using the public naming
    (``<folder>/<folder>_<n>.tif``); otherwise the folder (or file stem) stands for the patient.

    >>> identify("TCGA_CS_4941_19960909_12.tif")
    ('TCGA_CS_4941', 'TCGA_CS_4941_19960909', 12)
    >>> identify("scan.zip/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_3.tif")[::2]
    ('TCGA_CS_4941', 3)
    """
    path = PurePosixPath(name)
    m = SLICE_RE.match(re.sub(r"\.png$", ".tif", path.name, flags=re.IGNORECASE))
    number = int(m["n"]) if m else 0
    stem = m["stem"] if m else path.stem
    for folder in (path.parent.name, stem):  # a patient folder, else a file named after one
        meta = parse_folder(folder)
        if meta:
            return meta["patient"], folder, number
    folder = path.parent.name or stem
    return folder, folder, number


def decode_slice(name: str, data: bytes) -> tuple[np.ndarray, bool]:
    """Bytes -> ((H, W, 3) uint8, was 1-channel), or :class:`imageio.BadImage` saying why."""
    arr = imageio.decode_bytes(data, name)
    gray = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1)
    image = imageio.check_image(arr, name)
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise imageio.BadImage(name, f"image is {w}x{h} pixels; slices must be at least "
                                     f"{MIN_SIDE}x{MIN_SIDE}")
    return image, gray


def _zip_members(name: str, data: bytes) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Files inside an uploaded zip as ("<zip>/<member>", bytes), and problems."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        return [], [f"{name}: not a readable zip archive ({exc})"]
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir() and not _is_junk(i.filename)]
        if not infos:
            return [], [f"{name}: the zip archive is empty"]
        if len(infos) > MAX_ZIP_MEMBERS:
            return [], [f"{name}: {len(infos)} files in the archive; at most {MAX_ZIP_MEMBERS}"]
        total = sum(i.file_size for i in infos)
        if total > MAX_ZIP_BYTES:
            mib = f"{total / 2**20:.0f} MiB; at most {MAX_ZIP_BYTES / 2**20:.0f} MiB"
            return [], [f"{name}: unpacks to {mib}"]
        members, problems = [], []
        for info in infos:
            try:
                members.append((f"{name}/{info.filename}", zf.read(info)))
            except Exception as exc:  # noqa: BLE001 - zipfile raises many types for damaged members
                problems.append(f"{name}/{info.filename}: cannot be unpacked ({exc})")
        return members, problems


def _is_junk(member: str) -> bool:
    """macOS resource forks and hidden files that zip tools add."""
    return member.startswith("__MACOSX/") or PurePosixPath(member).name.startswith(".")


def _is_mask_name(name: str) -> bool:
    return PurePosixPath(name).stem.lower().endswith("_mask")


def _pair_key(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    stem = path.stem[:-5] if _is_mask_name(name) else path.stem
    return str(path.parent), stem


def parse_uploads(files: Iterable[tuple[str, bytes]]) -> Upload:
    """Uploaded (name, bytes) -> slices with truth masks, data.csv, and a line per refused file.

    Accepts ``.tif``/``.tiff``/``.png`` slices, their ``*_mask`` files (paired by folder and
    stem), ``data.csv``, and ``.zip`` archives of any of these (a patient folder or several).
    Nothing raises: every refused file becomes one line in ``problems``.
    """
    entries, problems = [], []
    for name, data in files:
        if name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
            members, bad = _zip_members(name, data)
            problems += bad
            entries += [(n, d, True) for n, d in members]
            if members and not any(_is_image_name(n) and not _is_mask_name(n) for n, _ in members):
                problems.append(f"{name}: no .tif/.png slices in the archive")
        else:
            entries.append((name, data, False))
    upload = Upload([], problems)
    images, masks = {}, {}
    for name, data, from_zip in entries:
        if name.lower().endswith(".csv"):
            if upload.clinical is None:
                upload.clinical, upload.clinical_name = data, name
            continue
        if from_zip and not _is_image_name(name):
            continue  # notes, thumbnails and the like inside an archive
        (masks if _is_mask_name(name) else images)[_pair_key(name)] = (name, data)
    for key, (name, data) in images.items():
        try:
            image, gray = decode_slice(name, data)
        except imageio.BadImage as exc:
            upload.problems.append(str(exc))
            continue
        patient, patient_dir, number = identify(name)
        upload.slices.append(SliceInput(name, patient, patient_dir, number, image, gray,
                                        _truth_for(masks.pop(key, None), image, upload.problems)))
    upload.problems += [f"{name}: mask without its slice ({key[1]}.tif or .png)"
                        for key, (name, _) in masks.items()]
    upload.slices.sort(key=lambda s: (s.patient, s.slice, s.name))
    return upload


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _truth_for(mask_file: tuple[str, bytes] | None, image: np.ndarray, problems: list[str]):
    if mask_file is None:
        return None
    name, data = mask_file
    try:
        mask = imageio.check_mask(imageio.decode_bytes(data, name), name)
    except imageio.BadImage as exc:
        problems.append(f"{exc} (slice kept without truth)")
        return None
    if mask.shape != image.shape[:2]:
        problems.append(f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} but its slice is "
                        f"{image.shape[1]}x{image.shape[0]} (slice kept without truth)")
        return None
    return mask


# ------------------------------------------------------------------------------------ examples
EXAMPLE_SIZE = 128
EXAMPLES = {  # title -> (seed, slices); generated on the fly by the synthetic-data generator
    "Synthetic patient A (16 slices, truth masks)": (11, 16),
    "Synthetic patient B (16 slices, truth masks)": (12, 16),
    "Synthetic single slice (truth mask)": (13, 1),
}


def example_upload(title: str) -> Upload:
    """A bundled synthetic example as if uploaded: slices with truth masks, no data.csv."""
    seed, n = EXAMPLES[title]
    images, masks = synth_patient(np.random.default_rng(seed), max(n, 8), EXAMPLE_SIZE)
    keep = range(len(images)) if n > 1 else [int(np.argmax((masks > 0).sum(axis=(1, 2))))]
    patient = f"SYNTH_{'ABCDEFGH'[list(EXAMPLES).index(title)]}"
    slices = [SliceInput(f"{patient}/{patient}_{k + 1}.tif", patient, patient, k + 1, images[k],
                         truth=masks[k] > 0) for k in keep]
    return Upload(slices, [])


# ----------------------------------------------------------------------------------- backends
class SegmentError(RuntimeError):
    """A backend could not segment. ``per_item``: the input was refused (retry slices one by one);
    otherwise the backend itself failed (no point retrying)."""

    def __init__(self, message: str, per_item: bool = True):
        super().__init__(message)
        self.per_item = per_item


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)/")


def model_provenance(uri: str) -> dict:
    """Which model ``uri`` is: registry version, run and the data version it was trained on.

    A ``models:/NAME@ALIAS`` is resolved to its version now, and ``resolved_uri`` names that
    exact version (load it, so what is shown is what runs). Lookup failures leave fields empty.
    """
    out = {"model": uri, "version": "", "run_id": "", "data_version": "", "resolved_uri": uri}
    path = Path(uri)
    if path.exists():
        meta = _local_meta(path)
        out.update(version="local file", run_id=meta.get("run_id", ""),
                   data_version=meta.get("data_version", ""))
        return out
    try:
        import mlflow

        client = mlflow.MlflowClient()
        if m := _MODELS_URI.match(uri):
            mv = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
                  else client.get_model_version(m["name"], m["version"]))
            out.update(version=str(mv.version), run_id=mv.run_id or "",
                       data_version=mv.tags.get("data_version", ""),
                       resolved_uri=f"models:/{m['name']}/{mv.version}")
        elif m := _RUNS_URI.match(uri):
            run = client.get_run(m["run"])
            out.update(run_id=m["run"], data_version=run.data.tags.get("data_version", ""))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for unknown names
        out["note"] = f"registry lookup failed ({exc})"
    return out


def _local_meta(path: Path) -> dict:
    """The ``meta`` (run_id, data_version) of the brainseg.json in or beside a model folder/.h5."""
    name = "brainseg.json"
    found = sorted(path.rglob(name)) if path.is_dir() else [path.with_name(name)]
    if not found or not found[0].is_file():
        return {}
    return json.loads(found[0].read_text()).get("meta", {})


class InProcessBackend:
    """The model loaded into this process; the same code path as ``brainseg predict``."""

    def __init__(self, model, cfg, provenance: dict):
        self.model, self.cfg, self.provenance = model, cfg, provenance

    @classmethod
    def load(cls, model_uri: str) -> InProcessBackend:
        """Load ``model_uri`` (a ``models:/NAME@ALIAS`` loads the version the alias names now)."""
        from brainseg.serving import load_segmenter

        provenance = model_provenance(model_uri)
        return cls(*load_segmenter(provenance["resolved_uri"]), provenance)

    def describe(self) -> dict:
        return dict(self.provenance)

    def segment(self, items: list[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, dict]]:
        from brainseg.evaluate import EvalSettings, segment_images

        images = []
        for name, image in items:
            if image.ndim == 2 and self.cfg.channels != "flair":
                raise SegmentError(f"{name}: 1-channel image, but this model needs 3 channels "
                                   "(pre-contrast, FLAIR, post-contrast)")
            images.append(imageio.check_image(image, name))
        try:
            masks, _ = segment_images(self.model, self.cfg, images,
                                      EvalSettings(threshold=self.cfg.threshold))
        except Exception as exc:
            raise SegmentError(f"the model failed ({type(exc).__name__}: {exc})") from exc
        return [(mask, slice_features(mask, image)) for mask, image in zip(masks, images)]


class RestBackend:
    """A served model (``mlflow models serve``): POST base64 PNG slices to its /invocations."""

    def __init__(self, endpoint: str, timeout: float = 120.0):
        base = endpoint.rstrip("/")
        self.url = base if base.endswith("/invocations") else base + "/invocations"
        self.timeout = timeout
        self.provenance = {"model": self.url, "version": "", "run_id": "", "data_version": ""}

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
            raise SegmentError(f"endpoint refused the slice (HTTP {exc.code}): {message[:500]}",
                               per_item=400 <= exc.code < 500) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SegmentError(f"endpoint {self.url} cannot be reached ({reason})",
                               per_item=False) from exc

    def segment(self, items: list[tuple[str, np.ndarray]]) -> list[tuple[np.ndarray, dict]]:
        cells = [[base64.b64encode(imageio.encode_png(image)).decode("ascii")]
                 for _, image in items]
        body = self._post({"dataframe_split": {"columns": ["image"], "data": cells},
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
            except (KeyError, ValueError) as exc:
                raise SegmentError(f"{source}: unusable ({exc})", per_item=False) from exc
            features = {k: _nan_if_none(row.get(k)) for k in SLICE_FEATURE_COLUMNS}
            out.append((mask, features))
        run_id = rows[0].get("model_run_id", "") if rows else ""
        if run_id and run_id != self.provenance["run_id"]:
            self.provenance.update(run_id=run_id, data_version=rows[0].get("data_version", ""),
                                   version=registered_version(run_id))
        return out


def registered_version(run_id: str) -> str:
    """Registry versions logged from ``run_id`` when a tracking URI is configured (else "")."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return ""  # do not create a default ./mlflow.db just to look
    try:
        import mlflow

        versions = mlflow.MlflowClient().search_model_versions(f"run_id='{run_id}'")
    except Exception:  # noqa: BLE001 - best effort: the version is extra information
        return ""
    return ", ".join(f"{v.name} v{v.version}" for v in versions)


def _nan_if_none(value):
    return math.nan if value is None else value


def make_segmenter(settings: AppSettings):
    """The REST backend when an endpoint is set, else the model loaded in-process."""
    if settings.endpoint:
        return RestBackend(settings.endpoint)
    return InProcessBackend.load(settings.model_uri)


class SurvivalBackend:
    """The survival pyfunc model: per-patient features (+ data.csv) -> P(death01 = 1)."""

    def __init__(self, model, provenance: dict):
        self.model, self.provenance = model, provenance  # model: a loaded mlflow pyfunc model

    @classmethod
    def load(cls, model_uri: str) -> SurvivalBackend:
        import mlflow

        provenance = model_provenance(model_uri)
        return cls(mlflow.pyfunc.load_model(provenance["resolved_uri"]), provenance)

    def describe(self) -> dict:
        return dict(self.provenance)

    def probabilities(self, patients: pd.DataFrame, clinical: bytes | None) -> pd.DataFrame:
        """``patient``, ``death01_probability``. data.csv values are joined when given, else
        the model's imputer fills them."""
        from brainseg.survival_serving import model_inputs

        with tempfile.TemporaryDirectory() as tmp:
            csv = None
            if clinical is not None:
                csv = Path(tmp) / "data.csv"
                csv.write_bytes(clinical)
            X = model_inputs(self.model, patients, csv)
        out = pd.DataFrame(self.model.predict(X), index=X.index)
        return out.rename_axis("patient").reset_index()[["patient", "death01_probability"]]


def provenance_line(d: dict) -> str:
    """One line naming the model version and the data version behind a result."""
    if not (d.get("version") or d.get("run_id") or d.get("data_version")):
        return f"{d.get('model', '?')} (version and data version not known yet)"
    version = f"version {d['version']}" if d.get("version") else "version unknown"
    run = f", run {d['run_id'][:12]}" if d.get("run_id") else ""
    data = d.get("data_version") or "unknown"
    return f"{d.get('model', '?')} ({version}{run}); trained on data version {data[:12]}"


# ----------------------------------------------------------------------------------- analysis
@dataclasses.dataclass
class SliceResult:
    item: SliceInput
    mask: np.ndarray   # (H, W) bool, predicted
    features: dict     # keyed as SLICE_FEATURE_COLUMNS

    @property
    def dice(self) -> float:
        """Dice of prediction vs truth; NaN without a truth mask or when both are empty."""
        if self.item.truth is None:
            return math.nan
        return dice_from_counts(*confusion(self.mask, self.item.truth))


def _segment(backend, chunk: list[SliceInput]) -> list[tuple[np.ndarray, dict]]:
    outputs = backend.segment([(s.name, s.model_input()) for s in chunk])
    if len(outputs) != len(chunk):
        raise SegmentError(f"segmenter returned {len(outputs)} results for {len(chunk)} slices",
                           per_item=False)
    for s, (mask, _) in zip(chunk, outputs):
        if mask.shape != s.image.shape[:2]:
            raise SegmentError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the slice is "
                               f"{s.image.shape[1]}x{s.image.shape[0]}")
    return outputs


def analyse(slices: list[SliceInput], backend, batch: int = 16,
            progress: Callable[[int, int], None] | None = None
            ) -> tuple[list[SliceResult], list[str]]:
    """Segment ``slices`` in batches. A refused batch is retried slice by slice, so one bad
    slice costs only itself; a failing backend stops with one problem line."""
    results, problems = [], []
    for start in range(0, len(slices), batch):
        chunk = slices[start:start + batch]
        try:
            outputs = _segment(backend, chunk)
        except SegmentError as exc:
            if not exc.per_item:
                return results, problems + [f"segmenter: {exc}"]
            outputs = []
            for s in chunk:
                try:
                    outputs += _segment(backend, [s])
                except SegmentError as one:
                    outputs.append(None)
                    problems.append(f"{s.name}: {one}")
        results += [SliceResult(s, *out) for s, out in zip(chunk, outputs) if out is not None]
        if progress:
            progress(min(start + batch, len(slices)), len(slices))
    return results, problems


def slice_table(results: list[SliceResult]) -> pd.DataFrame:
    """One row per slice: file, patient, slice, the features, and truth area / Dice where known."""
    with_truth = any(r.item.truth is not None for r in results)
    rows = []
    for r in results:
        row = {"file": r.item.name, "patient": r.item.patient, "slice": r.item.slice, **r.features}
        if with_truth:
            row["truth_area_px"] = int(r.item.truth.sum()) if r.item.truth is not None else math.nan
            row["dice_vs_truth"] = r.dice
        rows.append(row)
    columns = ["file", "patient", "slice"] + SLICE_FEATURE_COLUMNS
    if with_truth:
        columns += ["truth_area_px", "dice_vs_truth"]
    return pd.DataFrame(rows, columns=columns)


def by_patient(results: list[SliceResult]) -> dict[str, list[SliceResult]]:
    """Results grouped by patient (in slice order, as parsed)."""
    groups: dict[str, list[SliceResult]] = {}
    for r in results:
        groups.setdefault(r.item.patient, []).append(r)
    return groups


def patient_table(results: list[SliceResult]) -> tuple[pd.DataFrame, list[str]]:
    """Per patient: slices, volume features of the predicted masks, and the volume Dice against
    the truth when every slice has one. Patients whose slices differ in size or repeat a slice
    number get a problem line instead of volume features."""
    rows, problems = [], []
    for patient, group in by_patient(results).items():
        numbers = [r.item.slice for r in group]
        shapes = sorted({r.mask.shape for r in group})
        if len(shapes) > 1:
            problems.append(f"patient {patient}: slices of different sizes {shapes}; "
                            "no volume features")
            continue
        if len(set(numbers)) < len(numbers):
            problems.append(f"patient {patient}: slice numbers repeat (name slices "
                            "<folder>_<n>.tif); no volume features")
            continue
        row = {"slices": len(group),
               **patient_features_from_masks(patient, numbers, [r.mask for r in group])}
        if all(r.item.truth is not None for r in group):
            tp, fp, fn = np.sum([confusion(r.mask, r.item.truth) for r in group], axis=0)
            row["truth_volume_px"] = int(tp + fn)
            row["volume_dice"] = dice_from_counts(tp, fp, fn)
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table[["patient"] + [c for c in table.columns if c != "patient"]]
    return table, problems


def area_by_slice(group: list[SliceResult]) -> pd.DataFrame:
    """Tumor area (pixels) per slice number: ``predicted`` and, where known, ``truth``."""
    frame = pd.DataFrame({"slice": [r.item.slice for r in group],
                          "predicted": [int(r.mask.sum()) for r in group]})
    if all(r.item.truth is not None for r in group):
        frame["truth"] = [int(r.item.truth.sum()) for r in group]
    return frame.set_index("slice")


def with_provenance(table: pd.DataFrame, provenance: dict) -> pd.DataFrame:
    """``table`` plus the columns saying which model and data version produced it."""
    return table.assign(model=provenance.get("model", ""),
                        model_version=provenance.get("version", ""),
                        model_run_id=provenance.get("run_id", ""),
                        data_version=provenance.get("data_version", ""))


def default_slice(group: list[SliceResult]) -> int:
    """Index of the slice to show first: the largest predicted tumor, else the largest true one,
    else the middle slice."""
    for areas in ([int(r.mask.sum()) for r in group],
                  [int(r.item.truth.sum()) if r.item.truth is not None else 0 for r in group]):
        if any(areas):
            return int(np.argmax(areas))
    return len(group) // 2


def slice_views(r: SliceResult) -> list[tuple[str, np.ndarray]]:
    """(caption, picture) to show for a slice: FLAIR, predicted overlay, truth overlay if known."""
    from brainseg.plots import overlay

    views = [(f"{r.item.name}: FLAIR", r.item.image[:, :, 1]),
             (f"predicted tumor (red): {int(r.mask.sum())} px", overlay(r.item.image, r.mask))]
    if r.item.truth is not None:
        dice = "n/a (both empty)" if math.isnan(r.dice) else f"{r.dice:.3f}"
        views.append((f"truth (green): {int(r.item.truth.sum())} px, Dice {dice}",
                      overlay(r.item.image, r.item.truth, (0, 255, 0))))
    return views


def csv_bytes(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False).encode()


def masks_zip(results: list[SliceResult]) -> bytes:
    """The predicted masks as ``<patient folder>/<stem>_pred.png`` (0/255) in a zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for r in results:
            stem = PurePosixPath(r.item.name).stem
            zf.writestr(f"{r.item.patient_dir}/{stem}_pred.png",
                        imageio.encode_png(r.mask.astype(np.uint8) * 255))
    return buf.getvalue()
