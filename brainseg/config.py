"""Settings: params.yaml, then a budget profile from experiments/profiles.yaml, then overrides.

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
    """Merge params.yaml <- profile <- overrides; ``profile=None`` uses params.yaml's ``profile``."""
    params = _read_yaml(Path(params_file))
    profiles = _read_yaml(Path(profiles_file))
    name = profile or params.get("profile", "smoke")
    if name not in profiles:
        raise ConfigError(f"unknown profile {name!r}; {profiles_file} defines {sorted(profiles)}")
    merged = deep_merge(params, profiles[name] or {})
    merged["profile"] = name
    return apply_overrides(merged, overrides or [])


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    """How a slice becomes a network input; shared by training, evaluation, predict and serving."""

    channels: str = "flair"
    size: int = 128
    normalize: str = "zscore"
    sharpen: bool = False

    def __post_init__(self):
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
        return f"{self.channels}-{self.size}-{self.normalize}-{'sharp' if self.sharpen else 'plain'}"


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
    loss: dict = dataclasses.field(default_factory=lambda: {"bce": 0.5, "dice": 1.0})
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 30
    patience: int = 8
    lr_patience: int = 3
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
        if not 0.0 <= cfg.tumor_fraction <= 1.0:
            raise ConfigError(f"train.tumor_fraction: {cfg.tumor_fraction} not in [0, 1]")
        if not cfg.loss or not isinstance(cfg.loss, dict):
            raise ConfigError("train.loss: expected a mapping of loss name to weight")
        return cfg

    @property
    def prep(self) -> PrepConfig:
        return PrepConfig(self.channels, int(self.size), self.normalize, bool(self.sharpen))

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
