"""Register every model version with its lineage; move ``@champion`` only through a gate, on request.

- Segmenter: the gate evaluates challenger and champion on the **validation** patients of the
  current data version (``register.subset``; the test split is refused) and promotes the
  challenger only if its ``val_patient_dice_mean`` is strictly higher. Test labels are never read.
- Survival: the final pipeline is fixed in params.yaml (``survival.final``) before any score is
  seen, so the gate does not compare cross-validated AUCs across versions (that would be the
  best-of-N selection the design avoids): it promotes the version fitted with that
  pre-registered choice.

Registration alone changes no alias. Promotion happens when asked: ``register.promote: true``,
``brainseg register --promote``, ``brainseg promote NAME VERSION`` or ``brainseg run`` (which puts
the versions it registered through the gate after the pipeline).
"""

from __future__ import annotations

import math

from brainseg.data.context import DataContext
from brainseg.registry import evidence, model_registry
from brainseg.registry.registration import register_whole
from brainseg.settings.architectures import model_name
from brainseg.settings.config import Settings
from brainseg.settings.settings_io import ConfigError
from brainseg.tracking import mlflow_runs, run_context, run_metrics
from brainseg.tracking.run_context import CHOSEN_ON_TAG

GATE_SUBSETS = ("val",)


def gate_subset(settings: Settings) -> str:
    subset = settings.register_.subset
    if subset not in GATE_SUBSETS:
        raise ConfigError(f"register.subset: {subset!r} cannot choose models; use one of {GATE_SUBSETS} "
                          "(test patients are for the report only)")
    return subset


def segmenter_score(settings: Settings, ctx: DataContext, name: str, version: str, subset: str,
                    role: str) -> float | None:
    """``{subset}_patient_dice_mean`` of a version on ``subset`` of the current data version.

    Evaluated once per (version, data version) as an MLflow run; the result is kept as version tags
    (``val_patient_dice_mean``, ``val_data_version``, ``val_n_patients``) and reused.
    """
    from brainseg.evaluation.evaluate_run import tracked_evaluation

    key = f"{subset}_patient_dice_mean"
    mv = model_registry.get_version(name, version)
    if mv.tags.get(f"{subset}_data_version") == ctx.version and key in mv.tags:
        value = float(mv.tags[key])
        return None if math.isnan(value) else value
    res = tracked_evaluation(settings, f"models:/{name}/{version}", ctx, subset,
                             tags={"role": role, "model_name": name, "model_version": str(version)})
    m = res["metrics"]
    value = m.get("patient_dice_mean")
    model_registry.set_version_tags(name, version, {
        key: "nan" if value is None else f"{value:.6f}",
        f"{subset}_patient_dice_median": "nan" if m.get("patient_dice_median") is None
        else f"{m['patient_dice_median']:.6f}",
        f"{subset}_n_patients": m.get("n_patients", 0), f"{subset}_data_version": ctx.version,
        f"{subset}_evaluation_run_id": res["run_id"]})
    return value


def _log_decision(settings: Settings, version_of_data: str, decision: model_registry.Decision, force: bool,
                  subset: str | None) -> None:
    tags = {**run_context.lineage_tags(version_of_data, settings.profile), "model_name": decision.name,
            "decision": decision.line()}
    with mlflow_runs.run(f"promote-{decision.name}", tags):
        mlflow_runs.log_params({"model_name": decision.name, "model_version": decision.version,
                             "gate_subset": subset or "none", "gate_metric": decision.metric, "force": force})
        mlflow_runs.log_active_metrics(run_metrics.clean_metrics({
            f"challenger_{decision.metric}": decision.score if decision.score is not None else float("nan"),
            f"champion_{decision.metric}": decision.champion_score if decision.champion_score is not None
            else float("nan"),
            "promoted": decision.promoted}))


