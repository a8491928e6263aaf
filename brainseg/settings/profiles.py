"""Budget profiles: named sets of values (experiments/profiles.yaml) written INTO params.yaml.

Every pipeline stage reads params.yaml and nothing else, so the values DVC records (``dvc params
diff``, ``dvc exp show``, ``dvc exp run -S key=value``) are exactly the values that run. A profile
never overrides params.yaml silently: ``brainseg profile use NAME`` (or ``brainseg run --profile
NAME``) copies its values into params.yaml, keeping the file's comments, and sets ``profile: NAME``
as a label of where the values came from.

Every profile sets the same keys (a "complete budget"), so switching from one profile to another
leaves nothing of the first behind; :func:`read_profiles` refuses a file where they differ.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from brainseg.settings.settings_io import PARAMS_FILE, PROFILES_FILE, ConfigError, read_yaml

_MISSING = object()


def _leaves(profile: dict) -> dict[str, Any]:
    """Nested profile -> {"train.epochs": 4, ...}; a mapping value under ``loss`` stays whole."""
    out: dict[str, Any] = {}
    for key, value in (profile or {}).items():
        if isinstance(value, dict) and key != "loss":
            out.update({f"{key}.{k}": v for k, v in _leaves(value).items()})
        else:
            out[key] = value
    return out


def read_profiles(profiles_file: Path = PROFILES_FILE) -> dict[str, dict[str, Any]]:
    """{profile name: {"section.key": value}}; every profile must set the same keys.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "profiles.yaml"
    >>> _ = p.write_text("a: {train: {epochs: 2}}\\nb: {train: {epochs: 9}}\\n")
    >>> read_profiles(p)
    {'a': {'train.epochs': 2}, 'b': {'train.epochs': 9}}
    """
    raw = read_yaml(Path(profiles_file))
    profiles = {}
    for name, body in raw.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{profiles_file}: profile {name!r} must be a mapping of params.yaml sections")
        profiles[str(name)] = _leaves(body or {})
    keys = set().union(*(p.keys() for p in profiles.values())) if profiles else set()
    for name, values in profiles.items():
        missing = sorted(keys - values.keys())
        if missing:
            raise ConfigError(f"{profiles_file}: profile {name!r} does not set {missing}; every profile must "
                              "set the same keys, so that switching profiles leaves no value behind")
    return profiles


def profile_values(name: str, profiles_file: Path = PROFILES_FILE) -> dict[str, Any]:
    profiles = read_profiles(profiles_file)
    if name not in profiles:
        raise ConfigError(f"unknown profile {name!r}; {profiles_file} defines {sorted(profiles)}")
    return profiles[name]


def changes(params: dict, name: str, values: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in params, value of the profile) for every key that differs, ``profile`` first."""
    out = [("profile", params.get("profile"), name)] if params.get("profile") != name else []
    for key, value in values.items():
        current = _get(params, key)
        if current is _MISSING:
            raise ConfigError(f"profile {name!r} sets {key!r}, which is not a key of params.yaml")
        if current != value:
            out.append((key, current, value))
    return out



def _get(d: dict, dotted: str):
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _yaml():
    y = YAML()
    y.preserve_quotes = True
    y.width = 4096
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _styled_like(old, value):
    """A mapping or list value in the old value's style (flow ``{a: 1}`` unless it was a block)."""
    if not isinstance(value, (dict, list)):
        return value
    new = CommentedMap(value) if isinstance(value, dict) else CommentedSeq(value)
    old_fa = getattr(old, "fa", None)
    if old_fa is None or old_fa.flow_style():
        new.fa.set_flow_style()
    return new


def use_profile(name: str, params_file: Path = PARAMS_FILE, profiles_file: Path = PROFILES_FILE,
                dry_run: bool = False) -> list[tuple[str, Any, Any]]:
    """Write profile ``name``'s values and ``profile: name`` into params.yaml; returns what changed.

    Comments and key order are kept; nothing is written when nothing differs (or ``dry_run``).
    """
    values = profile_values(name, profiles_file)
    params = read_yaml(Path(params_file))
    diff = changes(params, name, values)
    if diff and not dry_run:
        y = _yaml()
        with open(params_file) as fh:
            doc = y.load(fh)
        for key, _, value in diff:
            *parents, leaf = key.split(".")
            node = doc
            for part in parents:
                node = node[part]
            node[leaf] = _styled_like(node.get(leaf), value)
        with open(params_file, "w") as fh:
            y.dump(doc, fh)
    return diff


def with_profile(params: dict, name: str, profiles_file: Path = PROFILES_FILE) -> dict:
    """params with profile ``name`` applied in memory (``--profile`` on a single command)."""
    out = copy.deepcopy(params)
    for key, value in profile_values(name, profiles_file).items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    out["profile"] = name
    return out
