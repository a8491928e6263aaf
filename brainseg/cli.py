"""The ``brainseg`` command line: each command loads settings, calls one function, reports."""

from __future__ import annotations

import brainseg.keras_env  # noqa: F401  (first: Keras variables before anything imports TF)

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from brainseg.config import ConfigError, load_settings

app = typer.Typer(help="LGG FLAIR-abnormality segmentation and outcome prediction, tracked in MLflow.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Dataset: synthesize, validate, import, manifest, split.", no_args_is_help=True)
app.add_typer(data_app, name="data")
profile_app = typer.Typer(help="Budget profiles (experiments/profiles.yaml), written into params.yaml.",
                          no_args_is_help=True)
app.add_typer(profile_app, name="profile")
# soft_wrap: messages and BAD lines name long paths; never break them across lines
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="Apply a budget profile (smoke, cpu, gpu) "
                                                   "in memory for this command (default: none, params.yaml as "
                                                   "written; `brainseg profile use` writes one into it).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting, e.g. --set train.lr=0.0005 "
                                                     "(repeatable).")]
EXPERIMENT = "brainseg"


def fail(message: str, code: int = 1):
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings_or_fail(profile: str | None, overrides: list[str] | None) -> dict:
    """Settings with every value type- and range-checked (exit 2 naming the key, before any run)."""
    from brainseg.config import validate_settings

    try:
        settings = load_settings(profile, overrides or [])
        return validate_settings(settings, load_settings(profile, []) if overrides else None)
    except ConfigError as exc:
        fail(str(exc), 2)


# ----------------------------------------------------------------------------------------- data
@data_app.command("synth")
def data_synth(out_dir: Annotated[Path, typer.Argument(help="Folder to write (the kaggle_3m layout).")],
               patients: int = 12, slices: int = 16, size: int = 64, seed: int = 0):
    """Write synthetic patients in the public kaggle_3m layout (with data.csv)."""
    from brainseg.data.synth import generate

    try:
        generate(out_dir, patients=patients, slices=slices, size=size, seed=seed)
    except ValueError as exc:
        fail(str(exc), 2)
    out.print(f"wrote {patients} synthetic patients x {slices} slices ({size}x{size}) to {out_dir}")


@data_app.command("validate")
def data_validate(root: Annotated[Path, typer.Argument(help="kaggle_3m folder, a parent of it, or the .zip/.tar.* archive.")],
                  json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the summary as JSON.")] = None):
    """Check every image/mask pair and data.csv; exit 1 if anything is bad."""
    import tempfile

    from brainseg.data.layout import open_dataset
    from brainseg.data.manifest import scan

    with tempfile.TemporaryDirectory(prefix="brainseg-validate-") as tmp:  # an archive unpacks here
        try:
            found = open_dataset(root, Path(tmp))
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc), 2)
        result = scan(found)
    s = result.summary()
    table = Table(title=f"dataset {found}")
    for col in ("institution", "patients", "slices"):
        table.add_column(col)
    for inst, counts in s["institutions"].items():
        table.add_row(inst, str(counts["patients"]), str(counts["slices"]))
    out.print(table)
    out.print(f"patients: {s['patients']}  slices: {s['slices']}  tumor slices: {s['tumor_slices']}  "
              f"problems: {s['problems']}")
    for p in result.problems:
        out.print(f"BAD {p}", markup=False, highlight=False)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(s | {"problem_list": [str(p) for p in result.problems]}, indent=2))
    if not result.ok:
        raise typer.Exit(1)


@data_app.command("import")
def data_import(src: Annotated[Path, typer.Argument(help="The Kaggle download: kaggle_3m folder, a parent, or the archive.")],
                dest: Path = Path("data/raw/kaggle_3m"),
                dvc: Annotated[bool, typer.Option(help="Track the copy with DVC (dvc add).")] = True):
    """Copy or unpack a dataset into data/raw/kaggle_3m and track it with DVC (switches the pipeline to it)."""
    from brainseg.data.importer import import_dataset

    try:
        message = import_dataset(src, dest, use_dvc=dvc)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        fail(str(exc), 2)
    out.print(message)


