"""Slice -> mask: the one inference path of evaluate, predict, the served model and the page.

Everything between a decoded slice and a final mask lives here: preprocessing (the data layer's
functions), the forward pass (float32 or bfloat16), flip test-time augmentation, the threshold
and post-processing (small components, largest component per slice, largest 3-D component per
patient volume). The settings are saved with the model (``brainseg.json``) and loaded with it, so
every consumer applies exactly what was evaluated.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401  (Keras variables before TensorFlow)

import dataclasses
import json
import platform
import typing
import weakref
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras
from pydantic import BaseModel, ConfigDict, ValidationError
from skimage import measure, morphology

from brainseg.data.preprocess import Box, prepare_image, probability_to_original, slice_box
from brainseg.settings.config import BatchSize, Confidence, MinComponentPx, Precision, Threshold, Train
from brainseg.settings.settings_io import ConfigError, one_line

MODEL_FILE = "model.h5"
SETTINGS_FILE = "brainseg.json"
PRECISIONS = typing.get_args(Precision)  # ("auto", "float32", "bfloat16")


class InferenceSettings(BaseModel):
    """How probabilities become the final mask; stored with the model. Frozen; each field's type and
    range is declared once in :mod:`brainseg.settings.config` (the ``evaluate`` section uses the same),
    and a wrong value is a :class:`ConfigError` naming the field.

    ``min_component_px`` drops 2-D components (8-connected) under that many pixels at the
    original slice size; ``keep_largest`` keeps the largest 2-D component per slice;
    ``component_confidence`` (> 0) keeps only the 3-D components (26-connected) of a patient's
    volume whose peak probability reaches it, when the slices of a patient are segmented together:
    a small confident tumor survives beside a large doubtful false positive. ``largest_3d`` (the
    largest 3-D component only, Buda et al. 2019) is read for models saved with it and no longer
    chosen: it dropped a small true tumor for a larger false positive. ``precision`` ``auto``
    runs bfloat16 where the CPU has native bfloat16 (AVX512-BF16 or AMX), else float32.

    >>> InferenceSettings(threshold=0.4).replace(tta=True).to_dict()["tta"]
    True
    >>> try:
    ...     InferenceSettings(threshold=1.5)
    ... except ConfigError as exc:
    ...     print(exc)
    threshold: 1.5 is not a number in (0, 1)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: Threshold = 0.5
    tta: bool = False
    min_component_px: MinComponentPx = 0
    keep_largest: bool = False
    largest_3d: bool = False
    component_confidence: Confidence = 0.0
    precision: Precision = "float32"
    batch_size: BatchSize = 32

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as exc:  # one line naming each wrong field
            raise ConfigError(one_line(type(self), exc)) from None

    @classmethod
    def from_dict(cls, d: dict | None) -> "InferenceSettings":
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.model_fields})

    def to_dict(self) -> dict:
        return self.model_dump()

    def replace(self, **changes) -> "InferenceSettings":
        return type(self)(**{**self.model_dump(), **changes})


# ---------------------------------------------------------------------------- precision
def cpu_has_bf16() -> bool:
    """True when this CPU advertises native bfloat16 arithmetic (Linux /proc/cpuinfo flags)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bfloat16`` on a CPU with native bfloat16 (no GPU visible), else ``float32``."""
    if precision != "auto":
        return precision
    if tf.config.list_physical_devices("GPU"):
        return "float32"
    return "bfloat16" if cpu_has_bf16() else "float32"


def _policy_to(config, policy: str):
    """Set every layer's dtype policy in a Keras model config to ``policy`` (inputs stay float32)."""
    if isinstance(config, dict):
        if config.get("class_name") == "InputLayer":
            return
        for key, value in config.items():
            if key == "dtype" and isinstance(value, str) and value.startswith(("float", "mixed")):
                config[key] = policy
            elif key == "dtype" and isinstance(value, dict) and value.get("class_name") == "Policy":
                value["config"]["name"] = policy
            else:
                _policy_to(value, policy)
    elif isinstance(config, list):
        for value in config:
            _policy_to(value, policy)


def bfloat16_copy(model: keras.Model) -> keras.Model:
    """The same network computing in bfloat16 (``mixed_bfloat16``: float32 weights, bf16 maths)."""
    config = model.get_config()
    _policy_to(config, "mixed_bfloat16")
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


# ---------------------------------------------------------------------------- forward pass
_FORWARD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_forward(model: keras.Model):
    """One traced ``tf.function`` per model (inference mode, float32 output), reused across calls."""
    fn = _FORWARD.get(model)
    if fn is None:
        spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)

        @tf.function(input_signature=[spec], autograph=False)
        def forward(x):
            return tf.cast(model(x, training=False), tf.float32)

        fn = _FORWARD[model] = forward
    return fn


