"""Model registry glue: loading a model by URI, versions with lineage tags, the promotion
decision, ``champion`` alias.

:func:`load_segmenter` is the one door for a segmenter named by a folder, ``runs:/...`` or
``models:/...`` URI (predict, evaluate, the page, features, the bench all use it).

Registering never moves an alias. ``@champion`` moves only through :func:`apply` of a
:class:`Decision`, which the promotion gate (brainseg.promotion) makes when promotion is asked for.
Registry tags say which split a number was computed on (``val_patient_dice_mean``,
``cv_roc_auc_mean``); nothing is called a bare "score".
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from brainseg.inference import Segmenter

CHAMPION, CHALLENGER = "champion", "challenger"


def resolve_model_dir(uri: str) -> Path:
    """A local folder holding model.h5 + brainseg.json for a folder/.h5 path, ``runs:/...`` or
    ``models:/...`` URI (resolved against the current tracking store: MLFLOW_TRACKING_URI, else
    ``sqlite:///mlflow.db`` in the working folder). FileNotFoundError naming the URI otherwise."""
    if Path(uri).exists():
        return Path(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a bad URI
        raise FileNotFoundError(f"model {uri!r}: cannot be resolved in the tracking store "
                                f"{mlflow.get_tracking_uri()} ({exc})") from exc


def load_segmenter(uri: str, **overrides) -> "Segmenter":
    """The :class:`brainseg.inference.Segmenter` stored at a folder/.h5 path, ``runs:/...`` or
    ``models:/...`` URI, with its stored inference settings (``overrides`` on top).
    FileNotFoundError naming the URI when it cannot be resolved or holds no model."""
    from brainseg.inference import Segmenter  # TensorFlow loads only when a model does

    return Segmenter.from_dir(resolve_model_dir(uri), **overrides)


@dataclasses.dataclass
class Decision:
    """One gate decision. ``metric`` names the number and its split, e.g. ``val_patient_dice_mean``."""

    name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    score: float | None
    champion_score: float | None
    champion_version: str | None

    def line(self) -> str:
        def num(v):
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

        champ = ("no champion yet" if self.champion_version is None
                 else f"champion v{self.champion_version} {self.metric} {num(self.champion_score)}")
        verdict = "-> champion" if self.promoted else "-> not promoted"
        return f"{self.name} v{self.version}: {self.metric} {num(self.score)}; {champ} {verdict} ({self.reason})"

    def tags(self) -> dict[str, str]:
        """Tags the gate leaves on the version it judged."""
        tags = {"gate_decision": "promoted" if self.promoted else "not promoted", "gate_reason": self.reason,
                "gate_metric": self.metric}
        if self.champion_version is not None and str(self.champion_version) != str(self.version):
            tags["gate_champion_version"] = str(self.champion_version)
            if self.champion_score is not None:
                tags[f"gate_champion_{self.metric}"] = f"{self.champion_score:.6f}"
        return tags


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def find_version(name: str, run_id: str):
    """The version of ``name`` already registered from ``run_id`` (registering twice is a no-op)."""
    try:
        versions = client().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def get_version(name: str, version: str):
    """The ModelVersion, or ValueError naming the model and the versions it has."""
    try:
        return client().get_model_version(name, str(version))
    except MlflowException:
        try:
            known = sorted(int(v.version) for v in client().search_model_versions(f"name='{name}'"))
        except MlflowException:
            known = []
        raise ValueError(f"model {name!r} has no version {version!r}"
                         + (f" (versions: {', '.join(map(str, known))})" if known else " (no versions)")) from None


def register(name: str, model_uri: str, run_id: str, tags: dict, description: str):
    """Register ``model_uri`` as a version of ``name`` unless this run is already registered.

    No alias is touched. Returns (ModelVersion, created).
    """
    existing = find_version(name, run_id)
    if existing is not None:
        return existing, False
    try:
        client().create_registered_model(name, description=f"brainseg: {description.split('.')[0]}.")
    except MlflowException:
        pass  # already exists
    with contextlib.redirect_stderr(io.StringIO()):  # its "Registered model ... already exists" prints
        mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client().update_model_version(name, mv.version, description=description)
    return client().get_model_version(name, mv.version), True


def set_version_tags(name: str, version: str, tags: dict) -> None:
    for k, v in tags.items():
        client().set_model_version_tag(name, str(version), k, str(v))


def champion(name: str):
    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(name: str, version: str, metric: str, score: float | None, champion_version: str | None,
           champion_score: float | None, force: bool) -> Decision:
    """Pure: promote if there is no champion, the challenger scores strictly higher, or ``force``.

    Both scores must come from the same evaluation (same patients, same data version); a tie or a
    missing challenger score keeps the champion.
    """
    def d(promoted, reason):
        return Decision(name, str(version), promoted, reason, metric, score, champion_score,
                        None if champion_version is None else str(champion_version))

    if champion_version is not None and str(champion_version) == str(version):
        return d(True, "already the champion")
    if force:
        return d(True, "--force")
    if champion_version is None:
        return d(True, "first version")
    if score is None or math.isnan(score):
        return d(False, f"no {metric} for the challenger")
    if champion_score is None or math.isnan(champion_score) or score > champion_score:
        return d(True, f"higher {metric} than the champion on the same patients")
    return d(False, f"{metric} not higher than the champion's on the same patients")


def decide_preregistered(name: str, version: str, metric: str, score: float | None, is_final: bool,
                         final: str, champion_version: str | None, force: bool) -> Decision:
    """Pure: for a model chosen before any score (``survival.final``), promote the version fitted
    with that choice; scores across versions are not compared (no best-of-N selection)."""
    champ = None if champion_version is None else str(champion_version)
    if champ is not None and champ == str(version):
        promoted, reason = True, "already the champion"
    elif force:
        promoted, reason = True, "--force"
    elif is_final:
        promoted, reason = True, f"the pre-registered final model {final}; {metric} not compared across versions"
    else:
        promoted, reason = False, f"not the pre-registered final model {final}"
    return Decision(name, str(version), promoted, reason, metric, score, None, champ)


def apply(decision: Decision) -> None:
    """Record the decision on the version; ``promoted`` moves ``@champion`` to it, otherwise the
    version becomes ``@challenger``."""
    c = client()
    set_version_tags(decision.name, decision.version, decision.tags())
    if decision.promoted:
        c.set_registered_model_alias(decision.name, CHAMPION, decision.version)
        try:
            if c.get_model_version_by_alias(decision.name, CHALLENGER).version == decision.version:
                c.delete_registered_model_alias(decision.name, CHALLENGER)
        except MlflowException:
            pass
    else:
        c.set_registered_model_alias(decision.name, CHALLENGER, decision.version)
