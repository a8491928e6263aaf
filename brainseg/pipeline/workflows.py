"""Orchestration that spans several stages: the tuning study and what it hands on (the best
trial's post-processing choice), registration. One training run as records is
:mod:`brainseg.training.training_run`.

Evaluating a stored model as a run is :mod:`brainseg.evaluation.evaluate_run`; the registry gate is
:mod:`brainseg.registry.promotion`, which this module calls and which never calls back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from brainseg.data.context import DataContext
from brainseg.pipeline.study_evidence import noise_line, refit_cv, top_two_noise
from brainseg.registry import model_registry
from brainseg.registry.promotion import other_data_survival_champion, register_segmenter, register_survival
from brainseg.settings.config import Settings
from brainseg.settings.settings_io import ConfigError
from brainseg.tracking import mlflow_runs, run_context, run_metrics
from brainseg.training.budget import BudgetError
from brainseg.training.training_run import choose_and_score, log_model


def choose_for_best_trial(settings: Settings, ctx: DataContext, summary: dict, echo=print) -> dict:
    """The best trial's network with TTA and post-processing chosen on the validation patients, as
    a model of its own (run ``postprocessing-trial-NNN``, tagged with the study parent).

    Trials skip that choice (they are ranked by their best epoch's ``val_patient_dice``); the refit
    makes it for its own model. Without a refit this is the model the study hands on: the summary's
    ``best_model_uri`` becomes it (the trial's own model stays ``best_trial_model_uri``), so what is
    registered and reported on test is what was chosen on val.
    """
    trial_uri, number = summary["best_model_uri"], int(summary["best_trial"])
    # float32: only the stored network and its Train are wanted (no bfloat16 copy is built)
    trial = model_registry.load_segmenter(trial_uri, precision="float32")
    model, cfg = trial.model, trial.cfg
    tags = {**run_context.lineage_tags(ctx.version, settings.profile), "brainseg.role": "postprocessing",
            "brainseg.study_parent_run_id": summary["parent_run_id"], "optuna.study": summary["study"],
            "postprocessing_of_trial": str(number), "trial_run_id": summary["best_run_id"],
            "trial_model_uri": trial_uri}
    # its description comes from brainseg.tracking.run_notes, as for every run
    echo(f"trial {number}'s model: choosing TTA and post-processing on the validation patients")
    with mlflow_runs.run(f"postprocessing-trial-{number:03d}", tags) as active:
        mlflow_runs.log_params(run_metrics.train_config_params(cfg))
        segmenter, metrics, example = choose_and_score(settings, model, cfg, ctx)
        model_uri = log_model(model, cfg, segmenter, example, ctx)
    echo(f"chosen on val: {segmenter.settings.to_dict()}; val per-patient Dice "
         f"{metrics.get('patient_dice_mean', float('nan')):.3f}")
    return {"run_id": active.info.run_id, "model_uri": model_uri, "trial": number,
            "trial_run_id": summary["best_run_id"], "trial_model_uri": trial_uri,
            "inference": segmenter.settings.to_dict(),
            "val_patient_dice_mean": metrics.get("patient_dice_mean")}


class TuneRefused(ValueError):
    """Bad tuning input, or a study storage that cannot be opened: found before any trial ran."""


def tracked_tuning(settings: Settings, experiment: str, *, study_name: str | None = None, storage: str | None = None,
                   n_trials: float | None = None, timeout: float | None = None, create_only: bool = False,
                   refit: bool | None = None, register: bool | None = None, worker: int | None = None,
                   study_trials: int | None = None, settings_args: list[str] | None = None, echo=print) -> dict:
    """The tuning study of ``settings`` (``brainseg tune``): name it, check every input, then create or
    continue it (:func:`brainseg.tune.session.run_study`); returns its summary (``study`` names it).

    The default name is tune.study_name + profile + data version (+ the project run under
    ``mlflow run`` outside the pipeline, so each `mlflow run` gets its own study); ``refit`` and
    ``register`` default to tune.refit / tune.register (a worker never refits). Without a refit
    the best trial's TTA and post-processing are then chosen on val (:func:`choose_for_best_trial`).
    Raises :class:`TuneRefused` for bad input or an unreachable storage; anything later propagates.
    """
    from brainseg.tune.plan import plan_from_settings, study_budget  # Optuna: only tuning pays for it
    from brainseg.tune.session import run_study

    started = time.time()  # tune.budget_minutes counts from here
    try:
        ctx = DataContext.from_settings(settings)
        name = study_name or f"{settings.tune.study_name}-{settings.profile}-{ctx.version[:8]}"
        if not study_name and os.environ.get(run_context.PROJECT_ENV) and not os.environ.get(run_context.PIPELINE_ENV):
            name += f"-{os.environ[run_context.PROJECT_ENV][:8]}"  # each `mlflow run` its own study
        plan = plan_from_settings(settings, name, storage or None, int(n_trials or 0), float(timeout or 0))
        refit = settings.tune.refit if refit is None else refit
        if refit is True and settings.tune.refit == "cv":  # --refit: the kind is tune.refit's
            refit = "cv"
        register = settings.tune.register_ if register is None else register
        study_budget(plan, bool(refit) and worker is None)  # a budget that cannot hold the refit fails here
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        raise TuneRefused(str(exc)) from exc
    try:
        summary = run_study(plan, ctx, experiment, create_only=create_only, worker=worker, study_trials=study_trials,
                            refit=bool(refit) and refit != "cv" and worker is None, register=bool(register),
                            settings_args=settings_args or [], echo=echo, started=started)
    except BudgetError as exc:  # a budget that cannot hold the plan on this machine: before any trial
        raise TuneRefused(str(exc)) from exc
    except Exception as exc:  # storage unreachable, bad URL: before any trial started
        if ("sqlalchemy" in type(exc).__module__ or "OperationalError" in type(exc).__name__
                or isinstance(exc, ImportError)):
            raise TuneRefused(f"storage {plan.storage_url.split('@')[-1]!r}: cannot be opened ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]})") from exc
        raise
    if worker is None and summary.get("parent_run_id") and not create_only:
        summary["top_two"] = top_two_noise(experiment, summary["parent_run_id"])
        if noise_line(summary["top_two"]):
            echo(noise_line(summary["top_two"]))
        if refit == "cv" and summary.get("best_trial") is not None:
            summary["refit"] = refit_cv(settings, ctx, experiment, summary, bool(register), echo)
    if (summary.get("best_model_uri") and not summary.get("refit") and worker is None
            and settings.evaluate.select_postprocessing):
        chosen = choose_for_best_trial(settings, ctx, summary, echo)
        summary.update({"postprocessing": chosen, "best_trial_model_uri": summary["best_model_uri"],
                        "best_model_uri": chosen["model_uri"]})
    return summary


def register_models(settings: Settings, *, tune_summary: Path | None, run_id: str | None = None,
                    survival_summary: Path | None = None, promote: bool | None = None, force: bool = False,
                    echo=print) -> dict:
    """``brainseg register``: the segmenter of run ``run_id`` (else the model ``tune_summary`` hands
    on: the full-fidelity refit, or the best trial with TTA and post-processing chosen on val) and the
    survival model of ``survival_summary`` (skipped when missing, or when it says why the survival
    stage did not run), each tagged with its validation / CV figures and gated if ``promote``
    (default: register.promote). Returns each model's result; echoes each decision.
    FileNotFoundError / ValueError (with nothing registered) when there is nothing to register."""

    promote = settings.register_.promote if promote is None else promote
    results, trained_in = {}, None
    if run_id:
        logged = mlflow_runs.logged_models_of(run_id)
        if not logged:
            raise ValueError(f"run {run_id} has no logged model (a pruned or failed trial?); pick a completed run")
        model_uri = f"models:/{logged[0].model_id}"
    else:
        if not tune_summary or not tune_summary.is_file():
            raise FileNotFoundError(f"{tune_summary}: no tuning summary; run `brainseg tune` or pass --run RUN_ID")
        summary = json.loads(tune_summary.read_text())
        if not summary.get("best_run_id"):
            raise ValueError(f"{tune_summary}: the study has no completed trial to register")
        # the full-fidelity refit of the best trial, else the best trial's network with its
        # inference settings chosen on val (both choose TTA and post-processing on val patients)
        chosen = summary.get("refit") or summary.get("postprocessing") or {}
        run_id = chosen.get("run_id") or summary["best_run_id"]
        model_uri = chosen.get("model_uri") or summary["best_model_uri"]
        trained_in = chosen.get("trial_run_id")  # the trial run that trained the network, if not run_id
    ctx = DataContext.from_settings(settings)
    results["segmenter"] = register_segmenter(settings, ctx, run_id, model_uri, promote=promote, force=force,
                                              trained_in=trained_in)
    echo(results["segmenter"]["decision"])
    survival = json.loads(survival_summary.read_text()) if survival_summary and survival_summary.is_file() else None
    if survival and survival.get("skipped"):  # the survival stage did not run (brainseg survival --skip-unsupported)
        echo(f"survival: not registered: {survival['reason']}")
        stale = other_data_survival_champion(settings, ctx.version)
        if stale:
            echo(stale)
    elif survival:
        results["survival"] = register_survival(settings, survival, promote=promote, force=force)
        echo(results["survival"]["decision"])
    else:
        echo(f"survival: {survival_summary} not found, not registered")
    return results
