"""Settings: params.yaml (the values DVC records), then --set overrides; profiles in brainseg.profiles.

The merged settings are a plain nested dict (what DVC and MLflow log); :class:`TrainConfig` is the
typed view the training code takes.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")
PROFILES_FILE = Path("experiments/profiles.yaml")


class ConfigError(ValueError):
    """A settings file or override that cannot be used; the message names the key or file."""


def deep_merge(base: dict, override: dict) -> dict:
    """Return ``base`` updated recursively with ``override`` (neither is modified).

    >>> deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}})
    {'a': {'b': 1, 'c': 3}}
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "loss":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(cfg)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section of params.yaml")
            node = node[part]
        if path[-1] not in node:
            raise ConfigError(f"override {text!r}: unknown key {'.'.join(path)!r}")
        node[path[-1]] = value
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (run brainseg from the project folder)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


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
    params = _read_yaml(Path(params_file))
    if profile:
        from brainseg.profiles import overlay

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


def _int_at_least(low: int):
    return (f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low)


def _number_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def ok(v):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))

    return text, ok


def _positive():
    return "a number > 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


# "section.key" -> (what it must be, check); applied when the key is present
RULES: dict[str, tuple[str, Any]] = {
    "train.epochs": _int_at_least(1), "train.batch_size": _int_at_least(1), "train.size": _int_at_least(32),
    "train.base_filters": _int_at_least(1), "train.patience": _int_at_least(0),
    "train.lr_patience": _int_at_least(0), "train.warmup_epochs": _int_at_least(0),
    "train.freeze_encoder_epochs": _int_at_least(0),
    "train.steps_per_epoch": ("null or an integer >= 1",
                              lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)),
    "train.lr": _number_in(0, 1, low_open=True), "train.threshold": _number_in(0, 1, True, True),
    "train.augment": _number_in(0, 1), "train.tumor_fraction": _number_in(0, 1),
    "train.uniform_share": _number_in(0, 1), "train.tversky_alpha": _number_in(0, 1),
    "train.budget_minutes": ("null or a number of minutes > 0", lambda v: v is None or (
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)),
    "train.progressive_share": _number_in(0, 1, True, True),
    "train.tversky_beta": _number_in(0, 1),
    "evaluate.threshold": _number_in(0, 1, True, True), "evaluate.batch_size": _int_at_least(1),
    "evaluate.min_component_px": _int_at_least(0),
    "tune.n_trials": _int_at_least(1), "tune.epochs": _int_at_least(1), "tune.timeout": _positive(),
    "tune.heartbeat": _positive(),
    "tune.budget_minutes": ("null or a number of minutes > 0", lambda v: v is None or (
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)),
    "tune.target_trials": _int_at_least(1), "tune.rungs": _int_at_least(1),
    "tune.reserve_minutes": ("a number of minutes >= 0", lambda v: isinstance(v, (int, float))
                             and not isinstance(v, bool) and v >= 0),
    "split.val_fraction": _number_in(0, 1, high_open=True), "split.test_fraction": _number_in(0, 1, high_open=True),
    "split.folds": _int_at_least(1), "split.burden_bins": _int_at_least(1),
    "survival.folds": _int_at_least(2), "survival.repeats": _int_at_least(1),
    "survival.inner_folds": _int_at_least(2), "survival.min_frequency": _int_at_least(1),
    "survival.min_known_fraction": _number_in(0, 1),
    "data.synth.patients": _int_at_least(1), "data.synth.slices": _int_at_least(4),
    "data.synth.size": _int_at_least(16),
}


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(name: str, value: Any, expected: Any) -> Any:
    """``value`` as the type ``expected`` (a type, ``X | None``, Literal, or an example value)."""
    import types
    import typing

    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(expected)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{name}: {_shown(value)} is not allowed")
    if origin is typing.Literal:
        if value in typing.get_args(expected):
            return value
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, typing.get_args(expected)))}")
    kind = origin or expected
    if kind == "number":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    return cast(value.strip())
                except ValueError:
                    pass
        raise ConfigError(f"{name}: {_shown(value)} is not a number")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: {_shown(value)} is not true or false")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: {_shown(value)} is not an integer")
    if kind is float:
        if isinstance(value, str):  # YAML reads 1e-3 as text
            try:
                return float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: {_shown(value)} is not a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: {_shown(value)} is not text")
    if kind in (dict, list, tuple):
        if isinstance(value, kind if kind is not tuple else (list, tuple)):
            return value
        raise ConfigError(f"{name}: {_shown(value)} is not a {'mapping' if kind is dict else 'list'}")
    return value


def _kind_of(example: Any) -> Any:
    """The type to check a value against, from the default it replaces (None: anything goes)."""
    if example is None:
        return None
    if isinstance(example, bool):
        return bool
    if isinstance(example, (int, float)):
        return "number"  # numbers stay numbers (int or float); RULES say where an integer is required
    return type(example) if isinstance(example, (str, list, dict)) else None


def _leaves(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict) and value and key != "loss":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(d: dict, dotted: str, missing=KeyError):
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _put(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = d
    for part in parents:
        node = node[part]
    node[last] = value


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
    import typing

    out = copy.deepcopy(settings)
    for section in SECTIONS:
        if section in out and not isinstance(out[section], dict):
            raise ConfigError(f"{section}: {_shown(out[section])} replaces a whole section of settings; "
                              f"set one key instead, e.g. {section}.KEY=VALUE")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in list(out.get("train", {}).items()):
        if key in hints:
            out["train"][key] = _coerce(f"train.{key}", value, hints[key])
    for name, value in list(_leaves(out)):
        if name.startswith("train.") and name.split(".", 1)[1] in hints:
            continue
        kind = _kind_of(_get(reference, name, None)) if reference is not None else None
        if kind is not None:
            _put(out, name, _coerce(name, value, kind))
    for name, (text, ok) in RULES.items():
        value = _get(out, name)
        if value is KeyError:
            continue
        if isinstance(value, float) and value.is_integer() and text.startswith(("an integer", "null or an")):
            value = int(value)
            _put(out, name, value)
        if not ok(value):
            raise ConfigError(f"{name}: {value!r} is not {text}")
    if isinstance(out.get("train"), dict):
        try:
            TrainConfig.from_dict(out["train"])
        except TypeError as exc:
            raise ConfigError(f"train: {exc}") from exc
    return out