def predict_probs(model: keras.Model, X: np.ndarray, batch_size: int = 32, tta: bool = False) -> np.ndarray:
    """(N, S, S, C) inputs -> (N, S, S) float32 probabilities (mean with the flipped input if ``tta``)."""
    fn = compiled_forward(model)
    out = []
    for i in range(0, len(X), batch_size):
        x = tf.convert_to_tensor(np.asarray(X[i:i + batch_size], np.float32))
        p = fn(x)
        if tta:
            p = (p + fn(x[:, :, ::-1])[:, :, ::-1]) / 2
        out.append(p.numpy()[..., 0])
    return np.concatenate(out) if out else np.zeros((0,) + tuple(X.shape[1:3]), np.float32)


# ---------------------------------------------------------------------------- post-processing
def postprocess_slice(mask: np.ndarray, min_component_px: int = 0, keep_largest: bool = False) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: drop 8-connected components under ``min_component_px``; keep
    only the largest one if ``keep_largest``."""
    mask = np.asarray(mask, bool)
    if min_component_px > 0 and mask.any():
        mask = morphology.remove_small_objects(mask, max_size=int(min_component_px) - 1, connectivity=2)
    if keep_largest and mask.any():
        labels = measure.label(mask, connectivity=2)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return mask


def _labels_3d(masks: list[np.ndarray]) -> np.ndarray | None:
    """26-connected component labels of one volume's (H, W) slices; None when nothing is set."""
    if not masks:
        return None
    volume = np.stack([np.asarray(m, bool) for m in masks])
    return measure.label(volume, connectivity=3) if volume.any() else None