@data_app.command("manifest")
def data_manifest(profile: ProfileOpt = None, set_: SetOpt = None,
                  root: Annotated[Optional[Path], typer.Option(help="Dataset folder (default: data.root).")] = None,
                  output: Annotated[Optional[Path], typer.Option("--out", help="Default: data.manifest.")] = None):
    """Validate the dataset and write the manifest (one row per slice); refuses a dataset with problems."""
    from brainseg.data.manifest import scan

    settings = settings_or_fail(profile, set_)
    root = root or Path(settings["data"]["root"])
    output = output or Path(settings["data"]["manifest"])
    if not root.exists():
        fail(f"{root}: dataset not found (run `brainseg data import PATH` or `brainseg run`)", 2)
    result = scan(root)
    if not result.ok:
        for p in result.problems:
            console.print(f"BAD {p}", markup=False, highlight=False)
        fail(f"{len(result.problems)} problem(s) in {root}; fix them or remove the files (see above)")
    output.parent.mkdir(parents=True, exist_ok=True)
    result.manifest.to_csv(output, index=False)
    from brainseg.data.context import stamp_manifest

    stamp_manifest(output, root)  # the data version it was built from: train/tune rebuild it when stale
    s = result.summary()
    out.print(f"manifest: {s['patients']} patients, {s['slices']} slices ({s['tumor_slices']} with tumor) -> {output}")


@data_app.command("split")
def data_split(profile: ProfileOpt = None, set_: SetOpt = None,
               manifest: Optional[Path] = None,
               output: Annotated[Optional[Path], typer.Option("--out")] = None):
    """Split patients (never slices) into train/val/test and k folds, stratified by institution and burden."""
    from brainseg.data.manifest import patients_table, read_manifest
    from brainseg.data.split import split_patients

    settings = settings_or_fail(profile, set_)
    manifest = manifest or Path(settings["data"]["manifest"])
    output = output or Path(settings["data"]["split"])
    try:
        m = read_manifest(manifest)
        sp = settings["split"]
        split = split_patients(patients_table(m), val_fraction=sp["val_fraction"], test_fraction=sp["test_fraction"],
                               folds=sp["folds"], seed=sp["seed"], burden_bins=sp["burden_bins"])
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    output.parent.mkdir(parents=True, exist_ok=True)
    split.to_csv(output, index=False)
    counts = split["subset"].value_counts().to_dict()
    out.print(f"split {len(split)} patients: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test"))
              + f" -> {output}")


@data_app.command("prepare")
def data_prepare(profile: ProfileOpt = None, set_: SetOpt = None,
                 dvc: Annotated[bool, typer.Option(help="Track generated synthetic data with DVC.")] = True):
    """Make sure a dataset is there (the synthetic default if none was imported), then manifest and split."""
    from brainseg.data.importer import dvc_available, ensure_dataset

    settings = settings_or_fail(profile, set_)
    out.print(ensure_dataset(Path(settings["data"]["root"]), settings["data"]["synth"],
                             use_dvc=dvc and dvc_available()))
    data_manifest(profile=profile, set_=set_, root=None, output=None)
    data_split(profile=profile, set_=set_, manifest=None, output=None)


