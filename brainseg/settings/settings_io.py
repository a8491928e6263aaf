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
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01); the value is parsed as YAML (plain values only:
    see :func:`parse_yaml`), a bad one is a :class:`ConfigError` naming the key."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: empty key")
    return key.strip().split("."), parse_yaml(raw, "--set", key=key.strip()) if raw.strip() else None


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
    """A YAML mapping file (params.yaml, a profiles file), read strictly (:func:`parse_yaml`)."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found (run brainseg from the project folder)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    data = parse_yaml(text, str(path), in_file=True)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# ------------------------------------------------------------------ YAML, plain values only
_CORE = "tag:yaml.org,2002:"
PLAIN_TAGS = {_CORE + t for t in ("null", "bool", "int", "float", "str", "seq", "map", "timestamp")}
MERGE_TAG = _CORE + "merge"
MAX_NODES = 100_000  # values after expanding aliases: a settings file holds a few hundred


class _Refused(Exception):
    def __init__(self, node, key: str, problem: str, first=None):
        super().__init__(problem)
        self.node, self.key, self.problem, self.first = node, key, problem, first  # first: a duplicate's twin


def parse_yaml(text: str, where: str, key: str = "", in_file: bool = False) -> Any:
    """``text`` as plain YAML values, or one :class:`ConfigError` line that starts with ``where`` (a
    file, or ``--set`` with the ``key`` it sets) and names the key: YAML that does not parse, a tag
    other than YAML's plain types (``!!python/...``, ``!!binary``: nothing is constructed), a key
    given twice in one mapping (DVC calls such a params.yaml corrupted; YAML loaders keep the last
    silently), an anchor that contains itself, aliases expanding past ``MAX_NODES`` values.

    >>> parse_yaml("{a: 1, b: [2, 3]}", "--set", key="x")
    {'a': 1, 'b': [2, 3]}
    >>> try:
    ...     parse_yaml("&x [*x]", "--set", key="train.lr")
    ... except ConfigError as exc:
    ...     print(exc)
    --set train.lr: an anchor that contains itself (a recursive alias)
    >>> for bad in ("a: 1\\na: 2", "&x [*x]", "!!python/object:os.system [ls]", "[1, 2"):
    ...     try:
    ...         parse_yaml(bad, "f.yaml", in_file=True)
    ...     except ConfigError as exc:  # doctest: +ELLIPSIS
    ...         print(exc)
    f.yaml: a (lines 1 and 2): duplicate key (one mapping names it twice); keep one
    f.yaml: line 1: an anchor that contains itself (a recursive alias)
    f.yaml: line 1: the YAML tag !!python/object:os.system is not allowed (plain values only)
    f.yaml: line 1, column 6: not valid YAML: expected ',' or ']', but got '<stream end>' (...)
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node(node, key, set(), {})
        return loader.construct_document(node)
    except _Refused as exc:
        mark = exc.node.start_mark
        line = f"line {mark.line + 1}" if in_file else ""
        if exc.first is not None and in_file:
            line = f"lines {exc.first.start_mark.line + 1} and {mark.line + 1}"
        at = f"{exc.key} ({line})" if exc.key and line else exc.key or line
        raise ConfigError(f"{where}: {at}: {exc.problem}" if in_file else f"{where} {at}: {exc.problem}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None and in_file else (
            f"column {mark.column + 1}: " if mark is not None else "")
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(f"{_where(where, key)}: {at}not valid YAML: {exc.problem}{context}") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{_where(where, key)}: not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise ConfigError(f"{_where(where, key)}: nested too deeply to be a setting") from None
    finally:
        loader.dispose()


def _where(where: str, key: str) -> str:
    return f"{where} {key}" if key else where


def _check_node(node, key: str, ancestors: set, sizes: dict) -> int:
    """The number of values ``node`` holds once aliases are expanded; :class:`_Refused` for what
    :func:`parse_yaml` refuses."""
    if id(node) in ancestors:
        raise _Refused(node, key, "an anchor that contains itself (a recursive alias)")
    if id(node) in sizes:
        return sizes[id(node)]
    if node.tag not in PLAIN_TAGS:
        tag = node.tag.replace(_CORE, "!!")
        raise _Refused(node, key, f"the YAML tag {tag} is not allowed (plain values only)")
    children = []
    if isinstance(node, yaml.SequenceNode):
        children = [(key, child) for child in node.value]
    elif isinstance(node, yaml.MappingNode):
        seen = {}
        for key_node, value in node.value:
            if key_node.tag == MERGE_TAG:  # "<<: *defaults": the merged mapping's keys may be overridden
                children.append((key, value))
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            dotted = f"{key}.{name}" if key else str(name)
            if isinstance(key_node, yaml.ScalarNode) and name in seen:
                raise _Refused(key_node, dotted, "duplicate key (one mapping names it twice); keep one", seen[name])
            seen[name] = key_node
            children += [(dotted, key_node), (dotted, value)]
    ancestors.add(id(node))
    size = 1 + sum(_check_node(child, name, ancestors, sizes) for name, child in children)
    ancestors.discard(id(node))
    if size > MAX_NODES:
        raise _Refused(node, key, f"more than {MAX_NODES} values once its aliases are expanded")
    sizes[id(node)] = size
    return size


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
    """A group of settings, frozen. Every key is optional (its default is left out of the checked
    result): a section is checked for the keys it holds, params.yaml holds the values. Unknown keys
    are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def given(self) -> dict:
        """The keys that were given (params.yaml, a profile, ``--set``) as a plain dict, by their
        file names: what DVC and MLflow record. Defaults are left out."""
        return self.model_dump(by_alias=True, exclude_unset=True)


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
        raise ConfigError(one_line(model, exc, prefix)) from None
    return _in_order(checked, values)


def one_line(model: type[BaseModel], exc: ValidationError, prefix: str = "") -> str:
    """pydantic's errors for ``model`` as one line naming each wrong key (what :func:`check` raises)."""
    said: dict[str, str] = {}
    for error in exc.errors():
        name, problem = _explain(model, error, prefix)
        said.setdefault(name, problem)
    return "; ".join(f"{name}: {problem}" for name, problem in said.items())


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
