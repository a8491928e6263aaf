"""The low-level pieces of settings, shared by :mod:`brainseg.settings.config` and :mod:`brainseg.settings.profiles`:
the files, :class:`ConfigError`, reading a YAML mapping, ``--set KEY=VALUE`` overrides, and the
pydantic pieces the settings models are built of (the value types, :class:`Section`, :func:`check`,
which turns pydantic's errors into one line naming the key). Imports nothing of brainseg, so both
settings modules depend on it and not on each other.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictBool, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

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


# ------------------------------------------------------------------ checking values (pydantic)
def _refuse_flags(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic's lax mode would read true as 1
        raise PydanticCustomError("flag_type", "a flag where a number belongs")
    return value


Int = Annotated[int, BeforeValidator(_refuse_flags)]  # 4.0 and "4" -> 4; 2.5 and true are refused
Float = Annotated[float, BeforeValidator(_refuse_flags)]  # "1e-3" (YAML reads it as text) -> 0.001
Number = Annotated[int | float, BeforeValidator(_refuse_flags)]  # a number as written: 600 stays 600
Flag = StrictBool  # true or false, not 1 or "yes"


class Section(BaseModel):
    """A group of settings. Every key is optional (default None, left out of the checked result):
    a section is checked for the keys it holds, params.yaml holds the values. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


def check(model: type[BaseModel], values: dict, prefix: str = "") -> dict:
    """``values`` checked and converted by ``model``: a plain dict of the keys given, or
    :class:`ConfigError` naming each wrong key in one line.

    >>> from pydantic import Field
    >>> class Demo(Section):
    ...     epochs: Int = Field(None, ge=1)
    >>> check(Demo, {"epochs": 3.0})
    {'epochs': 3}
    >>> try:
    ...     check(Demo, {"epochs": "two"}, "train")
    ... except ConfigError as exc:
    ...     print(exc)
    train.epochs: 'two' (str) is not an integer >= 1
    """
    try:
        checked = model.model_validate(values).model_dump(by_alias=True, exclude_unset=True)
    except ValidationError as exc:
        said: dict[str, str] = {}
        for error in exc.errors():
            name, problem = _explain(model, error, prefix)
            said.setdefault(name, problem)
        raise ConfigError("; ".join(f"{name}: {problem}" for name, problem in said.items())) from None
    return _in_order(checked, values)


def _in_order(checked: dict, given: dict) -> dict:
    """``checked`` with its keys in the order of ``given`` (the file's), nested sections too."""
    return {key: _in_order(checked[key], value) if isinstance(value, dict) and isinstance(checked[key], dict)
            else checked[key] for key, value in given.items()}


RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of", "too_short",
                "finite_number")


def _explain(model: type[BaseModel], error: dict, prefix: str) -> tuple[str, str]:
    """(dotted key, what is wrong with its value) for one of pydantic's errors."""
    kind, value, loc = error["type"], error["input"], error["loc"]
    if kind == "extra_forbidden":
        loc, unknown = loc[:-1], loc[-1]
    names, field, node = [prefix] if prefix else [], None, model
    for part in loc:  # skips what is not a key: union members ("int", "float"), list positions
        fields = _fields(node)
        if part in fields:
            names.append(part)
            field, node = fields[part], fields[part].annotation
    name = ".".join(names)
    if kind == "extra_forbidden":
        return f"{name}.{unknown}" if name else str(unknown), f"unknown key; known: {', '.join(_fields(node))}"
    if kind == "model_type":
        return name, f"{shown(value)} replaces a whole section of settings; set one key instead, e.g. {name}.KEY=VALUE"
    if kind == "literal_error":
        return name, f"{value!r} is not one of {error['ctx']['expected']}"
    return name, f"{repr(value) if kind in RANGE_ERRORS else shown(value)} is not {wanted(field)}"


def _fields(node: Any) -> dict[str, FieldInfo]:
    """A model's fields by the keys the files use (their aliases); {} for what is not a model."""
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return {}
    return {field.alias or name: field for name, field in node.model_fields.items()}


def wanted(field: FieldInfo) -> str:
    """What a field's values must be: ``"null or an integer >= 1"``, ``"a number in (0, 1]"``."""
    if field.description:
        return field.description
    kinds = _types(field.annotation)
    what = ("true or false" if bool in kinds else "an integer" if int in kinds and float not in kinds
            else "a number" if float in kinds else "text" if str in kinds else "a mapping" if dict in kinds
            else "a list" if list in kinds else "valid")
    b = {n: getattr(m, n) for m in field.metadata for n in ("gt", "ge", "lt", "le") if hasattr(m, n)}
    low = f"({b['gt']:g}" if "gt" in b else f"[{b['ge']:g}" if "ge" in b else ""
    high = f"{b['lt']:g})" if "lt" in b else f"{b['le']:g}]" if "le" in b else ""
    if low:
        what += f" in {low}, {high}" if high else f" {'>' if low[0] == '(' else '>='} {low[1:]}"
    return f"null or {what}" if type(None) in kinds else what


def _types(annotation: Any) -> set:
    """The plain types inside ``X | None`` and ``Annotated[X, ...]``."""
    args, origin = typing.get_args(annotation), typing.get_origin(annotation)
    if origin is Annotated or origin in (typing.Union, types.UnionType):
        return set().union(*map(_types, args[:1] if origin is Annotated else args))
    return {origin or annotation}


def shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"
