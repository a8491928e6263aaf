"""Training commands: ``brainseg train`` (one segmenter, resumable) and ``brainseg checkpoints``."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from brainseg.cli.common import EXPERIMENT, ProfileOpt, SetOpt, fail, out, print_metrics, settings_or_fail
from brainseg.settings.architectures import model_name
from brainseg.settings.config import Train, validate_settings
from brainseg.settings.locks import holder_line
from brainseg.settings.settings_io import ConfigError
from brainseg.tracking import run_notes
from brainseg.training.budget import BudgetError, parse_budget
from brainseg.training.checkpoint import (
    DEFAULT_ROOT,
    Checkpoint,
    CheckpointError,
    interrupted,
    resume_command,
)
from brainseg.training.full_disk import DiskFull

# Deferred into the commands: brainseg.{tracking.mlflow_runs, training.training_run, data.context, models}
# pull in TensorFlow, MLflow or pandas (`brainseg --help` stays fast), and brainseg.training.progress_callbacks
# is train's alone.


def train_command(
        profile: ProfileOpt = None, set_: SetOpt = None,
        budget: Annotated[Optional[str], typer.Option(help="Wall-clock budget of the training, e.g. 45m, 1.5h, "
                                                      "90s (sets train.budget_minutes; overrides epochs).")] = None,
        test_report: Annotated[bool, typer.Option(help="Score the test patients at the end (report only; "
                                                  "--no-test-report for ablations that must not see them).")] = True,
        progress: Annotated[str, typer.Option(help="Epoch progress: auto (a bar on a terminal, one line per "
                                              "epoch otherwise), bar, lines or none.")] = "auto",
        keras_verbose: Annotated[Optional[int], typer.Option("--verbose", hidden=True,
                                                             help="Old spelling: 0 none, 1 bar, 2 lines.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last saved "
                                             "epoch, in the same MLflow run, with its own settings "
                                             "(`brainseg checkpoints` lists them).")] = False,
        run: Annotated[Optional[str], typer.Option("--run", help="With --resume: the run to continue (default: "
                                                   "the newest checkpoint).")] = None,
        checkpoint_dir: Annotated[Path, typer.Option(help="Where every epoch is saved while the run lasts "
                                                     "(removed when it finishes).")] = DEFAULT_ROOT):
    """Train one segmenter on the train patients, select the best epoch on val, log it all to MLflow."""
    from brainseg.data.context import DataContext
    from brainseg.models.factory import check_names
    from brainseg.tracking import mlflow_runs
    from brainseg.training.progress_callbacks import epoch_progress
    from brainseg.training.training_run import tracked_training

    state = None
    if resume:
        if profile or set_ or budget:
            fail("--resume continues the run with its own settings: drop --profile, --set and --budget", 2)
        ckpt, state = reopen_or_fail(checkpoint_dir, run)
        test_report = bool(ckpt.meta.get("report_test", test_report))
    else:
        settings = settings_or_fail(profile, set_)
    try:
        if state is not None:  # the settings it ran with, checked as params.yaml is
            settings = validate_settings(ckpt.meta["settings"])
        if budget not in (None, ""):  # "" = the settings' own (as `mlflow run -e train` passes it)
            settings = settings.with_changes(train={"budget_minutes": parse_budget(budget)})
        cfg = settings.train
        check_names(cfg.arch, cfg.encoder)
        ctx = DataContext.from_settings(settings)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    if state is not None:
        verify_or_fail(ckpt, state, cfg)
    experiment = mlflow_runs.set_experiment(EXPERIMENT)
    try:
        if keras_verbose is not None:  # `train --verbose N` (before --progress existed)
            progress = {0: "none", 1: "bar"}.get(keras_verbose, "lines")
        bar = epoch_progress(cfg.epochs, progress, console=out)
    except ValueError as exc:
        fail(str(exc), 2)

    if state is not None and ctx.version != ckpt.meta.get("data_version"):
        fail(f"--resume: run {ckpt.run_id} trained on data version {str(ckpt.meta.get('data_version'))[:12]}, "
             f"the data here is {ctx.version[:12]}", 2)
    try:
        name = ckpt.meta.get("run_name", "train") if state is not None else f"train-{model_name(cfg.arch, cfg.encoder)}"
        res = tracked_training(settings, cfg, ctx, run_name=name, verbose=0,
                               callbacks=[bar] if bar else [], report_test=test_report,
                               checkpoints=checkpoint_dir, resume=(ckpt, state) if state is not None else None)
    except BudgetError as exc:
        fail(str(exc), 2)
    except (mlflow_runs.TrackingLost, DiskFull) as exc:
        fail(str(exc), 75)  # EX_TEMPFAIL: try again later
    owed = ckpt.meta.get("refit") if state is not None else None
    if owed:  # a tuning refit: what `brainseg tune` would have done after it
        from brainseg.tune.refit import finish_refit

        r = finish_refit(owed, settings, ctx, cfg, res)
        out.print(f"refit of trial {r['trial']} of study {owed['study']} finished; its study run {owed['parent']} "
                  "links to it" + (f"; registered version {r['registered']['version']}" if r.get("registered") else ""))
    m = res["metrics"]
    out.print(f"run {res['run_id']}: best epoch {res['best_epoch']}; inference settings chosen on val: "
              + ", ".join(f"{k}={v}" for k, v in res["inference"].items() if k != "batch_size"))
    out.print(f"validation per-patient Dice mean {m['patient_dice_mean']:.3f} / median "
              f"{m['patient_dice_median']:.3f} (n={m['n_patients']} patients), empty-slice FP rate "
              f"{m['empty_slice_fp_rate']:.3f} (n={m['n_empty_slices']})")
    if "test_patient_dice_mean" in m:
        out.print(f"test (report only, chose nothing): per-patient Dice mean {m['test_patient_dice_mean']:.3f} / "
                  f"median {m['test_patient_dice_median']:.3f} (n={m['test_n_patients']}), tumor-slice Dice "
                  f"{m['test_tumor_slice_dice_mean']:.3f}, empty-slice FP rate {m['test_empty_slice_fp_rate']:.3f} "
                  f"(n={m['test_n_empty_slices']})")
    b = res.get("budget") or {}
    if cfg.budget_minutes:
        out.print(f"budget {cfg.budget_minutes:g} min: {b['actual_steps']} of {b['budget_planned_steps']} planned "
                  f"steps, {b['slices_seen']} slices seen at {b['slices_per_s']:.1f} slices/s, training took "
                  f"{b['train_minutes']:.1f} min")
    out.print(f"model: {res['model_uri']}")
    out.print(f"in the MLflow UI (`mlflow ui` on this store): {run_notes.ui_link(experiment.experiment_id)}",
              markup=False, highlight=False)


def reopen_or_fail(root: Path, run_id: str | None):
    """The checkpoint ``--resume`` continues, locked for this process: run ``run_id``'s, else the
    newest under ``root`` that no other process is training (refused naming the holder when
    another process trains it)."""
    if run_id is None:
        found = [(c, st) for c, st in interrupted(root) if "error" not in st]
        if not found:
            fail(f"--resume: no checkpoint under {root}/ (a finished run leaves none; see `brainseg checkpoints`)", 2)
        idle = [c for c, st in found if st.get("running") is None]
        run_id = (idle or [found[0][0]])[0].run_id  # all busy: the newest, refused naming its holder
    try:
        return Checkpoint.reopen(root, run_id)
    except CheckpointError as exc:
        fail(f"--resume: {exc}", 2)


def verify_or_fail(ckpt: Checkpoint, state: dict, cfg: Train) -> None:
    """The checkpoint checked whole against the network its settings build, before the MLflow run is
    reopened: a refusal (exit 2, one line naming the file) leaves the run as it was."""
    from brainseg.models.factory import build_model

    try:
        shapes = [tuple(w.shape) for w in build_model(cfg).get_weights()]
        ckpt.verify(state, shapes, None if cfg.budget_minutes else cfg.epochs, model_name(cfg.arch, cfg.encoder, "/"))
    except (CheckpointError, ValueError, OSError) as exc:
        fail(f"--resume: {exc}", 2)


def checkpoints(checkpoint_dir: Annotated[Path, typer.Option(help="The folder `brainseg train` saved into.")]
                = DEFAULT_ROOT):
    """List interrupted training runs (their checkpoints) and the command that resumes each."""
    found = interrupted(checkpoint_dir)
    if not found:
        out.print(f"no interrupted runs under {checkpoint_dir}/")
        return
    running = sum(st.get("running") is not None for _, st in found)
    out.print(f"{len(found) - running} interrupted run(s)" + (f" and {running} being trained now" if running else "")
              + f" in {checkpoint_dir}/, newest first:")
    for ckpt, st in found:
        if st.get("running") is not None:
            out.print(f"{ckpt.run_id}: being trained now by {holder_line(st['running'])}", markup=False,
                      highlight=False)
            continue
        if "error" in st:
            out.print(f"{ckpt.run_id}: {st['error']}", markup=False, highlight=False)
            continue
        when = datetime.datetime.fromtimestamp(float(st["written_at"])).strftime("%Y-%m-%d %H:%M")
        done = " (training done, logging not)" if st.get("trained") else ""
        owed = ckpt.meta.get("refit")
        cv = ckpt.meta.get("cv")
        what = (f"the refit of trial {owed['trial']} of study {owed['study']}, " if owed
                else f"fold {cv['fold']} of cross-validation {cv['parent']}, " if cv else "")
        out.print(f"{ckpt.run_id}: {what}saved {when} after epoch {st['epoch']}{done}; stopped by "
                  f"{st.get('stopped_by', 'a kill (no clean stop)')}\n  resume with: {resume_command(ckpt)}",
                  markup=False, highlight=False)


def cv(profile: ProfileOpt = None, set_: SetOpt = None,
       folds: Annotated[Optional[int], typer.Option(help="Folds of the non-test patients (sets split.folds; the "
                                                     "train/val/test subsets stay the split's; 0: split.folds).")]
       = None,
       budget: Annotated[Optional[str], typer.Option(help="Wall-clock budget of the whole CV, shared evenly by "
                                                     "the folds, e.g. 45m (sets cv.budget_minutes).")] = None,
       fold: Annotated[Optional[int], typer.Option(help="Train this fold only (folds in parallel on several "
                                                   "machines against one tracking server); with --run.")] = None,
       run: Annotated[Optional[str], typer.Option("--run", help="Continue this CV run (its stored settings): "
                                                  "missing folds, then the ensemble.")] = None,
       resume: Annotated[bool, typer.Option("--resume", help="Continue the newest CV run whose ensemble is not "
                                            "assembled yet.")] = False,
       test_report: Annotated[bool, typer.Option(help="Score the test patients with the ensemble at the end "
                                                 "(report only).")] = True,
       progress: Annotated[str, typer.Option(help="Epoch progress: auto, bar, lines or none.")] = "auto",
       checkpoint_dir: Annotated[Path, typer.Option(help="Where every epoch of a fold is saved while it "
                                                    "trains.")] = DEFAULT_ROOT):
    """Cross-validate the recipe over the non-test patients (one model per fold, each scored on the fold it never
    saw), choose post-processing on the pooled out-of-fold predictions, and log the fold ensemble as the model."""
    from brainseg.data.context import DataContext
    from brainseg.models.factory import check_names
    from brainseg.pipeline.cv import CvRefused, newest_open_parent, run_cv, stored_settings
    from brainseg.tracking import mlflow_runs
    from brainseg.training.progress_callbacks import epoch_progress

    continuing = run is not None or resume
    if continuing and (profile or set_ or budget or folds):
        fail("--run/--resume continue a CV with its own settings: drop --profile, --set, --budget and --folds", 2)
    mlflow_runs.set_experiment(EXPERIMENT)
    try:
        if resume and run is None:
            run = newest_open_parent(EXPERIMENT)
            if run is None:
                fail("--resume: no cross-validation run waits for its folds or its ensemble", 2)
        settings = validate_settings(stored_settings(run)) if run else settings_or_fail(profile, set_)
        if folds:  # 0 (MLproject's default): the split's own split.folds
            settings = settings.with_changes(split={"folds": folds})
        if budget not in (None, ""):
            settings = settings.with_changes(cv={"budget_minutes": parse_budget(budget)})
        check_names(settings.train.arch, settings.train.encoder)
        ctx = DataContext.from_settings(settings)
        epochs = settings.train.epochs
        res = run_cv(settings, ctx, EXPERIMENT, parent_id=run, only_fold=fold, report_test=test_report,
                     checkpoints=checkpoint_dir, echo=lambda line: out.print(line, markup=False, highlight=False),
                     callbacks_for=lambda f: [b] if (b := epoch_progress(epochs, progress, console=out)) else [])
    except (CvRefused, ConfigError, ValueError, FileNotFoundError, BudgetError) as exc:
        fail(str(exc), 2)
    except (mlflow_runs.TrackingLost, DiskFull) as exc:  # a fold's work is kept in its checkpoint
        fail(str(exc), 75)
    if res.get("folds_missing"):
        out.print(f"folds still to train: {', '.join(map(str, res['folds_missing']))} (brainseg cv --run "
                  f"{res['run_id']} [--fold K])", markup=False, highlight=False)
    elif res.get("next"):
        out.print(res["next"], markup=False, highlight=False)
    elif res.get("already_assembled"):
        out.print(f"run {res['run_id']}: every fold done and the ensemble assembled before: {res['model_uri']}",
                  markup=False, highlight=False)
    else:
        for prefix, title in (("cv_", "out of fold: every non-test patient by the fold model that never saw it"),
                              ("test_", "test patients, the ensemble (report only)")):
            if any(k.startswith(prefix) for k in res):
                print_metrics({k[len(prefix):]: v for k, v in res.items() if k.startswith(prefix)}, title)
        out.print(f"spread of the per-fold means (sd): {res.get('cv_fold_dice_sd', float('nan')):.3f}")
        out.print(f"model (the {len(res['folds_done'])}-fold ensemble): {res['model_uri']}; register it with "
                  f"`brainseg register --run {res['run_id']}`", markup=False, highlight=False)
    out.print(f"run: {res['run_id']}", markup=False, highlight=False)
