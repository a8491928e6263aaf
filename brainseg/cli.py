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
# soft_wrap: messages and BAD lines name long paths; never break them across lines
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="Budget profile: smoke, cpu or gpu "
                                                   "(default: params.yaml's `profile`).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting, e.g. --set train.lr=0.0005 "
                                                     "(repeatable).")]
EXPERIMENT = "brainseg"


def fail(message: str, code: int = 1):
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def settings_or_fail(profile: str | None, overrides: list[str] | None) -> dict:
    try:
        return load_settings(profile, overrides or [])
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
          verbose: Annotated[int, typer.Option(help="Keras progress: 0 silent, 1 bar, 2 one line per epoch.")] = 1):
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
    res = tracked_training(settings, cfg, ctx, run_name=f"train-{cfg.arch}-{cfg.encoder}", verbose=verbose)
    m = res["metrics"]
    out.print(f"run {res['run_id']}: best epoch {res['best_epoch'] + 1}, validation per-patient Dice "
              f"mean {m['patient_dice_mean']:.3f} / median {m['patient_dice_median']:.3f} "
              f"(n={m['n_patients']} patients), empty-slice FP rate {m['empty_slice_fp_rate']:.3f} "
              f"(n={m['n_empty_slices']})")
    out.print(f"model: {res['model_uri']}")


