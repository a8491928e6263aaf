"""The segmenter's commands: train, evaluate, tune, predict, register, promote."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress

from brainseg.cli.common import (
    EXPERIMENT,
    ProfileOpt,
    SetOpt,
    console,
    fail,
    out,
    print_metrics,
    settings_or_fail,
    writable_folder_or_fail,
)

# Deferred into the commands: brainseg.{tracking,workflows,evaluate_run,promotion,predict,models,data.context}
# pull in TensorFlow, MLflow, Optuna or pandas (`brainseg --help` stays fast), and brainseg.training.progress
# is train's alone (at module level it would become code of every DVC stage).


def evaluate(model: Annotated[str, typer.Option(help="Model: a folder/.h5, runs:/ID/model or models:/NAME@ALIAS.")]
             = "models:/brainseg-segmenter@champion",
             subset: Annotated[Optional[str], typer.Option(help="train, val, test, all (default: evaluate.subset, "
                                                           "val). Metrics are logged as SUBSET_*.")] = None,
             folder: Annotated[Optional[Path], typer.Option(help="Evaluate on all patients of this folder "
                                                            "(public layout) instead of the split.")] = None,
             output: Annotated[Path, typer.Option("--out", help="Where metrics.json and CSVs go.")]
             = Path("reports/evaluate"),
             tune_summary: Annotated[Optional[Path], typer.Option("--tune", help="Evaluate the best trial of this "
                                                                  "`brainseg tune` summary instead of --model.")]
             = None,
             skip_unlabelled: Annotated[bool, typer.Option("--skip-unlabelled", help="If the subset's masks are "
                                                           "missing or unreadable, write a report saying so and "
                                                           "exit 0 (the pipeline's test report).")] = False,
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Per-patient volume Dice (mean, median), IoU, tumor-slice Dice, empty-slice FP rate, baseline."""
    from brainseg.data.context import DataContext
    from brainseg.evaluation.evaluate_run import (
        MasksUnavailable,
        scored_name,
        tracked_evaluation,
        write_unavailable_report,
    )
    from brainseg.tracking import mlflow_runs

    settings = settings_or_fail(profile, set_)
    subset = "test" if folder else subset or settings.evaluate.subset  # a folder's patients: its "test"
    label, described = scored_name(subset, folder)
    if tune_summary is not None:
        best = json.loads(tune_summary.read_text()) if tune_summary.is_file() else {}
        if not best.get("best_model_uri"):
            fail(f"{tune_summary}: no completed trial with a model (run `brainseg tune`)", 2)
        model = (best.get("refit") or {}).get("model_uri") or best["best_model_uri"]  # the refit, if any
    writable_folder_or_fail(output)  # before the model loads, and before any run
    try:
        ctx = (DataContext.from_folder(folder, Path(settings.data.cache_dir)) if folder
               else DataContext.from_settings(settings))
        mlflow_runs.set_experiment(EXPERIMENT)
        res = tracked_evaluation(settings, model, ctx, subset, out_dir=output, folder=folder)
    except MasksUnavailable as exc:
        if not skip_unlabelled:
            fail(str(exc), 2)
        write_unavailable_report(output, label, str(exc))
        out.print(f"{exc}: no {described} report (nothing else depends on it) -> {output / 'metrics.json'}")
        return
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    except OSError as exc:  # a full --out (a read-only one is refused above): the run ends FAILED
        fail(f"evaluate: cannot write into {output}: {exc.strerror or exc}"
             + (f" ({exc.filename})" if exc.filename else ""), 1)
    print_metrics(res["metrics"], f"{model} on {folder or subset}")
    out.print(f"run {res['run_id']}; metrics -> {output / 'metrics.json'}")


