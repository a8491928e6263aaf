"""The refit: the study's best configuration trained again at full fidelity as one training run
(:func:`brainseg.training.training_run.tracked_training`), scored once on the test patients for the report,
registered if asked and linked to the study's run.

Every refit epoch is checkpointed like ``brainseg train``'s (``checkpoints/RUN_ID/``), with what
the refit still owes its study in the checkpoint (``meta["refit"]``): a refit killed mid-way is
continued by ``brainseg train --resume``, which then calls :func:`finish_refit` (registration and
the study run's tags) as the uninterrupted refit would have.
"""

from __future__ import annotations

import optuna

from brainseg.registry.promotion import register_segmenter
from brainseg.settings.config import EPOCH_SIZED, Settings, Train
from brainseg.tracking import mlflow_runs
from brainseg.training.checkpoint import DEFAULT_ROOT
from brainseg.tune.clock import Clock
from brainseg.tune.plan import StudyPlan, refit_epochs
from brainseg.tune.space import apply_params
from brainseg.tune.study_budget import refit_minutes


def refit_config(plan: StudyPlan, best: optuna.trial.FrozenTrial, minutes: float | None = None):
    """The best trial's parameters at full fidelity (``train`` settings). On a budget (``minutes``)
    it is the recipe's own run (its resolution schedule) for that many minutes; else it trains for
    as many batches as the trial did."""
    train = plan.settings.train.model_dump()
    if minutes is not None:
        return Train.from_dict({**apply_params(train, best.params), "budget_minutes": minutes})
    trial_epochs = max(best.intermediate_values) if best.intermediate_values else plan.fidelity.max_resource
    epochs = refit_epochs(trial_epochs, plan.fidelity.steps_per_epoch, plan.settings.train.steps_per_epoch)
    return Train.from_dict({**apply_params(train, best.params), "epochs": epochs, **EPOCH_SIZED})


def refit_best(plan: StudyPlan, ctx, study: optuna.Study, parent: str, register: bool, echo=print,
               clock: Clock | None = None, display: tuple[str, object] = ("lines", None)) -> dict:
    """Train the best configuration at full fidelity on the train patients (validation selects the
    epoch), score it once on the test patients for the report, register it if asked. On a budget it
    trains for the recipe's ``train.budget_minutes`` (less if the study has less left).
    ``display``: the progress mode and console (:func:`brainseg.tune.session.display`)."""
    from brainseg.training.progress_callbacks import epoch_progress
    from brainseg.training.training_run import tracked_training

    settings, best = plan.settings, study.best_trial
    minutes = None
    if clock is not None:
        reserve = float(plan.tune.reserve_minutes) * 60
        minutes = refit_minutes(settings.train.budget_minutes, clock.left(), reserve)
    cfg = refit_config(plan, best, minutes)
    length = f"{minutes:.1f} min" if minutes is not None else f"{cfg.epochs} epochs"
    echo(f"refit: trial {best.number}'s configuration at {cfg.size} px for {length}"
         + (f" ({clock.left() / 60:.1f} min of the study left)" if clock else ""))
    tags = {"mlflow.parentRunId": parent, "brainseg.study_parent_run_id": parent, "brainseg.role": "refit",
            "optuna.study": plan.study_name, "refit_of_trial": str(best.number),
            "fidelity": f"{cfg.size}px, " + (f"{minutes:.1f} min budget" if minutes is not None
                                              else f"<= {cfg.epochs} epochs")}
    owed = {"study": plan.study_name, "parent": parent, "trial": best.number, "register": register,
            "budget_minutes": minutes}
    mode, console = display
    shown = epoch_progress(cfg.epochs, mode, write=echo, console=console, label="refit")
    res = tracked_training(settings, cfg, ctx, run_name=f"refit-trial-{best.number:03d}", tags=tags, verbose=0,
                           callbacks=[shown], report_test=True,  # test_*: for the report only; no decision
                           checkpoints=DEFAULT_ROOT, checkpoint_meta={"refit": owed})
    return finish_refit(owed, settings, ctx, cfg, res)


def finish_refit(owed: dict, settings: Settings, ctx, cfg: Train, res: dict) -> dict:
    """What a finished refit run ``res`` owes its study (``owed``: study, parent run, trial,
    register): the registration if asked, the study run's tags and metric. The refit's summary."""
    parent, trial, m = owed["parent"], owed["trial"], res["metrics"]
    out = {"run_id": res["run_id"], "model_uri": res["model_uri"], "trial": trial,
           "epochs": int(res["budget"].get("budget_planned_epochs", cfg.epochs)),
           "budget_minutes": owed.get("budget_minutes"), "size": cfg.size, "best_epoch": res["best_epoch"],
           "val_patient_dice_mean": m.get("patient_dice_mean"),
           "test_patient_dice_mean": m.get("test_patient_dice_mean"),
           "inference": res.get("inference")}
    if owed.get("register"):
        out["registered"] = register_segmenter(settings, ctx, res["run_id"], res["model_uri"], extra_tags={
            "study_parent_run_id": parent, "study": owed["study"], "refit_of_trial": str(trial)})
    mlflow_runs.set_tags(parent, {"refit_run_id": res["run_id"], "refit_model_uri": res["model_uri"],
                                  **({"refit_model_version": out["registered"]["version"]}
                                     if "registered" in out else {})})
    mlflow_runs.log_metrics_to(parent, {"refit_val_patient_dice_mean": out["val_patient_dice_mean"] or float("nan")})
    return out