@app.command()
def evaluate(model: Annotated[str, typer.Option(help="Model: a folder/.h5, runs:/ID/model or models:/NAME@ALIAS.")]
             = "models:/brainseg-segmenter@champion",
             subset: Annotated[Optional[str], typer.Option(help="train, val, test, all (default: evaluate.subset).")] = None,
             folder: Annotated[Optional[Path], typer.Option(help="Evaluate on all patients of this folder "
                                                            "(public layout) instead of the split.")] = None,
             output: Annotated[Path, typer.Option("--out", help="Where metrics.json and CSVs go.")] = Path("reports/evaluate"),
             tune_summary: Annotated[Optional[Path], typer.Option("--tune", help="Evaluate the best trial of this "
                                                                  "`brainseg tune` summary instead of --model.")] = None,
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Per-patient volume Dice (mean, median), IoU, tumor-slice Dice, empty-slice FP rate, baseline."""
    from brainseg import tracking
    from brainseg.data.context import DataContext
    from brainseg.evaluate import EvalSettings
    from brainseg.workflows import tracked_evaluation

    settings = settings_or_fail(profile, set_)
    ev = EvalSettings.from_dict(settings["evaluate"])
    subset = subset or settings["evaluate"]["subset"]
    if tune_summary is not None:
        best = json.loads(tune_summary.read_text()) if tune_summary.is_file() else {}
        if not best.get("best_model_uri"):
            fail(f"{tune_summary}: no completed trial with a model (run `brainseg tune`)", 2)
        model = best["best_model_uri"]
    try:
        ctx = (DataContext.from_folder(folder, Path(settings["data"]["cache_dir"])) if folder
               else DataContext.from_settings(settings))
        tracking.set_experiment(EXPERIMENT)
        res = tracked_evaluation(settings, model, ctx, "test" if folder else subset, ev, output)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    print_metrics(res["metrics"], f"{model} on {folder or subset}")
    out.print(f"run {res['run_id']}; metrics -> {output / 'metrics.json'}")


@app.command()
def tune(profile: ProfileOpt = None, set_: SetOpt = None,
         study_name: Annotated[Optional[str], typer.Option(help="Default: tune.study_name + profile + data version.")] = None,
         storage: Annotated[Optional[str], typer.Option(help="SQLAlchemy URL (sqlite:///optuna.db, postgresql://...) "
                                                     "or journal:FILE (default: tune.storage).")] = None,
         n_trials: Annotated[Optional[float], typer.Option(help="Trials for this worker (default: the profile's).")] = None,
         timeout: Annotated[Optional[float], typer.Option(help="Seconds for this worker (default: the profile's).")] = None,
         create_only: Annotated[bool, typer.Option(help="Create the study and its parent run, then exit "
                                                   "(run once before starting several workers).")] = False,
         output: Annotated[Path, typer.Option("--out", help="Summary JSON (best trial, run, model).")] = Path("reports/tune.json")):
    """Optuna search over architectures, encoders and loss weights; each trial a nested MLflow run."""
    from brainseg.data.context import DataContext
    from brainseg.tune import plan_from_settings, run_study

    settings = settings_or_fail(profile, set_)
    try:
        ctx = DataContext.from_settings(settings)
        name = study_name or f"{settings['tune']['study_name']}-{settings['profile']}-{ctx.version[:8]}"
        plan = plan_from_settings(settings, name, storage or None, int(n_trials or 0), float(timeout or 0))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        fail(str(exc), 2)
    try:
        summary = run_study(plan, ctx, EXPERIMENT, create_only=create_only)
    except Exception as exc:  # storage unreachable, bad URL: before any trial started
        if "sqlalchemy" in type(exc).__module__ or "OperationalError" in type(exc).__name__ or isinstance(exc, ImportError):
            fail(f"storage {plan.storage_url.split('@')[-1]!r}: cannot be opened ({type(exc).__name__}: "
                 f"{str(exc).splitlines()[0][:300]})", 2)
        raise
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2, default=str))
    if create_only:
        out.print(f"study {name} ready (parent run {summary['parent_run_id']}); start workers with "
                  f"`brainseg tune --study-name {name} --storage ...`")
        return
    states = ", ".join(f"{k.lower()} {v}" for k, v in summary["states"].items() if v)
    out.print(f"study {name}: {summary['trials']} trials ({states}); parent run {summary['parent_run_id']}")
    if "best_trial" in summary:
        out.print(f"best: trial {summary['best_trial']}, val per-patient Dice {summary['best_value']:.3f}, "
                  f"run {summary['best_run_id']}")


@app.command()
def features(root: Annotated[Optional[Path], typer.Argument(help="Dataset folder (default: data.root).")] = None,
             model: Annotated[Optional[str], typer.Option(help="Segment with this model (folder, runs:/, models:/).")] = None,
             truth: Annotated[bool, typer.Option("--truth", help="Use the ground-truth masks instead of a model.")] = False,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/features"),
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Tumor area, centroid, spread and shape per slice and per patient (slices.csv, patients.csv)."""
    from brainseg.data.arrays import load_full_images, load_full_masks
    from brainseg.data.layout import find_root
    from brainseg.data.manifest import scan
    from brainseg.features import features_for_manifest

    settings = settings_or_fail(profile, set_)
    if truth == (model is not None):
        fail("give exactly one of --model URI or --truth", 2)
    try:
        found = find_root(root or Path(settings["data"]["root"]))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), 2)
    result = scan(found)
    for p in result.problems:
        console.print(f"skipped: {p}", markup=False, highlight=False)
    m = result.manifest
    if m.empty:
        fail(f"{found}: no usable slices", 2)
    images = load_full_images(m)
    if truth:
        masks = load_full_masks(m)
    else:
        from brainseg.evaluate import EvalSettings, segment_images
        from brainseg.serving import load_segmenter

        try:
            net, cfg = load_segmenter(model)
        except FileNotFoundError as exc:
            fail(str(exc), 2)
        ev = EvalSettings.from_dict({**settings["evaluate"], "threshold": cfg.threshold})
        masks = []
        for i in range(0, len(images), 64):
            masks += segment_images(net, cfg, images[i:i + 64], ev)[0]
    slices, patients = features_for_manifest(m, masks, images)
    output.mkdir(parents=True, exist_ok=True)
    slices.to_csv(output / "slices.csv", index=False)
    patients.to_csv(output / "patients.csv", index=False)
    (output / "source.json").write_text(json.dumps({"masks": "truth" if truth else model, "root": str(found)}))
    out.print(f"features of {len(slices)} slices, {len(patients)} patients "
              f"({'ground-truth' if truth else 'predicted'} masks) -> {output}/slices.csv, patients.csv")


