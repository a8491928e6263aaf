"""Model registry glue: loading a model by URI, versions with lineage tags, the promotion
decision, ``champion`` alias.

:func:`load_segmenter` is the one door for a segmenter named by a folder, ``runs:/...`` or
``models:/...`` URI (predict, evaluate, the page, features, the bench all use it).
:func:`document_segmenter` / :func:`document_survival` log a version's model card (built by the
pure :mod:`brainseg.registry.modelcard`).

Registering never moves an alias. ``@champion`` moves only through :func:`apply` of a
:class:`Decision`, which the promotion gate (brainseg.registry.promotion) makes when promotion is asked for.
Registry tags say which split a number was computed on (``val_patient_dice_mean``,
``cv_roc_auc_mean``); nothing is called a bare "score".
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from brainseg.data.synth import is_synthetic
from brainseg.registry import modelcard
from brainseg.tracking.mlflow_runs import client

if TYPE_CHECKING:
    from brainseg.inference.segmenter import Segmenter

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
    """The :class:`brainseg.inference.segmenter.Segmenter` stored at a folder/.h5 path, ``runs:/...`` or
    ``models:/...`` URI, with its stored inference settings (``overrides`` on top).
    FileNotFoundError naming the URI when it cannot be resolved or holds no model."""
    from brainseg.inference.segmenter import Segmenter

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


def versions_of_run(run_id: str) -> list:
    """Every registry version logged from run ``run_id`` (any model name)."""
    return client().search_model_versions(f"run_id='{run_id}'")


@contextlib.contextmanager
def temporary_store(uri: str):
    """Point MLflow tracking and registry (and child processes, via the environment) at ``uri``;
    put back the previous store (and experiment) afterwards. The bench and the tests use it."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")  # set_experiment writes the last
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])


def load_pyfunc(uri: str):
    """An MLflow pyfunc model by URI (the survival model; a segmenter loads with :func:`load_segmenter`)."""
    return mlflow.pyfunc.load_model(uri)


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


# ------------------------------------------------------------------ whole or nothing (brainseg.registry.registration)
REGISTRATION_TAG = "brainseg.registration"  # "incomplete" from its creation until its card and tags are all on
CHECK_TAG = "brainseg.registration_check"


def check_can_write(run_id: str) -> None:
    """The cheapest call a registration needs authorised: a tag set and removed on run ``run_id``
    (its model card goes there). The server's refusal propagates before anything is created."""
    c = client()
    c.set_tag(run_id, CHECK_TAG, "can write")
    c.delete_tag(run_id, CHECK_TAG)


def model_exists(name: str) -> bool:
    try:
        client().get_registered_model(name)
        return True
    except MlflowException:
        return False


def undo_version(name: str, run_id: str, version: str | None, delete_model: bool) -> None:
    """Delete ``name`` v``version`` (else the version of ``name`` from ``run_id``, if any), the
    registered model too when ``delete_model`` and no version is left in it, and the run's model
    card files when no version of any model comes from the run any more (a cut file of a full disk
    goes). Raises what the server or the store raises."""
    c = client()
    mv = c.get_model_version(name, str(version)) if version else find_version(name, run_id)
    if mv is not None:
        c.delete_model_version(name, str(mv.version))
    if delete_model and model_exists(name) and not c.search_model_versions(f"name='{name}'"):
        c.delete_registered_model(name)
    if not versions_of_run(run_id):
        repo = get_artifact_repository(c.get_run(run_id).info.artifact_uri)
        for path in (modelcard.CARD_FILE, modelcard.FACTS_FILE):
            with contextlib.suppress(Exception):  # not written, or a store that cannot delete
                repo.delete_artifacts(path)


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


# ------------------------------------------------------------------------------- model cards
def document_segmenter(name: str, version: str, run_id: str, ctx=None, trained_in: str | None = None) -> str:
    """Build and log the card of segmenter ``name`` v``version`` logged in ``run_id``; returns it.

    ``ctx`` (a :class:`brainseg.data.context.DataContext` of the same data version) adds the
    patient counts per split and whether the data is synthetic; ``trained_in``: the training run
    when ``run_id`` only chose the inference settings (the recipe is read from it).
    """
    run = client().get_run(run_id)
    per_patient = None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="val_per_patient_metrics.csv")
        per_patient = pd.read_csv(local)
    except Exception:  # noqa: BLE001 - an older run without the table: the card says so
        per_patient = None
    patients, synthetic = {}, None
    if ctx is not None and ctx.version == run.data.tags.get("data_version"):
        for subset in ("train", "val", "test"):
            patients[subset] = int(ctx.rows(subset)["patient"].nunique())
        synthetic = is_synthetic(ctx.root, list(ctx.rows("train")["patient"].unique()))
    recipe_run = client().get_run(trained_in) if trained_in else None
    facts = modelcard.segmenter_facts(name, version, run, per_patient, patients, synthetic, recipe_run)
    markdown = modelcard.segmenter_card(facts)
    log_model_card(name, version, run_id, markdown, facts, modelcard.card_tags(facts))
    return markdown


def document_survival(name: str, version: str, run_id: str, summary: dict) -> str:
    """Build and log the card of survival ``name`` v``version`` from ``brainseg survival``'s summary."""
    final = summary.get("final", {})
    cv = {k: final.get(k) for k in ("roc_auc_mean", "roc_auc_low", "roc_auc_high", "balanced_accuracy_mean",
                                    "brier_mean", "baseline_brier", "folds", "repeats")}
    cv["balanced_accuracy_mean"] = cv["balanced_accuracy_mean"] or final.get("balanced_accuracy")
    cv["brier_mean"] = cv["brier_mean"] or final.get("brier")
    facts = {"name": name, "version": str(version), "run_id": run_id,
             "classifier": final.get("classifier"), "feature_set": final.get("feature_set"),
             "features_from": summary.get("features_from"), "data_version": summary.get("data_version", ""),
             "fitted_on": summary.get("fitted_on"), "patients": summary.get("patients"),
             "positives": summary.get("positives"), "cv": cv, "failures": summary.get("failures") or {}}
    markdown = modelcard.survival_card(facts)
    log_model_card(name, version, run_id, markdown, facts, modelcard.card_tags(facts))
    return markdown


def log_model_card(name: str, version: str, run_id: str, markdown: str, facts: dict, tags: dict) -> None:
    """A registered version's model card: ``model_card.md`` / ``.json`` artifacts of its source run,
    the version's description (its short registration text, a blank line and the card, cut to
    MLflow's limit) and ``card.*`` version tags."""
    c = client()
    c.log_text(run_id, markdown, modelcard.CARD_FILE)
    c.log_dict(run_id, facts, modelcard.FACTS_FILE)
    lead = c.get_model_version(name, str(version)).description or ""
    c.update_model_version(name, str(version), description=modelcard.description(markdown, lead))
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, str(value))
