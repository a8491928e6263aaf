"""Model registry glue: versions with lineage tags, ``challenger`` / ``champion`` aliases."""

from __future__ import annotations

import dataclasses
import math

import mlflow
from mlflow.exceptions import MlflowException

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclasses.dataclass
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    challenger_score: float
    champion_score: float | None
    champion_version: str | None

    def line(self) -> str:
        champ = ("no champion yet" if self.champion_version is None
                 else f"champion v{self.champion_version} scores {self.champion_score:.4f}")
        verdict = "-> champion" if self.promoted else "-> stays challenger"
        return f"{self.name} v{self.version}: challenger scores {self.challenger_score:.4f}; {champ} {verdict} ({self.reason})"


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def find_version(name: str, run_id: str):
    """The version of ``name`` already registered from ``run_id`` (registering twice is a no-op)."""
    try:
        versions = client().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def register(name: str, model_uri: str, run_id: str, tags: dict, description: str):
    """Register ``model_uri`` as a version of ``name`` unless this run is already registered.

    Returns (ModelVersion, created).
    """
    existing = find_version(name, run_id)
    if existing is not None:
        return existing, False
    try:
        client().create_registered_model(name, description=f"brainseg: {description.split('.')[0]}.")
    except MlflowException:
        pass  # already exists
    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client().update_model_version(name, mv.version, description=description)
    return client().get_model_version(name, mv.version), True


def champion(name: str):
    try:
        return client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(name: str, version: str, challenger_score: float, champion_version: str | None,
           champion_score: float | None, force: bool) -> Decision:
    """Pure decision: promote if there is no champion, the score is higher, or ``force``."""
    if champion_version is not None and str(champion_version) == str(version):
        return Decision(name, version, True, "already the champion", challenger_score, champion_score, champion_version)
    if force:
        return Decision(name, version, True, "--force", challenger_score, champion_score, champion_version)
    if champion_version is None:
        return Decision(name, version, True, "first version", challenger_score, None, None)
    if champion_score is None or math.isnan(champion_score) or challenger_score > champion_score:
        return Decision(name, version, True, "beats the champion on the same evaluation set",
                        challenger_score, champion_score, champion_version)
    return Decision(name, version, False, "does not beat the champion", challenger_score, champion_score,
                    champion_version)


def apply(decision: Decision) -> None:
    c = client()
    c.set_registered_model_alias(decision.name, CHALLENGER, decision.version)
    c.set_model_version_tag(decision.name, decision.version, "challenger_score", f"{decision.challenger_score:.6f}")
    if decision.promoted:
        c.set_registered_model_alias(decision.name, CHAMPION, decision.version)
        c.delete_registered_model_alias(decision.name, CHALLENGER)