# ------------------------------------------------------------------------------------ training
@app.command()
def train(profile: ProfileOpt = None, set_: SetOpt = None,
          progress: Annotated[str, typer.Option(help="Epoch progress: auto (a bar on a terminal, one line per "
                                                "epoch otherwise), bar, lines or none.")] = "auto",
          keras_verbose: Annotated[Optional[int], typer.Option("--verbose", hidden=True,
                                                               help="Old spelling: 0 none, 1 bar, 2 lines.")] = None):
    """Train one segmenter on the train patients, select the best epoch on val, log it all to MLflow."""
    from brainseg import tracking
    from brainseg.config import TrainConfig
    from brainseg.data.context import DataContext
    from brainseg.workflows import tracked_training

    settings = settings_or_fail(profile, set_)
    try:
        cfg = TrainConfig.from_dict(settings["train"])
        from brainseg.models.factory import check_names

        check_names(cfg.arch, cfg.encoder)
        ctx = DataContext.from_settings(settings)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    tracking.set_experiment(EXPERIMENT)
    from brainseg.progress import epoch_progress

    try:
        if keras_verbose is not None:  # `train --verbose N` (before --progress existed)
            progress = {0: "none", 1: "bar"}.get(keras_verbose, "lines")
        bar = epoch_progress(cfg.epochs, progress, console=out)
    except ValueError as exc:
        fail(str(exc), 2)
    res = tracked_training(settings, cfg, ctx, run_name=f"train-{cfg.arch}-{cfg.encoder}", verbose=0,
                           callbacks=[bar] if bar else [], report_test=True)
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
    out.print(f"model: {res['model_uri']}")


@app.command()
def evaluate(model: Annotated[str, typer.Option(help="Model: a folder/.h5, runs:/ID/model or models:/NAME@ALIAS.")]
             = "models:/brainseg-segmenter@champion",
             subset: Annotated[Optional[str], typer.Option(help="train, val, test, all (default: evaluate.subset, "
                                                           "val). Metrics are logged as SUBSET_*.")] = None,
             folder: Annotated[Optional[Path], typer.Option(help="Evaluate on all patients of this folder "
                                                            "(public layout) instead of the split.")] = None,
             output: Annotated[Path, typer.Option("--out", help="Where metrics.json and CSVs go.")] = Path("reports/evaluate"),
             tune_summary: Annotated[Optional[Path], typer.Option("--tune", help="Evaluate the best trial of this "
                                                                  "`brainseg tune` summary instead of --model.")] = None,
             skip_unlabelled: Annotated[bool, typer.Option("--skip-unlabelled", help="If the subset's masks are "
                                                           "missing or unreadable, write a report saying so and "
                                                           "exit 0 (the pipeline's test report).")] = False,
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Per-patient volume Dice (mean, median), IoU, tumor-slice Dice, empty-slice FP rate, baseline."""
    from brainseg import tracking
    from brainseg.data.context import DataContext
    from brainseg.workflows import MasksUnavailable, tracked_evaluation

    settings = settings_or_fail(profile, set_)
    subset = subset or settings["evaluate"]["subset"]
    if tune_summary is not None:
        best = json.loads(tune_summary.read_text()) if tune_summary.is_file() else {}
        if not best.get("best_model_uri"):
            fail(f"{tune_summary}: no completed trial with a model (run `brainseg tune`)", 2)
        model = (best.get("refit") or {}).get("model_uri") or best["best_model_uri"]  # the refit, if any
    try:
        ctx = (DataContext.from_folder(folder, Path(settings["data"]["cache_dir"])) if folder
               else DataContext.from_settings(settings))
        tracking.set_experiment(EXPERIMENT)
        res = tracked_evaluation(settings, model, ctx, "test" if folder else subset, out_dir=output)
    except MasksUnavailable as exc:
        if not skip_unlabelled:
            fail(str(exc), 2)
        write_unavailable_report(output, "test" if folder else subset, str(exc))
        out.print(f"{exc}: no {subset} report (nothing else depends on it) -> {output / 'metrics.json'}")
        return
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    print_metrics(res["metrics"], f"{model} on {folder or subset}")
    out.print(f"run {res['run_id']}; metrics -> {output / 'metrics.json'}")


def write_unavailable_report(output: Path, subset: str, reason: str) -> None:
    """The report's files when the masks are unavailable: a flag as metric, empty tables, the reason."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps({f"{subset}_masks_available": False}, indent=2))
    (output / "per_patient.csv").write_text("patient,volume_dice\n")
    (output / "per_slice.csv").write_text("patient,slice\n")
    (output / "unavailable.txt").write_text(reason + "\n")


@app.command()
def tune(profile: ProfileOpt = None, set_: SetOpt = None,
         study_name: Annotated[Optional[str], typer.Option(help="Default: tune.study_name + profile + data version "
                                                           "(+ the project run under `mlflow run`).")] = None,
         storage: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL (sqlite:///optuna.db, postgresql://...) "
                                                     "or journal:FILE (default: tune.storage).")] = None,
         n_trials: Annotated[Optional[float], typer.Option(help="Trials to add, all workers together (default: the profile's).")] = None,
         timeout: Annotated[Optional[float], typer.Option(help="Seconds for the search (default: the profile's).")] = None,
         create_only: Annotated[bool, typer.Option(help="Create the study and its parent run, then exit "
                                                   "(run once before starting several workers).")] = False,
         refit: Annotated[Optional[bool], typer.Option(help="Train the best configuration at full fidelity "
                                                       "afterwards (default: tune.refit).")] = None,
         register: Annotated[Optional[bool], typer.Option(help="Register the refit model (default: tune.register).")] = None,
         worker: Annotated[Optional[int], typer.Option(help="Run as worker K of a shared study: trials only.")] = None,
         study_trials: Annotated[Optional[int], typer.Option(hidden=True)] = None,
         output: Annotated[Path, typer.Option("--out", help="Summary JSON (best trial, run, model).")] = Path("reports/tune.json")):
    """Optuna search (multi-fidelity, from the hand-set recipe), then a full-fidelity refit; MLflow runs."""
    import os

    from brainseg.data.context import DataContext
    from brainseg.tracking import PIPELINE_ENV, PROJECT_ENV
    from brainseg.tune import plan_from_settings, run_study

    settings = settings_or_fail(profile, set_)
    try:
        ctx = DataContext.from_settings(settings)
        name = study_name or f"{settings['tune']['study_name']}-{settings['profile']}-{ctx.version[:8]}"
        if not study_name and os.environ.get(PROJECT_ENV) and not os.environ.get(PIPELINE_ENV):
            name += f"-{os.environ[PROJECT_ENV][:8]}"  # each `mlflow run` its own study
        plan = plan_from_settings(settings, name, storage or None, int(n_trials or 0), float(timeout or 0))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    refit = settings["tune"].get("refit", False) if refit is None else refit
    register = settings["tune"].get("register", False) if register is None else register
    settings_args = [*(["--profile", profile] if profile else []), *[a for s in set_ or [] for a in ("--set", s)]]
    try:
        summary = run_study(plan, ctx, EXPERIMENT, create_only=create_only, worker=worker, study_trials=study_trials,
                            refit=bool(refit) and worker is None, register=bool(register),
                            settings_args=settings_args, echo=out.print)
    except Exception as exc:  # storage unreachable, bad URL: before any trial started
        if "sqlalchemy" in type(exc).__module__ or "OperationalError" in type(exc).__name__ or isinstance(exc, ImportError):
            fail(f"storage {plan.storage_url.split('@')[-1]!r}: cannot be opened ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0][:300]})", 2)
        raise
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2, default=str))
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