def promote_segmenter(settings: Settings, ctx: DataContext, name: str, version: str, force: bool = False) -> dict:
    """The gate: challenger vs champion on evidence of the same kind (:mod:`brainseg.registry.evidence`):
    the validation patients of the current data version, or the out-of-fold predictions of the same folds."""
    subset = gate_subset(settings)
    mv = model_registry.get_version(name, version)  # a clear error before any evaluation
    champ = model_registry.champion(name)
    champ_version = champ.version if champ is not None else None
    metric = f"{subset}_patient_dice_mean"
    mine = evidence.of_tags(mv.tags)
    theirs = evidence.of_tags(champ.tags) if champ is not None else None
    if champ_version is not None and str(champ_version) == str(version):
        decision = model_registry.decide(name, version, metric, None, champ_version, None, force)
    elif mine.kind == "cv" or (theirs is not None and theirs.kind == "cv"):
        comparable, why = evidence.comparison(mine, theirs) if theirs is not None else (True, "")
        if comparable:
            decision = model_registry.decide(name, version, evidence.CV_METRIC, mine.score, champ_version,
                                             theirs.score if theirs else None, force)
        else:
            decision = model_registry.Decision(
                name, str(version), force, "--force" if force else f"{why}: `brainseg promote {name} {version} "
                "--force` decides", evidence.CV_METRIC if mine.kind == "cv" else metric, mine.score,
                theirs.score, str(champ_version))
        model_registry.apply(decision)
        _log_decision(settings, ctx.version, decision, force, "cv" if mine.kind == "cv" else subset)
    else:
        score = segmenter_score(settings, ctx, name, version, subset, "challenger")
        champ_score = (segmenter_score(settings, ctx, name, champ_version, subset, "champion")
                       if champ_version is not None and not force else None)
        decision = model_registry.decide(name, version, metric, score, champ_version, champ_score, force)
        model_registry.apply(decision)
        _log_decision(settings, ctx.version, decision, force, subset)
    return {"name": name, "version": str(version), "promoted": decision.promoted, "decision": decision.line()}


def segmenter_tags(run, ctx: DataContext, run_id: str) -> dict:
    """Lineage tags of a version from its training run; copied numbers keep their split in the name."""
    copied = {k: v for k, v in run.data.metrics.items()
              if k.startswith("best_val_patient_dice") or k in ("best_epoch", "epochs_run")}
    return {"data_version": run.data.tags.get("data_version", ctx.version),
            "git_commit": run.data.tags.get("git_commit", ""), "source_run_id": run_id,
            "study": run.data.tags.get("optuna.study", ""), "trial": run.data.tags.get("optuna.trial", ""),
            **{k: (f"{v:.0f}" if k in ("best_epoch", "epochs_run") else f"{v:.4f}") for k, v in copied.items()}}


def stored_inference(model_uri: str) -> dict:
    """The inference settings stored with a model (what every consumer of it applies)."""
    from brainseg.inference.segmenter import SETTINGS_FILE, read_settings

    return read_settings(next(model_registry.resolve_model_dir(model_uri).rglob(SETTINGS_FILE)))[1].to_dict()


def register_segmenter(settings: Settings, ctx: DataContext, run_id: str, model_uri: str, promote: bool = False,
                       force: bool = False, extra_tags: dict | None = None, trained_in: str | None = None) -> dict:
    """Register the model ``model_uri`` logged in run ``run_id`` and tag it with its validation score
    and its stored inference settings (and where they were chosen); gate it if ``promote``.

    ``trained_in``: the training run of the network when ``run_id`` only chose its inference
    settings (the lineage and best-epoch tags come from it)."""
    name = settings.register_.segmenter_name
    subset = gate_subset(settings)
    model_run = mlflow_runs.client().get_run(run_id)
    run = mlflow_runs.client().get_run(trained_in) if trained_in else model_run
    chosen_on = model_run.data.tags.get(CHOSEN_ON_TAG, "not recorded")
    inference = stored_inference(model_uri)
    tags = {**segmenter_tags(run, ctx, trained_in or run_id), CHOSEN_ON_TAG: chosen_on,
            **{f"inference.{k}": str(v) for k, v in inference.items()},
            **({"inference_run_id": run_id} if trained_in else {}), **(extra_tags or {})}
    params = run.data.params
    description = (f"Segmenter of LGG FLAIR abnormality: "
                   f"{model_name(params.get('arch'), params.get('encoder'), ' / ')}, "
                   f"{params.get('channels')} channels at {params.get('size')} px, trained on data "
                   f"{tags['data_version'][:12]}. Input: base64 TIFF/PNG slices; output: tumor features and mask.")
    cv = evidence.of_tags({**model_run.data.tags, **{k: str(v) for k, v in model_run.data.metrics.items()}})
    if cv.kind == "cv":  # its members trained on the validation patients: its evidence is out of fold
        subset = "cv"
        tags.update({evidence.EVIDENCE_TAG: "cv", evidence.KEY_TAG: cv.key, "cv_data_version": ctx.version,
                     **{k: f"{v:.6f}" if isinstance(v, float) else str(v) for k, v in model_run.data.metrics.items()
                        if k in ("cv_patient_dice_mean", "cv_patient_dice_median", "cv_n_patients")}})

    def finish(version: str) -> None:  # whole or nothing (registration.register_whole)
        model_registry.document_segmenter(name, version, run_id, ctx, trained_in)  # artifact + description
        if cv.kind != "cv":
            segmenter_score(settings, ctx, name, version, subset, "challenger")  # kept as version tags

    mv, created = register_whole(name, model_uri, run_id, tags, description, finish)
    score = cv.score if cv.kind == "cv" else segmenter_score(settings, ctx, name, mv.version, subset, "challenger")
    out = {"name": name, "version": str(mv.version), "created": created, f"{subset}_patient_dice_mean": score,
           f"{subset}_data_version": ctx.version, "inference": inference, CHOSEN_ON_TAG: chosen_on,
           "promoted": None,
           "decision": f"{name} v{mv.version}: {subset}_patient_dice_mean "
                       f"{'n/a' if score is None else f'{score:.4f}'}; registered, not put through the gate "
                       "(promotion off: register.promote, --promote or `brainseg promote`)"}
    if promote or force:
        out.update(promote_segmenter(settings, ctx, name, mv.version, force))
    return out