def tune(profile: ProfileOpt = None, set_: SetOpt = None,
         study_name: Annotated[Optional[str], typer.Option(help="Default: tune.study_name + profile + data version "
                                                           "(+ the project run under `mlflow run`).")] = None,
         storage: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL (sqlite:///optuna.db, postgresql://...), "
                                                     "journal:FILE, or where a URL with a password is: env:VAR "
                                                     "(an environment variable) or file:PATH (default: "
                                                     "tune.storage).")] = None,
         n_trials: Annotated[Optional[float], typer.Option(help="Trials to add, all workers together (default: the "
                                                           "profile's).")] = None,
         timeout: Annotated[Optional[float], typer.Option(help="Seconds for the search (default: the "
                                                          "profile's).")] = None,
         create_only: Annotated[bool, typer.Option(help="Create the study and its parent run, then exit "
                                                   "(run once before starting several workers).")] = False,
         refit: Annotated[Optional[bool], typer.Option(help="Train the best configuration at full fidelity "
                                                       "afterwards (default: tune.refit).")] = None,
         register: Annotated[Optional[bool], typer.Option(help="Register the refit model (default: "
                                                          "tune.register).")] = None,
         worker: Annotated[Optional[int], typer.Option(help="Run as worker K of a shared study: trials only.")] = None,
         study_trials: Annotated[Optional[int], typer.Option(hidden=True)] = None,
         output: Annotated[Path, typer.Option("--out", help="Summary JSON (best trial, run, model).")]
         = Path("reports/tune.json")):
    """Optuna search (multi-fidelity, from the hand-set recipe), then a full-fidelity refit; MLflow runs.

    The refit is checkpointed every epoch: if it is killed, `brainseg train --resume` finishes it."""
    from brainseg.pipeline.workflows import TuneRefused, tracked_tuning
    from brainseg.tracking import mlflow_runs

    settings = settings_or_fail(profile, set_)
    settings_args = [*(["--profile", profile] if profile else []), *[a for s in set_ or [] for a in ("--set", s)]]
    try:
        summary = tracked_tuning(settings, EXPERIMENT, study_name=study_name, storage=storage, n_trials=n_trials,
                                 timeout=timeout, create_only=create_only, refit=refit, register=register,
                                 worker=worker, study_trials=study_trials, settings_args=settings_args,
                                 echo=out.print)
    except TuneRefused as exc:
        fail(str(exc), 2)
    except mlflow_runs.TrackingLost as exc:  # the refit's: its work is kept in its checkpoint
        fail(str(exc), 75)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2, default=str))
    name = summary["study"]
    if create_only:
        out.print(f"study {name} ready (parent run {summary['parent_run_id']}); start workers with "
                  f"`brainseg tune --study-name {name} --storage ... --worker K`")
        return
    if worker is not None:
        return
    states = ", ".join(f"{k.lower()} {v}" for k, v in summary["states"].items() if v)
    out.print(f"study {name}: {summary['trials']} trials ({states}); parent run {summary['parent_run_id']}")
    if "best_trial" in summary:
        out.print(f"best: trial {summary['best_trial']}, val per-patient Dice {summary['best_value']:.3f}, "
                  f"run {summary['best_run_id']}")
    if "refit" in summary:
        r = summary["refit"]
        test = r.get("test_patient_dice_mean")
        out.print(f"refit of trial {r['trial']} at {r['size']} px: val per-patient Dice "
                  f"{r['val_patient_dice_mean'] or float('nan'):.3f} (best epoch {r['best_epoch']} of {r['epochs']}), "
                  f"test {'n/a' if test is None else f'{test:.3f}'} (report only); run {r['run_id']}"
                  + (f"; registered version {r['registered']['version']}" if r.get("registered") else ""))
    if "minutes" in summary:
        out.print(f"study time {summary['minutes']:.1f} min of its {settings.tune.budget_minutes:g}-min budget")


