"""Settings: params.yaml (the values DVC records), then --set overrides; profiles in brainseg.profiles.

The merged settings are a plain nested dict (what DVC and MLflow log); :class:`TrainConfig` is the
typed view the training code takes.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any

from brainseg.profiles import overlay
from brainseg.settings_io import (  # noqa: F401  (ConfigError, the files and overrides: re-exported)
    PARAMS_FILE, PROFILES_FILE, ConfigError, apply_overrides, coerce, deep_merge, get_dotted, int_at_least, kind_of,
    leaves, number_in, parse_override, positive, put_dotted, read_yaml, shown)


def load_settings(
    profile: str | None = None,
    overrides: list[str] | None = None,
    params_file: Path = PARAMS_FILE,
    profiles_file: Path = PROFILES_FILE,
) -> dict:
    """params.yaml as written, then ``--set`` overrides: what DVC records is what runs.

    ``profile=None`` (every pipeline stage) reads params.yaml only; its ``profile:`` key just names
    the profile its values were last copied from (``brainseg profile use NAME``). An explicit
    ``profile`` (``--profile NAME`` on a single command) applies that profile in memory first.
    """
    params = read_yaml(Path(params_file))
    if profile:
        params = overlay(params, profile, Path(profiles_file))
    params.setdefault("profile", "custom")
    return apply_overrides(params, overrides or [])


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    """How a slice becomes a network input; shared by training, evaluation, predict and serving."""

    channels: str = "flair"
    size: int = 128
    normalize: str = "zscore"
    sharpen: bool = False
    crop: str = "none"  # none | head (crop each slice to its head's square box before resizing)

    def __post_init__(self):
        if self.crop not in ("none", "head"):
            raise ConfigError(f"crop: {self.crop!r} is not one of none, head")
        if self.channels not in ("flair", "all"):
            raise ConfigError(f"channels: {self.channels!r} is not one of flair, all")
        if self.normalize not in ("zscore", "unit"):
            raise ConfigError(f"normalize: {self.normalize!r} is not one of zscore, unit")
        if not (16 <= int(self.size) <= 1024) or int(self.size) % 32:
            raise ConfigError(f"size: {self.size} must be a multiple of 32 in 32..1024")

    @property
    def n_channels(self) -> int:
        return 1 if self.channels == "flair" else 3

    def key(self) -> str:
        crop = "" if self.crop == "none" else f"-crop{self.crop}"
        return f"{self.channels}-{self.size}-{self.normalize}-{'sharp' if self.sharpen else 'plain'}{crop}"


# train settings of runs sized in epochs, not minutes (tuning trials and their refit, the survival
# fold segmenters): the recipe's time budget and resolution schedule do not apply to them
EPOCH_SIZED = {"budget_minutes": None, "progressive_size": None}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    freeze_encoder_epochs: int = 0
    deep_supervision: bool = False
    base_filters: int = 16
    channels: str = "flair"
    size: int = 128
    normalize: str = "zscore"
    sharpen: bool = False
    crop: str = "none"
    loss: dict = dataclasses.field(default_factory=lambda: {"bce": 0.5, "dice": 1.0})
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 30
    patience: int = 8
    lr_patience: int = 3
    lr_schedule: str = "plateau"  # plateau (ReduceLROnPlateau) | cosine | linear (warm-up, then decay)
    warmup_epochs: int = 0
    budget_minutes: float | None = None  # wall-clock budget of the training (overrides epochs)
    progressive_size: int | None = None  # train the first steps at this size (progressive resizing)
    progressive_share: float = 0.5  # share of the training time (or epochs) at progressive_size
    sampling: str = "balanced"  # balanced (tumor_fraction) | area (tumor area + uniform_share)
    uniform_share: float = 0.5
    tumor_fraction: float = 0.5
    augment: float = 0.5
    steps_per_epoch: int | None = None
    threshold: float = 0.5
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"train: unknown setting(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.prep  # validates the preprocessing part
        if cfg.lr_schedule not in ("plateau", "cosine", "linear"):
            raise ConfigError(f"train.lr_schedule: {cfg.lr_schedule!r} is not one of plateau, cosine, linear")
        if cfg.budget_minutes is not None and cfg.freeze_encoder_epochs:
            raise ConfigError("train.budget_minutes: a budgeted run cannot also freeze the encoder for "
                              "freeze_encoder_epochs (set one of them)")
        if cfg.progressive_size is not None and (int(cfg.progressive_size) % 32 or
                                                 not 32 <= int(cfg.progressive_size) < int(cfg.size)):
            raise ConfigError(f"train.progressive_size: {cfg.progressive_size} must be a multiple of 32 "
                              f"below train.size ({cfg.size}), or null")
        if cfg.sampling not in ("balanced", "area"):
            raise ConfigError(f"train.sampling: {cfg.sampling!r} is not one of balanced, area")
        if not 0.0 <= cfg.uniform_share <= 1.0:
            raise ConfigError(f"train.uniform_share: {cfg.uniform_share} not in [0, 1]")
        if not 0.0 <= cfg.tumor_fraction <= 1.0:
            raise ConfigError(f"train.tumor_fraction: {cfg.tumor_fraction} not in [0, 1]")
        if not cfg.loss or not isinstance(cfg.loss, dict):
            raise ConfigError("train.loss: expected a mapping of loss name to weight")
        return cfg

    @property
    def prep(self) -> PrepConfig:
        return PrepConfig(self.channels, int(self.size), self.normalize, bool(self.sharpen), self.crop)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------ checking settings before a run
SECTIONS = ("data", "split", "train", "evaluate", "tune", "survival", "register")


# "section.key" -> (what it must be, check); applied when the key is present
RULES: dict[str, tuple[str, Any]] = {
    "train.epochs": int_at_least(1), "train.batch_size": int_at_least(1), "train.size": int_at_least(32),
    "train.base_filters": int_at_least(1), "train.patience": int_at_least(0),
    "train.lr_patience": int_at_least(0), "train.warmup_epochs": int_at_least(0),
    "train.freeze_encoder_epochs": int_at_least(0),
    "train.steps_per_epoch": ("null or an integer >= 1",
                              lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)),
    "train.lr": number_in(0, 1, low_open=True), "train.threshold": number_in(0, 1, True, True),
    "train.augment": number_in(0, 1), "train.tumor_fraction": number_in(0, 1),
    "train.uniform_share": number_in(0, 1), "train.tversky_alpha": number_in(0, 1),
    "train.budget_minutes": ("null or a number of minutes > 0", lambda v: v is None or (
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)),
    "train.progressive_share": number_in(0, 1, True, True),
    "train.tversky_beta": number_in(0, 1),
    "evaluate.threshold": number_in(0, 1, True, True), "evaluate.batch_size": int_at_least(1),
    "evaluate.min_component_px": int_at_least(0),
    "tune.n_trials": int_at_least(1), "tune.epochs": int_at_least(1), "tune.timeout": positive(),
    "tune.heartbeat": positive(),
    "tune.budget_minutes": ("null or a number of minutes > 0", lambda v: v is None or (
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)),
    "tune.target_trials": int_at_least(1), "tune.rungs": int_at_least(1),
    "tune.reserve_minutes": ("a number of minutes >= 0", lambda v: isinstance(v, (int, float))
                             and not isinstance(v, bool) and v >= 0),
    "split.val_fraction": number_in(0, 1, high_open=True), "split.test_fraction": number_in(0, 1, high_open=True),
    "split.folds": int_at_least(1), "split.burden_bins": int_at_least(1),
    "survival.folds": int_at_least(2), "survival.repeats": int_at_least(1),
    "survival.inner_folds": int_at_least(2), "survival.min_frequency": int_at_least(1),
    "survival.min_known_fraction": number_in(0, 1),
    "data.synth.patients": int_at_least(1), "data.synth.slices": int_at_least(4),
    "data.synth.size": int_at_least(16),
}


def validate_settings(settings: dict, reference: dict | None = None) -> dict:
    """Check the merged settings' types and ranges before any run starts.

    Types come from :class:`TrainConfig`'s field annotations (``train.*``) and, for the other
    sections, from ``reference`` (the same settings before ``--set`` overrides): a number stays a
    number, a flag a flag, a section a section. Ranges are :data:`RULES` (epochs, batch sizes and
    sizes >= 1, fractions in [0, 1], ...). Returns a copy with numbers written as text converted
    (``"1e-3"`` -> 0.001, ``5.0`` -> 5 for integers); raises :class:`ConfigError` naming the key.

    >>> validate_settings({"train": {"lr": "1e-3"}})["train"]["lr"]
    0.001
    >>> try:
    ...     validate_settings({"train": {"epochs": 0}})
    ... except ConfigError as exc:
    ...     print(exc)
    train.epochs: 0 is not an integer >= 1
    """
    out = copy.deepcopy(settings)
    for section in SECTIONS:
        if section in out and not isinstance(out[section], dict):
            raise ConfigError(f"{section}: {shown(out[section])} replaces a whole section of settings; "
                              f"set one key instead, e.g. {section}.KEY=VALUE")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in list(out.get("train", {}).items()):
        if key in hints:
            out["train"][key] = coerce(f"train.{key}", value, hints[key])
    for name, value in list(leaves(out)):
        if name.startswith("train.") and name.split(".", 1)[1] in hints:
            continue
        kind = kind_of(get_dotted(reference, name, None)) if reference is not None else None
        if kind is not None:
            put_dotted(out, name, coerce(name, value, kind))
    for name, (text, ok) in RULES.items():
        value = get_dotted(out, name)
        if value is KeyError:
            continue
        if isinstance(value, float) and value.is_integer() and text.startswith(("an integer", "null or an")):
            value = int(value)
            put_dotted(out, name, value)
        if not ok(value):
            raise ConfigError(f"{name}: {value!r} is not {text}")
    if isinstance(out.get("train"), dict):
        try:
            TrainConfig.from_dict(out["train"])
        except TypeError as exc:
            raise ConfigError(f"train: {exc}") from exc
    return out