def largest_component_3d(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Slices of one volume in order, (H, W) bool each -> the same with only the largest
    26-connected 3-D component kept (ties: the first found). Empty volumes pass through."""
    labels = _labels_3d(masks)
    if labels is None:
        return [np.asarray(m, bool).copy() for m in masks]
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = labels == int(sizes.argmax())
    return list(keep)


def confident_components_3d(masks: list[np.ndarray], probs: list[np.ndarray], confidence: float) -> list[np.ndarray]:
    """Slices of one volume in order, (H, W) bool masks and their (H, W) probabilities -> the masks
    with only the 26-connected 3-D components whose peak probability is at least ``confidence``.

    Unlike keeping the largest component, the rule looks at each component alone, so a small
    confident tumor is never dropped for a larger false positive.

    >>> m = np.zeros((1, 4, 8), bool); m[0, :, :2] = True; m[0, :2, 5:] = True
    >>> p = np.where(m, 0.6, 0.0).astype(np.float32); p[0, 0, 6] = 0.97   # the small one is confident
    >>> kept = confident_components_3d(list(m), list(p), 0.9)[0]
    >>> int(kept[:, :2].sum()), int(kept[:, 5:].sum())
    (0, 6)
    """
    labels = _labels_3d(masks)
    if labels is None:
        return [np.asarray(m, bool).copy() for m in masks]
    peak = np.zeros(labels.max() + 1, np.float32)
    np.maximum.at(peak, labels.ravel(), np.stack(probs).astype(np.float32).ravel())
    keep = peak >= confidence
    keep[0] = False
    return list(keep[labels])


def _volumes(groups: list, masks: list[np.ndarray]) -> list[list[int]]:
    """Indices of each group's slices (in order), for groups whose slices share one size."""
    by_group: dict = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    return [idx for idx in by_group.values() if len({masks[i].shape for i in idx}) == 1]


def final_masks(probs: np.ndarray, shapes: list[tuple[int, int]], boxes: list[Box], settings: InferenceSettings,
                groups: list | None = None) -> list[np.ndarray]:
    """(N, S, S) probabilities -> N bool masks at each slice's (H, W), thresholded and post-processed.

    ``groups`` (a patient id per slice, slices in volume order within a patient) enables the 3-D
    steps (``component_confidence``, ``largest_3d``); without it each slice is its own volume and
    they are skipped.
    """
    full = [probability_to_original(p, shape, box) for p, shape, box in zip(probs, shapes, boxes, strict=True)]
    masks = [postprocess_slice(f > settings.threshold, settings.min_component_px, settings.keep_largest)
             for f in full]
    if groups is None or not (settings.component_confidence > 0 or settings.largest_3d):
        return masks
    for idx in _volumes(groups, masks):
        vol = [masks[i] for i in idx]
        if settings.component_confidence > 0:
            vol = confident_components_3d(vol, [full[i] for i in idx], settings.component_confidence)
        if settings.largest_3d:
            vol = largest_component_3d(vol)
        for i, m in zip(idx, vol):
            masks[i] = m
    return masks


# ---------------------------------------------------------------------------- the segmenter
@dataclasses.dataclass
class SegmentResult:
    masks: list[np.ndarray]  # (H, W) bool per input slice, at the input's size
    probs: np.ndarray        # (N, S, S) float32 network probabilities (crop space when cropping)
    boxes: list[Box]         # the region of each slice the network saw


class Segmenter:
    """A loaded model with its training and inference settings: slices in, final masks out."""

    def __init__(self, model: keras.Model, cfg: Train, settings: InferenceSettings | None = None):
        self.model, self.cfg = model, cfg
        self.settings = settings or InferenceSettings(threshold=cfg.threshold)
        self.precision = resolve_precision(self.settings.precision)
        self.network = bfloat16_copy(model) if self.precision == "bfloat16" else model

    @classmethod
    def from_dir(cls, model_dir: Path, **overrides) -> "Segmenter":
        model, cfg, settings = load_model_dir(model_dir)
        return cls(model, cfg, settings.replace(**overrides) if overrides else settings)

    def with_settings(self, **changes) -> "Segmenter":
        """The same network under other settings (precision changes rebuild the network)."""
        return Segmenter(self.model, self.cfg, self.settings.replace(**changes))

    def prepare(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[Box]]:
        """(H, W, 3) uint8 slices -> ((N, S, S, C) float32 inputs, boxes).

        Inputs pass through float16, as the training/evaluation cache stores them, so a served
        slice and an evaluated slice give the network the same numbers.
        """
        prep = self.cfg.prep
        boxes = [slice_box(im, prep) for im in images]
        if not images:
            return np.zeros((0, prep.size, prep.size, prep.n_channels), np.float32), boxes
        X = np.stack([prepare_image(im, prep, box).astype(np.float16) for im, box in zip(images, boxes)])
        return X.astype(np.float32), boxes

    def probs(self, X: np.ndarray) -> np.ndarray:
        """(N, S, S, C) prepared inputs -> (N, S, S) float32 probabilities (TTA per settings)."""
        return predict_probs(self.network, X, self.settings.batch_size, self.settings.tta)

    def warm_up(self) -> None:
        """Trace the forward pass once, so the first request does not pay for it."""
        self.probs(np.zeros((1, self.cfg.size, self.cfg.size, self.cfg.prep.n_channels), np.float32))

    def segment(self, images: list[np.ndarray], groups: list | None = None) -> SegmentResult:
        """(H, W, 3) uint8 slices -> final masks; ``groups`` = patient per slice (in slice order)."""
        X, boxes = self.prepare(images)
        probs = self.probs(X)
        masks = final_masks(probs, [im.shape[:2] for im in images], boxes, self.settings, groups)
        return SegmentResult(masks, probs, boxes)


# ---------------------------------------------------------------------------- save / load
def save_model(model: keras.Model, cfg: Train, settings: InferenceSettings, out_dir: Path,
               meta: dict | None = None) -> Path:
    """Write ``model.h5`` (no optimizer state) and ``brainseg.json`` (train + inference settings)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / MODEL_FILE, include_optimizer=False, save_format="h5")
    doc = {"train": cfg.to_dict(), "inference": settings.to_dict(), **({"meta": meta} if meta else {})}
    (out_dir / SETTINGS_FILE).write_text(json.dumps(doc, indent=2))
    return out_dir


def read_settings(path: Path) -> tuple[Train, InferenceSettings, dict]:
    """``brainseg.json`` -> (Train, InferenceSettings, meta). A file from before inference
    settings were stored gets the threshold-only settings it was served with."""
    doc = json.loads(Path(path).read_text())
    cfg = Train.from_dict(doc["train"])
    settings = InferenceSettings.from_dict(doc.get("inference") or {"threshold": cfg.threshold})
    return cfg, settings, doc.get("meta", {})


def load_model_dir(model_dir: Path) -> tuple[keras.Model, Train, InferenceSettings]:
    """Load a folder holding ``model.h5`` and ``brainseg.json`` (searched recursively)."""
    model_dir = Path(model_dir)
    h5 = model_dir if model_dir.suffix == ".h5" else next(iter(sorted(model_dir.rglob(MODEL_FILE))), None)
    if h5 is None or not h5.is_file():
        raise FileNotFoundError(f"{model_dir}: no {MODEL_FILE} found")
    settings_path = h5.parent / SETTINGS_FILE
    if not settings_path.is_file():
        raise FileNotFoundError(f"{settings_path}: settings file missing beside {h5.name}")
    cfg, settings, _ = read_settings(settings_path)
    return keras.models.load_model(h5, compile=False), cfg, settings