@app.command()
def survival(features_csv: Annotated[Path, typer.Option("--features", help="Per-patient features (brainseg features).")]
             = Path("reports/features/patients.csv"),
             clinical_csv: Annotated[Optional[Path], typer.Option("--clinical", help="data.csv (default: data.root/data.csv).")] = None,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/survival"),
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Cross-validated death01 classifiers (3 models x 3 feature sets), then the final pipeline, in MLflow."""
    import pandas as pd

    from brainseg import tracking
    from brainseg.data.clinical import ClinicalError, read_clinical
    from brainseg.data.version import data_version
    from brainseg.survival import compare, join_features
    from brainseg.survival_log import log_final_model, log_survival_runs

    settings = settings_or_fail(profile, set_)
    sv = settings["survival"]
    root = Path(settings["data"]["root"])
    clinical_csv = clinical_csv or root / "data.csv"
    source = features_csv.with_name("source.json")
    features_from = json.loads(source.read_text())["masks"] if source.is_file() else str(features_csv)
    try:
        imaging = pd.read_csv(features_csv)
        X, y, report = join_features(read_clinical(clinical_csv), imaging)
        results = compare(X, y, classifiers=sv["classifiers"], feature_sets=sv["feature_sets"], folds=sv["folds"],
                          repeats=sv["repeats"], seed=sv["seed"], knn_neighbors=sv["knn_neighbors"])
    except (FileNotFoundError, ClinicalError, ValueError, KeyError) as exc:
        fail(str(exc), 2)
    out.print(f"joined {report['matched']} patients (data.csv {report['clinical_patients']}, imaging "
              f"{report['imaging_patients']}); excluded for missing death01: {report['excluded_missing_target']}; "
              f"imaging features from: {features_from}")
    if report.get("imaging_without_clinical"):
        out.print(f"patients with imaging but not in data.csv: {', '.join(report['imaging_without_clinical'][:10])}")
    version = data_version(root) if root.exists() else "unknown"
    tags = {**tracking.lineage_tags(version, settings), "features_from": features_from}
    tracking.set_experiment(EXPERIMENT + "-survival")
    logged = log_survival_runs(results, features_from=features_from, tags=tags, join_report=report,
                               knn_neighbors=sv["knn_neighbors"])
    table = Table(title=f"death01, repeated stratified {results[0].cv['folds']}-fold CV over patients "
                        f"(x{results[0].cv['repeats']})")
    for col in ("classifier", "features", "ROC-AUC (2.5-97.5% of folds)", "bal. acc.", "Brier", "baseline Brier"):
        table.add_column(col)
    for r in results:
        cv = r.cv
        table.add_row(r.classifier, r.feature_set, f"{cv['roc_auc_mean']:.3f} ({cv['roc_auc_ci_low']:.2f}-{cv['roc_auc_ci_high']:.2f})",
                      f"{cv['balanced_accuracy']:.3f}", f"{cv['brier']:.3f}", f"{cv['baseline_brier']:.3f}")
    out.print(table)
    final = next((r for r in results if r.classifier == sv["final"]["classifier"]
                  and r.feature_set == sv["final"]["feature_set"]), None)
    if final is None:
        fail(f"survival.final {sv['final']} is not among the compared classifiers/feature sets", 2)
    run_id, model_uri = log_final_model(final.pipeline, X, columns=final.columns, run_id=None,
                                        tags={**tags, "final": "true"},
                                        params={"classifier": final.classifier, "feature_set": final.feature_set})
    from brainseg.survival_log import METRIC_KEYS

    summary = {"features_from": features_from, "join": report, "final_run_id": run_id, "final_model_uri": model_uri,
               "final": {"classifier": final.classifier, "feature_set": final.feature_set,
                         **{k: final.cv[k] for k in METRIC_KEYS if k in final.cv}},
               "results": [{"classifier": r.classifier, "feature_set": r.feature_set,
                            **{k: r.cv[k] for k in METRIC_KEYS if k in r.cv}} for r in results],
               "parent_run_id": logged["parent_run_id"]}
    output.mkdir(parents=True, exist_ok=True)
    (output / "cv.json").write_text(json.dumps(summary, indent=2, default=float))
    (output / "metrics.json").write_text(json.dumps({f"{r.classifier}_{r.feature_set}_roc_auc": r.cv["roc_auc_mean"]
                                                     for r in results} | {"final_roc_auc": final.cv["roc_auc_mean"],
                                                     "baseline_roc_auc": final.cv["baseline_roc_auc"]}, indent=2))
    out.print(f"final model ({final.classifier}, {final.feature_set}, chosen in params.yaml before seeing scores): "
              f"{model_uri}")


@app.command()
def register(tune_summary: Annotated[Optional[Path], typer.Option("--tune", help="Summary of `brainseg tune`.")]
             = Path("reports/tune.json"),
             run_id: Annotated[Optional[str], typer.Option("--run", help="Register this training run instead.")] = None,
             survival_summary: Annotated[Optional[Path], typer.Option("--survival", help="Summary of `brainseg survival` "
                                                                     "(skipped when missing).")] = Path("reports/survival/cv.json"),
             force: Annotated[bool, typer.Option(help="Make the new version champion whatever the scores.")] = False,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/register.json"),
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Register the best trial's segmenter and the survival model; champion alias only if they beat it."""
    from brainseg import tracking
    from brainseg.data.context import DataContext
    from brainseg.workflows import register_segmenter, register_survival

    settings = settings_or_fail(profile, set_)
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
            run_id, model_uri = summary["best_run_id"], summary["best_model_uri"]
        ctx = DataContext.from_settings(settings)
        results["segmenter"] = register_segmenter(settings, ctx, run_id, model_uri, force)
        out.print(results["segmenter"]["decision"])
        if survival_summary and survival_summary.is_file():
            results["survival"] = register_survival(settings, json.loads(survival_summary.read_text()), force)
            out.print(results["survival"]["decision"])
        else:
            out.print(f"survival: {survival_summary} not found, not registered")
    except (FileNotFoundError, ValueError) as exc:
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

    from brainseg.evaluate import EvalSettings
    from brainseg.predict import collect_inputs, predict_files
    from brainseg.serving import load_segmenter

    settings = settings_or_fail(profile, set_)
    files, problems = collect_inputs(inputs)
    if not files:
        for p in problems:
            console.print(p, markup=False)
        fail("no slice files (.tif, .tiff, .png) found in the inputs", 2)
    try:
        net, cfg = load_segmenter(model)
    except FileNotFoundError as exc:
        fail(str(exc), 2)
    ev = EvalSettings.from_dict({**settings["evaluate"], "threshold": threshold or cfg.threshold})
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"segmenting {len(files)} slices", total=len(files))
        pred = predict_files(net, cfg, files, output, ev, progress=lambda n: bar.advance(task, n))
    problems += pred.problems
    if with_survival and not pred.patients.empty:
        from brainseg.survival_serving import survival_probabilities

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


