"""The search space of a study: YAML in ``experiments/`` (no code), mapped onto ``train`` settings.

Each parameter is one of::

    name: {type: categorical, choices: [...]}
    name: {type: float, low: 1e-4, high: 1e-2, log: true}
    name: {type: int, low: 1, high: 3}
    name: {type: ..., when: {arch: [unet, fpn]}}     # conditional: only for those values

Names are ``train`` settings (``lr``, ``arch``, ``encoder``, ...) or loss weights ``loss.bce``,
``loss.dice``, ``loss.focal``, ``loss.tversky``, ``loss.jaccard`` (a suggested weight replaces that
one weight of the recipe's loss; the others stay). The hand-set recipe is the study's first trial,
so every range must contain it (:func:`recipe_params`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import optuna
import yaml

from brainseg.settings.config import Train
from brainseg.settings.settings_io import ConfigError


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    spec: dict

    def applies(self, chosen: dict) -> bool:
        when = self.spec.get("when") or {}
        return all(chosen.get(k) in (v if isinstance(v, list) else [v]) for k, v in when.items())

    def suggest(self, trial: optuna.Trial):
        s, t = self.spec, self.spec["type"]
        if t == "categorical":
            return trial.suggest_categorical(self.name, s["choices"])
        if t == "float":
            return trial.suggest_float(self.name, float(s["low"]), float(s["high"]), log=bool(s.get("log", False)))
        return trial.suggest_int(self.name, int(s["low"]), int(s["high"]), log=bool(s.get("log", False)))

    def contains(self, value) -> bool:
        s = self.spec
        if s["type"] == "categorical":
            return value in s["choices"]
        return value is not None and float(s["low"]) <= float(value) <= float(s["high"])


def load_search_space(path: Path) -> list[Param]:
    """Read and check a search-space YAML; errors name the file and the parameter."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of parameter name to spec")
    params = []
    train_fields = set(Train.model_fields)
    for name, spec in raw.items():
        where = f"{path}: parameter {name!r}"
        if not isinstance(spec, dict) or spec.get("type") not in ("categorical", "float", "int"):
            raise ConfigError(f"{where}: needs type categorical, float or int")
        base = name.split(".")[0]
        if base not in train_fields:
            raise ConfigError(f"{where}: not a train setting (known: {sorted(train_fields)})")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise ConfigError(f"{where}: categorical needs a non-empty `choices` list")
        if spec["type"] in ("float", "int"):
            if "low" not in spec or "high" not in spec or float(spec["low"]) > float(spec["high"]):
                raise ConfigError(f"{where}: needs low <= high")
        params.append(Param(name, spec))
    check_choices(params, path)
    return params


def check_choices(params: list[Param], path: Path) -> None:
    """Unknown architecture / encoder / loss names fail before any trial starts."""
    from brainseg.models.factory import ARCHS, ENCODERS
    from brainseg.models.losses import LOSS_NAMES

    for p in params:
        choices = p.spec.get("choices") or []
        bad = {"arch": [c for c in choices if c not in ARCHS],
               "encoder": [c for c in choices if c not in ENCODERS]}.get(p.name, [])
        if p.name.startswith("loss.") and p.name.split(".", 1)[1] not in LOSS_NAMES:
            bad = [p.name]
        if bad:
            raise ConfigError(f"{path}: parameter {p.name!r} has unknown name(s) {bad}")


def apply_params(base: dict, params: dict) -> dict:
    """``base`` train settings with trial ``params`` on top; ``loss.NAME`` sets one loss weight.

    >>> apply_params({"lr": 0.001, "loss": {"bce": 0.5, "dice": 1.0}}, {"lr": 0.002, "loss.focal": 1.0})
    {'lr': 0.002, 'loss': {'bce': 0.5, 'dice': 1.0, 'focal': 1.0}}
    """
    d = copy.deepcopy(base)
    for name, value in params.items():
        if name.startswith("loss."):
            d["loss"] = {**d.get("loss", {}), name.split(".", 1)[1]: value}
        else:
            d[name] = value
    return d


def trial_config(trial: optuna.Trial, base: dict, space: list[Param]) -> Train:
    """Map a trial to a Train: ``base`` train settings with the suggested values on top."""
    chosen: dict = {}
    for p in space:
        if p.applies(chosen):
            chosen[p.name] = p.suggest(trial)
    return Train.from_dict(apply_params(base, chosen))


def recipe_params(recipe: dict, space: list[Param], path: Path | str = "search space") -> dict:
    """The hand-set recipe (``train`` settings) as trial params, to enqueue as the first trial.

    Loss weights absent from the recipe count as 0. A recipe value outside the space fails, naming it.
    """
    chosen: dict = {}
    for p in space:
        if not p.applies(chosen):
            continue
        value = (float((recipe.get("loss") or {}).get(p.name.split(".", 1)[1], 0.0))
                 if p.name.startswith("loss.") else recipe.get(p.name))
        if not p.contains(value):
            raise ConfigError(f"{path}: the hand-set recipe's {p.name}={value!r} is outside parameter "
                              f"{p.name!r} ({p.spec.get('choices') or [p.spec.get('low'), p.spec.get('high')]}); "
                              "widen the range so the study can start from the recipe")
        chosen[p.name] = value
    return chosen