# ------------------------------------------------------------------------------------ survival
def _is_final(mv, settings: Settings) -> bool:
    final = settings.survival.final
    return mv.tags.get("classifier") == final.classifier and mv.tags.get("feature_set") == final.feature_set


def promote_survival(settings: Settings, name: str, version: str, force: bool = False) -> dict:
    """Promote the version fitted with the pre-registered ``survival.final`` (no score comparison)."""
    mv = model_registry.get_version(name, version)
    champ = model_registry.champion(name)
    champ_version = champ.version if champ is not None else None
    metric = "cv_roc_auc_mean"
    score = float(mv.tags.get(metric, "nan"))
    final = settings.survival.final
    d = model_registry.decide_preregistered(name, version, metric, score, _is_final(mv, settings),
                                            f"({final.classifier}, {final.feature_set})", champ_version, force)
    if d.reason != "already the champion":
        model_registry.apply(d)
        _log_decision(settings, mv.tags.get("data_version", ""), d, force, None)
    return {"name": name, "version": str(version), "promoted": d.promoted, "decision": d.line()}


def register_survival(settings: Settings, summary: dict, promote: bool = False, force: bool = False) -> dict:
    """Register the final survival pipeline with its cross-validated figures (``cv_*`` tags)."""
    name = settings.register_.survival_name
    run_id, model_uri = summary["final_run_id"], summary["final_model_uri"]
    final = summary["final"]
    run = mlflow_runs.client().get_run(run_id)
    tags = {"data_version": run.data.tags.get("data_version", ""), "git_commit": run.data.tags.get("git_commit", ""),
            "source_run_id": run_id, "features_from": summary["features_from"],
            "classifier": final["classifier"], "feature_set": final["feature_set"],
            "cv_roc_auc_mean": f"{final['roc_auc_mean']:.4f}",
            "cv_balanced_accuracy": f"{final['balanced_accuracy']:.4f}", "cv_brier": f"{final['brier']:.4f}"}
    description = (f"death01 classifier ({final['classifier']}, {final['feature_set']} features; imaging features "
                   f"from {summary['features_from']}). Research model, not a diagnosis. Input: per-patient tumor "
                   "features and data.csv fields; output: death01_probability and death01_class.")
    mv, created = register_whole(name, model_uri, run_id, tags, description,
                                 lambda version: model_registry.document_survival(name, version, run_id, summary))
    out = {"name": name, "version": str(mv.version), "created": created,
           "cv_roc_auc_mean": float(final["roc_auc_mean"]), "promoted": None,
           "decision": f"{name} v{mv.version}: cv_roc_auc_mean {final['roc_auc_mean']:.4f}; registered, not put "
                       "through the gate (promotion off)"}
    if promote or force:
        out.update(promote_survival(settings, name, mv.version, force))
    return out


def other_data_survival_champion(settings: Settings, data_version: str) -> str | None:
    """Where the data cannot give a survival model (no death01): a line naming the survival champion
    that stays although it was fitted on other data, or None (no champion, or one of this data)."""
    name = settings.register_.survival_name
    mv = model_registry.champion(name)
    if mv is None or mv.tags.get("data_version", "") == data_version:
        return None
    fitted = mv.tags.get("data_version") or "of unknown version"
    return (f"survival: {name}@champion (version {mv.version}) stays, fitted on other data ({fitted[:12]}; "
            f"this data is {data_version[:12]}): it was not made from these patients")


def promote(settings: Settings, name: str, version: str, force: bool = False, ctx: DataContext | None = None) -> dict:
    """``brainseg promote NAME VERSION``: the gate of whichever model ``name`` is."""
    reg = settings.register_
    if name == reg.segmenter_name:
        return promote_segmenter(settings, ctx or DataContext.from_settings(settings), name, version, force)
    if name == reg.survival_name:
        return promote_survival(settings, name, version, force)
    raise ValueError(f"unknown model {name!r}: register.segmenter_name is {reg.segmenter_name!r}, "
                     f"register.survival_name is {reg.survival_name!r}")