@app.command("run")
def run_pipeline(profile: ProfileOpt = None,
                 dvc: Annotated[bool, typer.Option(help="Run through `dvc repro` (only changed stages re-run); "
                                                   "without it the stages of dvc.yaml run in order.")] = True):
    """The whole pipeline (validate, manifest, split, tune, evaluate, features, survival, register).

    With no dataset imported it generates the synthetic default first. `--profile cpu` sets
    params.yaml's profile (DVC then re-runs what depends on it).
    """
    import subprocess

    from brainseg.pipeline import FINAL_WORDS, run

    try:
        run(profile, use_dvc=dvc, echo=out.print)
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
          repeats: int = 20, load_seconds: float = 20.0, clients: int = 4,
          tuning: Annotated[bool, typer.Option(help="Also compare a small study with and without pruning.")] = True,
          trials: int = 4, tuning_epochs: int = 4,
          model: Annotated[Optional[str], typer.Option(help="Measure this model instead of a fresh one.")] = None,
          output: Annotated[Path, typer.Option("--out")] = Path("reports/bench.json")):
    """Training pipeline vs in-memory, inference (predict, tf.function, pyfunc, REST), load, memory, pruning."""
    from brainseg.bench import run_bench

    try:
        run_bench(profile=profile, arch=arch, encoder=encoder, size=size, channels=channels,
                  train_batch=train_batch, train_steps=train_steps, batch_sizes=batch_size or [1, 32],
                  repeats=repeats, load_seconds=load_seconds, clients=clients, tuning=tuning, trials=trials,
                  tuning_epochs=tuning_epochs, model=model, output=output, console=out)
    except (ValueError, ConfigError) as exc:
        fail(str(exc), 2)
    except RuntimeError as exc:
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


def quiet_libraries() -> None:
    """Silence known-harmless library warnings so the user sees the project's own output."""
    import logging
    import warnings

    for pattern in ("You are saving your model as an HDF5 file", "Hint: Inferred schema contains integer",
                    ".*is experimental", "Some regimes for parameter", ".*Passing a Python object as"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def main():  # console-script entry with a clean exit for Ctrl-C
    from brainseg.tracking import adopt_project_run

    quiet_libraries()
    adopt_project_run()
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
