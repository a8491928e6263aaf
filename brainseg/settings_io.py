"""The low-level pieces of settings, shared by :mod:`brainseg.config` and :mod:`brainseg.profiles`:
the files, :class:`ConfigError`, reading a YAML mapping, ``--set KEY=VALUE`` overrides, and the
checks that turn a written value into a setting's type (``"1e-3"`` -> 0.001). Imports nothing of
brainseg, so both settings modules depend on it and not on each other.
"""

from __future__ import annotations

import copy
import types
import typing
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


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (run brainseg from the project folder)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# ------------------------------------------------------------------ checking values
def int_at_least(low: int):
    return (f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low)


def number_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def ok(v):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))

    return text, ok


def positive():
    return "a number > 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def coerce(name: str, value: Any, expected: Any) -> Any:
    """``value`` as the type ``expected`` (a type, ``X | None``, Literal, or an example value)."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(expected)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{name}: {shown(value)} is not allowed")
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
        raise ConfigError(f"{name}: {shown(value)} is not a number")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: {shown(value)} is not true or false")
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
        raise ConfigError(f"{name}: {shown(value)} is not an integer")
    if kind is float:
        if isinstance(value, str):  # YAML reads 1e-3 as text
            try:
                return float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: {shown(value)} is not a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: {shown(value)} is not text")
    if kind in (dict, list, tuple):
        if isinstance(value, kind if kind is not tuple else (list, tuple)):
            return value
        raise ConfigError(f"{name}: {shown(value)} is not a {'mapping' if kind is dict else 'list'}")
    return value


def kind_of(example: Any) -> Any:
    """The type to check a value against, from the default it replaces (None: anything goes)."""
    if example is None:
        return None
    if isinstance(example, bool):
        return bool
    if isinstance(example, (int, float)):
        return "number"  # numbers stay numbers (int or float); RULES say where an integer is required
    return type(example) if isinstance(example, (str, list, dict)) else None


def leaves(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict) and value and key != "loss":
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def get_dotted(d: dict, dotted: str, missing=KeyError):
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def put_dotted(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = d
    for part in parents:
        node = node[part]
    node[last] = value