@app.command()
def features(root: Annotated[Optional[Path], typer.Argument(help="Dataset folder (default: data.root).")] = None,
             model: Annotated[Optional[str], typer.Option(help="Segment with this model (folder, runs:/, models:/).")] = None,
             truth: Annotated[bool, typer.Option("--truth", help="Use the ground-truth masks instead of a model.")] = False,
             oof: Annotated[bool, typer.Option("--oof", help="Out-of-fold predicted masks: one cheap segmenter per "
                                               "split fold (survival.oof), each predicting the patients it never saw.")]
             = False,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/features"),
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Tumor area, centroid, spread and shape per slice and per patient (slices.csv, patients.csv, source.json)."""
    from brainseg.outcome.workflow import compute_features

    settings = settings_or_fail(profile, set_)
    try:
        res = compute_features(settings, out_dir=output, root=root, truth=truth, model=model, oof=oof,
                               echo=lambda line: console.print(line, markup=False, highlight=False))
    except (FileNotFoundError, ValueError, ConfigError) as exc:
        fail(str(exc), 2)
    out.print(f"features of {res['slices']} slices, {res['patients']} patients (masks: {res['features_from']}; "
              f"{'synthetic' if res['synthetic'] else 'real'} data {res['data_version'][:12]}) -> "
              f"{output}/slices.csv, patients.csv")


@app.command()
def survival(features_csv: Annotated[Path, typer.Option("--features", help="Per-patient features the final model is "
                                                        "fitted on (brainseg features --oof).")]
             = Path("reports/features/patients.csv"),
             compare_csv: Annotated[Optional[list[Path]], typer.Option("--compare", help="More per-patient feature "
                                                                       "tables to compare (e.g. --truth ones).")] = None,
             clinical_csv: Annotated[Optional[Path], typer.Option("--clinical", help="data.csv (default: data.root/data.csv).")] = None,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/survival"),
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Repeated-CV comparison of death01 candidates, then the final pipeline of params.yaml, in MLflow."""
    from brainseg.data.clinical import ClinicalError
    from brainseg.outcome.workflow import run_survival

    settings = settings_or_fail(profile, set_)
    if not features_csv.is_file():
        fail(f"{features_csv}: per-patient features not found; compute them first with `brainseg features "
             f"--truth --out {features_csv.parent}` (ground-truth masks) or `brainseg features --oof --out "
             f"{features_csv.parent}` (predicted masks), or pass --features CSV", 2)
    try:
        s = run_survival(settings, features_csv=features_csv, out_dir=output, clinical_csv=clinical_csv,
                         compare_csvs=compare_csv or [], experiment=EXPERIMENT + "-survival")
    except (FileNotFoundError, ClinicalError, ValueError, KeyError) as exc:
        fail(str(exc), 2)
    j = s["join"]
    out.print(f"{s['patients']} patients ({s['positives']} with death01 = 1; data.csv {j['clinical_patients']}, "
              f"imaging {j['imaging_patients']}, excluded for missing death01 {j['excluded_missing_target']}); "
              f"{s['fitted_on']} data {s['data_version'][:12]}")
    r0 = s["results"][0]
    table = Table(title=f"death01: repeated stratified CV over patients; mean (2.5-97.5% of {int(r0.get('patients', 0))}"
                        "-patient folds)")
    for col in ("candidate", "ROC-AUC", "balanced acc.", "Brier", "prevalence Brier"):
        table.add_column(col)
    for r in s["results"]:
        table.add_row(r["key"] + (" (final)" if r["key"] == s["final"]["key"] else ""),
                      *(f"{r[f'{m}_mean']:.3f} ({r[f'{m}_low']:.2f}-{r[f'{m}_high']:.2f})"
                        for m in ("roc_auc", "balanced_accuracy", "brier")), f"{r['baseline_brier']:.3f}")
    out.print(table)
    for note in s["notes"]:
        out.print(f"note: {note}", markup=False, highlight=False)
    out.print(f"final model {s['final']['key']} (declared in params.yaml before scores were seen): "
              f"{s['final_model_uri']}; importances -> {output}/importances.csv")


@app.command()
def register(tune_summary: Annotated[Optional[Path], typer.Option("--tune", help="Summary of `brainseg tune`.")]
             = Path("reports/tune.json"),
             run_id: Annotated[Optional[str], typer.Option("--run", help="Register this training run instead.")] = None,
             survival_summary: Annotated[Optional[Path], typer.Option("--survival", help="Summary of `brainseg survival` "
                                                                     "(skipped when missing).")] = Path("reports/survival/cv.json"),
             promote: Annotated[Optional[bool], typer.Option("--promote/--no-promote", help="Put the new versions "
                                                             "through the promotion gate (default: register.promote).")]
             = None,
             force: Annotated[bool, typer.Option(help="Make the new versions champion whatever the scores.")] = False,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/register.json"),
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Register the best trial's segmenter and the survival model, tagged with their validation / CV
    figures. `@champion` moves only with --promote (or register.promote: true), through the gate."""
    from brainseg import tracking
    from brainseg.data.context import DataContext
    from brainseg.promotion import register_segmenter, register_survival

    settings = settings_or_fail(profile, set_)
    promote = bool(settings["register"].get("promote", False)) if promote is None else promote
    tracking.set_experiment(EXPERIMENT)
    results = {}
    try:
        if run_id:
            import mlflow

            logged = mlflow.search_logged_models(filter_string=f"source_run_id = '{run_id}'", output_format="list")
            if not logged:
                fail(f"run {run_id} has no logged model (a pruned or failed trial?); pick a completed run", 2)
            model_uri = f"models:/{logged[0].model_id}"
        else:
            if not tune_summary or not tune_summary.is_file():
                fail(f"{tune_summary}: no tuning summary; run `brainseg tune` or pass --run RUN_ID", 2)
            summary = json.loads(tune_summary.read_text())
            if not summary.get("best_run_id"):
                fail(f"{tune_summary}: the study has no completed trial to register", 2)
            refit = summary.get("refit") or {}  # the full-fidelity refit of the best trial, if any
            run_id = refit.get("run_id") or summary["best_run_id"]
            model_uri = refit.get("model_uri") or summary["best_model_uri"]
        ctx = DataContext.from_settings(settings)
        results["segmenter"] = register_segmenter(settings, ctx, run_id, model_uri, promote=promote, force=force)
        out.print(results["segmenter"]["decision"])
        if survival_summary and survival_summary.is_file():
            results["survival"] = register_survival(settings, json.loads(survival_summary.read_text()),
                                                    promote=promote, force=force)
            out.print(results["survival"]["decision"])
        else:
            out.print(f"survival: {survival_summary} not found, not registered")
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
        fail(str(exc), 2)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))


@app.command()
def predict(inputs: Annotated[list[Path], typer.Argument(help="Slice files (.tif/.png) or folders, any nesting.")],
            output: Annotated[Path, typer.Option("--out", help="Folder for masks, overlays and CSVs.")],
            model: Annotated[str, typer.Option(help="Folder/.h5, runs:/ID/model or models:/NAME@ALIAS.")]
            = "models:/brainseg-segmenter@champion",
            survival_model: Annotated[Optional[str], typer.Option("--survival-model")] = "models:/brainseg-survival@champion",
            with_survival: Annotated[bool, typer.Option("--survival", help="Add each patient's predicted death01 "
                                                        "probability (needs data.csv beside the slices or --clinical).")] = False,
            clinical_csv: Annotated[Optional[Path], typer.Option("--clinical")] = None,
            threshold: Optional[float] = None,
            profile: ProfileOpt = None, set_: SetOpt = None):
    """Segment slices: <stem>_pred.png masks, overlays, features.csv (per slice), patients.csv (per patient)."""
    from rich.progress import Progress

    from brainseg.inference import Segmenter
    from brainseg.predict import collect_inputs, predict_files
    from brainseg.serving import resolve_model_dir

    settings = settings_or_fail(profile, set_)
    files, problems = collect_inputs(inputs, exclude=[output])  # never read our own outputs
    if not files:
        for p in problems:
            console.print(p, markup=False)
        fail("no slice files (.tif, .tiff, .png) found in the inputs", 2)
    try:
        segmenter = Segmenter.from_dir(resolve_model_dir(model))
    except FileNotFoundError as exc:
        fail(str(exc), 2)
    if threshold is not None:
        segmenter = segmenter.with_settings(threshold=threshold)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"segmenting {len(files)} slices", total=len(files))
        pred = predict_files(segmenter, files, output, progress=lambda n: bar.advance(task, n))
    problems += pred.problems
    if with_survival and not pred.patients.empty:
        from brainseg.outcome.client import survival_probabilities

        try:
            probs = survival_probabilities(survival_model, pred.patients, clinical_csv, files)
            pred.patients = pred.patients.merge(probs, on="patient", how="left")
        except (FileNotFoundError, ValueError) as exc:
            problems.append(f"survival: {exc}")
    pred.slices.to_csv(output / "features.csv", index=False)
    pred.patients.to_csv(output / "patients.csv", index=False)
    out.print(f"{len(pred.slices)} slices, {len(pred.patients)} patients -> {output} "
              f"(masks *_pred.png, overlays *_overlay.png, features.csv, patients.csv); model {model}")
    for p in problems:
        console.print(f"BAD {p}", markup=False, highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def promote(name: Annotated[str, typer.Argument(help="Registered model: register.segmenter_name or survival_name.")],
            version: Annotated[str, typer.Argument(help="Its version number.")],
            force: Annotated[bool, typer.Option(help="Make it champion whatever the gate says.")] = False,
            profile: ProfileOpt = None, set_: SetOpt = None):
    """Put a registered version through the promotion gate; `@champion` moves to it only if it passes.

    Segmenter: challenger vs champion on the validation patients of the current data version.
    Survival: the version fitted with the pre-registered survival.final (no AUC comparison).
    """
    from brainseg import tracking
    from brainseg.promotion import promote as gate

    settings = settings_or_fail(profile, set_)
    tracking.set_experiment(EXPERIMENT)
    try:
        result = gate(settings, name, version, force=force)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    out.print(result["decision"])


@profile_app.command("use")
def profile_use(name: Annotated[str, typer.Argument(help="A profile of experiments/profiles.yaml.")],
                dry_run: Annotated[bool, typer.Option(help="Show the changes, write nothing.")] = False):
    """Copy a budget profile's values into params.yaml (comments kept): what DVC records is what runs."""
    from brainseg.profiles import use_profile

    try:
        diff = use_profile(name, dry_run=dry_run)
    except ConfigError as exc:
        fail(str(exc), 2)
    for key, old, new in diff:
        out.print(f"{key}: {old!r} -> {new!r}", markup=False, highlight=False)
    verb = "would change" if dry_run else "changed"
    out.print(f"params.yaml: {verb} {len(diff)} value(s) for profile {name}" if diff
              else f"params.yaml already has profile {name}'s values")


@app.command("run")
def run_pipeline(profile: ProfileOpt = None,
                 dvc: Annotated[bool, typer.Option(help="Run through `dvc repro` (only changed stages re-run); "
                                                   "without it the stages of dvc.yaml run in order.")] = True,
                 promote: Annotated[bool, typer.Option(help="After the pipeline, put the versions it registered "
                                                       "through the promotion gate.")] = True):
    """The whole pipeline (validate, manifest, split, tune, test report, features, survival, register),
    then the promotion gate for the registered versions.

    With no dataset imported it generates the synthetic default first. `--profile cpu` copies the
    cpu profile's values into params.yaml (`brainseg profile use cpu`; DVC then re-runs what they
    change). `dvc repro` / `dvc exp run` alone never move `@champion` (register.promote: false).
    """
    import subprocess

    from brainseg.run_pipeline import FINAL_WORDS, run

    try:
        run(profile, use_dvc=dvc, promote=promote, echo=out.print)
    except ConfigError as exc:
        fail(str(exc), 2)
    except subprocess.CalledProcessError as exc:
        fail(f"pipeline stage failed: {' '.join(map(str, exc.cmd))} (exit {exc.returncode})", exc.returncode or 1)
    out.print(FINAL_WORDS, markup=False, highlight=False)


@app.command("app")
def app_page(host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
             port: int = 8501,
             endpoint: Annotated[Optional[str], typer.Option(help="URL of a `mlflow models serve` endpoint of the "
                                                             "segmenter; without it the model runs in-process.")] = None,
             model: Annotated[str, typer.Option(help="Folder/.h5, runs:/ID/model or models:/NAME@ALIAS.")]
             = "models:/brainseg-segmenter@champion",
             survival_model: Annotated[Optional[str], typer.Option("--survival-model", help="Empty: no survival model.")]
             = "models:/brainseg-survival@champion",
             headless: bool = True):
    """Web page for clinicians: upload slices or a patient zip, see the tumor, its features and the survival model."""
    from brainseg.app.launch import launch

    raise typer.Exit(launch(host=host, port=port, endpoint=endpoint, model_uri=model,
                            survival_uri=survival_model or None, headless=headless))


@app.command()
def bench(profile: Annotated[str, typer.Option(help="Model settings from this profile.")] = "cpu",
          arch: Optional[str] = None, encoder: Optional[str] = None, size: Optional[int] = None,
          channels: Optional[str] = None, train_batch: Optional[int] = None,
          train_steps: int = 8, batch_size: Annotated[Optional[list[int]], typer.Option("--batch-size")] = None,
          repeats: Annotated[int, typer.Option(help="Interleaved rounds at batch 1.")] = 200,
          batch_repeats: Annotated[int, typer.Option(help="Interleaved rounds at larger batches.")] = 20,
          load_seconds: float = 20.0, clients: int = 4,
          training: Annotated[bool, typer.Option(help="Measure training throughput (needed without --model).")] = True,
          tuning: Annotated[bool, typer.Option(help="Also compare a small study with and without pruning.")] = True,
          trials: int = 4, tuning_epochs: int = 4,
          model: Annotated[Optional[str], typer.Option(help="Measure this model (folder, runs:/, models:/ in the "
                                                            "tracking store) instead of a fresh one.")] = None,
          output: Annotated[Path, typer.Option("--out")] = Path("reports/bench.json")):
    """Training pipeline vs in-memory, inference (network, Segmenter, pyfunc, REST), load, memory, pruning."""
    from brainseg.bench import run_bench

    try:
        run_bench(profile=profile, arch=arch, encoder=encoder, size=size, channels=channels,
                  train_batch=train_batch, train_steps=train_steps, batch_sizes=batch_size or [1, 32],
                  repeats=repeats, batch_repeats=batch_repeats, load_seconds=load_seconds, clients=clients,
                  training=training, tuning=tuning, trials=trials, tuning_epochs=tuning_epochs, model=model,
                  output=output, console=out)
    except (ValueError, ConfigError) as exc:
        fail(str(exc), 2)
    except (RuntimeError, FileNotFoundError) as exc:
        fail(str(exc), 1)


def print_metrics(m: dict, title: str) -> None:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    table = Table(title=title)
    for col in ("metric", "model", "all-empty baseline", "n"):
        table.add_column(col)
    rows = [("per-patient volume Dice, mean", "patient_dice_mean", "n_patients"),
            ("per-patient volume Dice, median", "patient_dice_median", "n_patients"),
            ("per-patient volume IoU, mean", "patient_iou_mean", "n_patients"),
            ("Dice on tumor slices, mean", "tumor_slice_dice_mean", "n_tumor_slices"),
            ("false-positive rate on empty slices", "empty_slice_fp_rate", "n_empty_slices"),
            ("global Dice (all pixels)", "global_dice", "n_slices"),
            ("global IoU (all pixels)", "global_iou", "n_slices"),
            ("smoothed per-slice Dice, all slices (flattering)", "smoothed_slice_dice_all", "n_slices")]
    for label, key, n in rows:
        table.add_row(label, f(m.get(key)), f(m.get(f"baseline_empty_{key}")), str(m.get(n, "")))
    out.print(table)
    out.print("Empty masks: patients with an empty true volume are left out of the Dice means "
              f"(here {m.get('n_patients_empty_truth', 0)}); empty slices count in the FP rate, never as Dice 1.")


def quiet_libraries(verbose: bool = False) -> None:
    """Library start-up noise and known-harmless warnings off (:mod:`brainseg.quiet`), unless ``verbose``."""
    from brainseg import quiet

    quiet.configure(verbose or quiet.verbose_requested())


@app.callback()
def root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own start-up "
                                               "logs and warnings (TensorFlow, absl, MLflow); also "
                                               "BRAINSEG_VERBOSE=1.")] = False):
    """LGG FLAIR-abnormality segmentation and outcome prediction, tracked in MLflow."""
    quiet_libraries(verbose)


def main():  # console-script entry with a clean exit for Ctrl-C
    quiet_libraries(bool({"--verbose", "-v"} & set(sys.argv[1:2])))  # before MLflow and TF load
    from brainseg.tracking import adopt_project_run

    adopt_project_run()
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
