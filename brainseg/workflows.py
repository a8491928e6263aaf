"""Tracked workflows shared by the CLI, the tuner and the pipeline: train + log, evaluate + log."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow

from brainseg import plots, tracking
from brainseg.config import TrainConfig, flatten
from brainseg.data.context import DataContext
from brainseg.evaluate import EvalSettings, evaluate
from brainseg.train import save_model, train


def tracked_training(settings: dict, cfg: TrainConfig, ctx: DataContext, *, run_name: str = "train",
                     nested: bool = False, callbacks: list | None = None, tags: dict | None = None,
                     verbose: int = 1, on_result=None, finished_on: tuple = ()) -> dict:
    """Train ``cfg`` as one MLflow run with params, per-epoch metrics, artifacts and the model.

    Returns run_id, model_uri, best_epoch, val_patient_dice (best epoch, network size) and the
    full-size validation metrics. ``on_result`` gets the TrainResult before artifacts are logged.
    """
    all_tags = {**tracking.lineage_tags(ctx.version, settings), **(tags or {})}
    with tracking.run(run_name, all_tags, nested=nested, finished_on=finished_on) as active:
        tracking.log_params({**tracking.train_config_params(cfg), "profile": settings.get("profile"),
                             **{f"split.{k}": v for k, v in flatten(settings.get("split", {})).items()}})
        train_rows, val_rows = ctx.rows("train"), ctx.rows("val")
        tracking.log_dataset_input(train_rows, ctx.root, ctx.version, "training")
        tracking.log_dataset_input(val_rows, ctx.root, ctx.version, "validation")
        tr, va = ctx.arrays("train", cfg), ctx.arrays("val", cfg)
        result = train(cfg, tr, va, callbacks=[tracking.epoch_logger(), *(callbacks or [])], verbose=verbose)
        if on_result:
            on_result(result)
        mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                            "best_val_patient_dice": result.best_value})
        tracking.log_figure(plots.learning_curves(result.history), "learning_curves.png")
        ev_settings = EvalSettings.from_dict({**settings.get("evaluate", {}), "threshold": cfg.threshold})
        truths = ctx.truths("val")
        ev = evaluate(result.model, cfg, val_rows, va.X, truths, ev_settings)
        from brainseg.data.arrays import load_full_images

        metrics = tracking.log_evaluation(ev, "val_", load_full_images(val_rows), truths)
        with tempfile.TemporaryDirectory() as tmp:
            save_model(result.model, cfg, Path(tmp))
            example = load_full_images(val_rows.head(1))[0]
            model_uri = tracking.log_segmenter_model(Path(tmp), example, {"data_version": ctx.version})
        return {"run_id": active.info.run_id, "model_uri": model_uri, "best_epoch": result.best_epoch,
                "val_patient_dice": result.best_value, "metrics": metrics}


def tracked_evaluation(settings: dict, model_uri: str, ctx: DataContext, subset: str, ev: EvalSettings,
                       out_dir: Path | None = None, tags: dict | None = None) -> dict:
    """Evaluate a model on ``subset`` as an MLflow run; writes metrics.json and per-patient CSV."""
    from brainseg.data.arrays import load_full_images
    from brainseg.serving import load_segmenter

    model, cfg = load_segmenter(model_uri)
    rows = ctx.rows(subset)
    if rows.empty:
        raise ValueError(f"evaluate: subset {subset!r} has no slices")
    arrays = ctx.arrays(subset, cfg)
    truths = ctx.truths(subset)
    result = evaluate(model, cfg, rows, arrays.X, truths, ev)
    all_tags = {**tracking.lineage_tags(ctx.version, settings), "model_uri": model_uri, "subset": subset,
                **(tags or {})}
    with tracking.run(f"evaluate-{subset}", all_tags) as active:
        tracking.log_params({f"evaluate.{k}": v for k, v in vars(ev).items()} | {"subset": subset,
                                                                                 "model_uri": model_uri})
        tracking.log_dataset_input(rows, ctx.root, ctx.version, subset)
        metrics = tracking.log_evaluation(result, "", load_full_images(rows), truths)
    metrics = {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        result.patients.to_csv(out_dir / "per_patient.csv", index=False)
        result.slices.drop(columns=["image_path"]).to_csv(out_dir / "per_slice.csv", index=False)
    return {"run_id": active.info.run_id, "metrics": metrics, "result": result}


def register_segmenter(settings: dict, ctx: DataContext, run_id: str, model_uri: str, force: bool = False,
                       extra_tags: dict | None = None) -> dict:
    """Register a training run's model; promote it to champion if it beats the champion on the same set."""
    from brainseg import registry

    name = settings["register"]["segmenter_name"]
    subset = settings["register"]["subset"]
    run = tracking.client().get_run(run_id)
    val = {k: v for k, v in run.data.metrics.items() if k.startswith("val_patient") or k == "best_val_patient_dice"}
    tags = {"data_version": run.data.tags.get("data_version", ctx.version),
            "git_commit": run.data.tags.get("git_commit", ""), "source_run_id": run_id,
            "study": run.data.tags.get("optuna.study", ""), "trial": run.data.tags.get("optuna.trial", ""),
            **{k: f"{v:.4f}" for k, v in val.items()}, **(extra_tags or {})}
    params = run.data.params
    description = (f"Segmenter of LGG FLAIR abnormality: {params.get('arch')} / {params.get('encoder')}, "
                   f"{params.get('channels')} channels at {params.get('size')} px, trained on data "
                   f"{tags['data_version'][:12]}. Input: base64 TIFF/PNG slices; output: tumor features and mask.")
    mv, created = registry.register(name, model_uri, run_id, tags, description)
    ev = EvalSettings.from_dict(settings["evaluate"])
    challenger = tracked_evaluation(settings, f"models:/{name}/{mv.version}", ctx, subset, ev,
                                    tags={"role": "challenger"})["metrics"]
    champ = registry.champion(name)
    champ_score = None
    if champ is not None and champ.version != mv.version:
        champ_score = tracked_evaluation(settings, f"models:/{name}/{champ.version}", ctx, subset, ev,
                                         tags={"role": "champion"})["metrics"]["patient_dice_mean"]
    elif champ is not None:
        champ_score = challenger["patient_dice_mean"]
    decision = registry.decide(name, mv.version, challenger["patient_dice_mean"] or 0.0,
                               champ.version if champ else None, champ_score, force)
    registry.apply(decision)
    with tracking.run(f"register-{name}", {**tracking.lineage_tags(ctx.version, settings), "model_name": name}):
        tracking.log_params({"model_name": name, "version": mv.version, "source_run_id": run_id,
                             "evaluation_subset": subset, "force": force, "created": created})
        mlflow.log_metrics(tracking.clean_metrics({"challenger_patient_dice_mean": decision.challenger_score,
                                                   "champion_patient_dice_mean": decision.champion_score
                                                   if decision.champion_score is not None else float("nan"),
                                                   "promoted": decision.promoted}))
        mlflow.set_tag("decision", decision.line())
    return {"name": name, "version": mv.version, "created": created, "promoted": decision.promoted,
            "decision": decision.line()}