def register(tune_summary: Annotated[Optional[Path], typer.Option("--tune", help="Summary of `brainseg tune`.")]
             = Path("reports/tune.json"),
             run_id: Annotated[Optional[str], typer.Option("--run", help="Register this training run instead.")] = None,
             survival_summary: Annotated[Optional[Path], typer.Option("--survival", help="Summary of `brainseg "
                                                                     "survival` (skipped when missing).")]
             = Path("reports/survival/cv.json"),
             promote: Annotated[Optional[bool], typer.Option("--promote/--no-promote", help="Put the new versions "
                                                             "through the promotion gate (default: register.promote).")]
             = None,
             force: Annotated[bool, typer.Option(help="Make the new versions champion whatever the scores.")] = False,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/register.json"),
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Register the best trial's segmenter and the survival model, tagged with their validation / CV
    figures. `@champion` moves only with --promote (or register.promote: true), through the gate."""
    from brainseg.pipeline.workflows import register_models
    from brainseg.tracking import mlflow_runs

    settings = settings_or_fail(profile, set_)
    mlflow_runs.set_experiment(EXPERIMENT)
    try:
        results = register_models(settings, tune_summary=tune_summary, run_id=run_id,
                                  survival_summary=survival_summary, promote=promote, force=force, echo=out.print)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
        fail(str(exc), 2)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))


@contextlib.contextmanager
def _progress_bar(total: int):
    """A transient bar on stderr; yields ``advance(n)``."""
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"segmenting {total} slices", total=total)
        yield lambda n: bar.advance(task, n)


def predict(output: Annotated[Path, typer.Option("--out", help="Folder for masks, overlays and CSVs.")],
            inputs: Annotated[Optional[list[Path]], typer.Argument(help="Slice files (.tif/.png) or folders, any "
                                                                   "nesting (or a patient's volumes: --flair).")]
            = None,
            flair: Annotated[Optional[Path], typer.Option(help="A patient's FLAIR volume: a .nii/.nii.gz file or a "
                                                          "folder holding one DICOM series (docs/scans.md).")] = None,
            pre: Annotated[Optional[Path], typer.Option(help="Pre-contrast T1 volume, as --flair (3-channel models).")]
            = None,
            post: Annotated[Optional[Path], typer.Option(help="Post-contrast T1 volume, as --flair (3-channel "
                                                         "models).")] = None,
            resample: Annotated[bool, typer.Option(help="Resample --pre/--post onto the FLAIR's grid when they are "
                                                   "on another (default: refuse them).")] = False,
            name: Annotated[Optional[str], typer.Option(help="Patient name for a volume's outputs (default: from "
                                                        "the --flair file or folder name).")] = None,
            model: Annotated[str, typer.Option(help="Folder/.h5, runs:/ID/model or models:/NAME@ALIAS.")]
            = "models:/brainseg-segmenter@champion",
            survival_model: Annotated[Optional[str], typer.Option("--survival-model")]
            = "models:/brainseg-survival@champion",
            with_survival: Annotated[bool, typer.Option("--survival", help="Add each patient's predicted death01 "
                                                        "probability (needs data.csv beside the slices or "
                                                        "--clinical).")] = False,
            clinical_csv: Annotated[Optional[Path], typer.Option("--clinical")] = None,
            threshold: Optional[float] = None,
            profile: ProfileOpt = None, set_: SetOpt = None):
    """Segment slices: <stem>_pred.png masks, overlays, features.csv (per slice), patients.csv (per patient).

    With --flair (--pre, --post): a patient's NIfTI/DICOM volumes; the mask also as <name>_mask.nii.gz."""
    from brainseg.pipeline.predict import ModelNotFound, collect_inputs, predict_to_folder

    settings_or_fail(profile, set_)
    if threshold is not None and not 0.0 < threshold < 1.0:  # NaN fails this too
        fail(f"--threshold: {threshold} is not in (0, 1)", 2)
    if flair is not None or pre is not None or post is not None:
        if inputs:
            fail("give slice files or a patient's volumes (--flair), not both", 2)
        if with_survival:
            fail("--survival reads the pixel features of Kaggle slices: not offered for --flair volumes", 2)
        _predict_volumes(flair, pre, post, output, model, resample=resample, name=name, threshold=threshold)
        return
    if not inputs:
        fail("nothing to segment: give slice files or folders, or a patient's volumes with --flair", 2)
    files, problems = collect_inputs(inputs, exclude=[output])  # never read our own outputs
    if not files:
        for p in problems:
            console.print(p, markup=False)
        fail("no slice files (.tif, .tiff, .png) found in the inputs", 2)
    writable_folder_or_fail(output)  # before the model loads
    try:
        pred = predict_to_folder(files, output, model, threshold=threshold, with_survival=with_survival,
                                 survival_model=survival_model, clinical_csv=clinical_csv, progress=_progress_bar)
    except ModelNotFound as exc:
        fail(str(exc), 2)
    except OSError as exc:  # a read-only folder, a full disk: the files written before are whole
        where = f" ({exc.filename})" if exc.filename else ""
        fail(f"predict: cannot write into {output}: {exc.strerror or exc}{where}; "
             "the files written before it are complete", 1)
    problems += pred.problems
    out.print(f"{len(pred.slices)} slices, {len(pred.patients)} patients -> {output} "
              f"(masks *_pred.png, overlays *_overlay.png, features.csv, patients.csv); model {model}")
    for note in pred.notes:  # spacing unknown: the physical columns are empty
        out.print(note, markup=False, highlight=False)
    for p in problems:
        console.print(f"BAD {p}", markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)


def _predict_volumes(flair: Optional[Path], pre: Optional[Path], post: Optional[Path], output: Path, model: str, *,
                     resample: bool, name: Optional[str], threshold: Optional[float]) -> None:
    """``brainseg predict --flair ...``: one line and exit 2 for a bad scan or a model it cannot feed."""
    from brainseg.pipeline.predict_scan import BadScan, ModelNotFound, ScanRefused, predict_scan_to_folder

    if flair is None:
        fail("--pre/--post need --flair (the FLAIR volume every model reads)", 2)
    writable_folder_or_fail(output)
    try:
        pred = predict_scan_to_folder(flair, output, model, pre=pre, post=post, resample=resample, name=name,
                                      threshold=threshold, progress=_progress_bar)
    except (BadScan, ScanRefused, ModelNotFound) as exc:
        fail(str(exc), 2)
    except OSError as exc:  # a full disk: nothing was moved into --out
        fail(f"predict: cannot write into {output}: {exc.strerror or exc}; nothing was written", 1)
    row = pred.patients.iloc[0]
    size = (f"tumor {row['tumor_volume_ml']:.2f} mL ({int(row['tumor_volume_px'])} voxels of {row['spacing_mm']} mm)"
            if row["spacing_mm"] != "unknown" else f"tumor {int(row['tumor_volume_px'])} voxels (no spacing: no mL)")
    out.print(f"{row['patient']}: {len(pred.slices)} slices, {size} -> {output / row['mask_file']}"
              + (f" and {row['seg_file']}" if row["seg_file"] else "") + f"; model {model}",
              markup=False, highlight=False)
    for p in pred.problems:
        console.print(f"BAD {p}", markup=False, highlight=False)
    if pred.problems:
        raise typer.Exit(1)


def promote(name: Annotated[str, typer.Argument(help="Registered model: register.segmenter_name or survival_name.")],
            version: Annotated[str, typer.Argument(help="Its version number.")],
            force: Annotated[bool, typer.Option(help="Make it champion whatever the gate says.")] = False,
            profile: ProfileOpt = None, set_: SetOpt = None):
    """Put a registered version through the promotion gate; `@champion` moves to it only if it passes.

    Segmenter: challenger vs champion on the validation patients of the current data version.
    Survival: the version fitted with the pre-registered survival.final (no AUC comparison).
    """
    from brainseg.registry.promotion import promote as gate
    from brainseg.tracking import mlflow_runs

    settings = settings_or_fail(profile, set_)
    mlflow_runs.set_experiment(EXPERIMENT)
    try:
        result = gate(settings, name, version, force=force)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    out.print(result["decision"])