def register_survival(settings: dict, summary: dict, force: bool = False) -> dict:
    """Register the final survival pipeline; champion if its cross-validated ROC-AUC is higher.

    Both scores are cross-validated AUCs logged with each version; they are comparable when the
    versions share a data version (the tags say which).
    """
    from brainseg import registry

    name = settings["register"]["survival_name"]
    run_id, model_uri = summary["final_run_id"], summary["final_model_uri"]
    final = summary["final"]
    run = tracking.client().get_run(run_id)
    tags = {"data_version": run.data.tags.get("data_version", ""), "git_commit": run.data.tags.get("git_commit", ""),
            "source_run_id": run_id, "features_from": summary["features_from"],
            "classifier": final["classifier"], "feature_set": final["feature_set"],
            "roc_auc_mean": f"{final['roc_auc_mean']:.4f}", "balanced_accuracy": f"{final['balanced_accuracy']:.4f}",
            "brier": f"{final['brier']:.4f}"}
    description = (f"death01 classifier ({final['classifier']}, {final['feature_set']} features; imaging features "
                   f"from {summary['features_from']}). Research model, not a diagnosis. Input: per-patient tumor "
                   "features and data.csv fields; output: death01_probability and death01_class.")
    mv, created = registry.register(name, model_uri, run_id, tags, description)
    champ = registry.champion(name)
    champ_score = float(champ.tags.get("roc_auc_mean", "nan")) if champ is not None else None
    decision = registry.decide(name, mv.version, float(final["roc_auc_mean"]), champ.version if champ else None,
                               champ_score, force)
    registry.apply(decision)
    return {"name": name, "version": mv.version, "created": created, "promoted": decision.promoted,
            "decision": decision.line()}
