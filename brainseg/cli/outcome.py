"""The outcome commands: tumor features, then the death01 (survival) model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from brainseg.cli.common import EXPERIMENT, ProfileOpt, SetOpt, console, fail, out, settings_or_fail
from brainseg.settings.settings_io import ConfigError

# brainseg.outcome.workflow and brainseg.data.clinical pull in MLflow, scikit-learn and pandas:
# deferred into the commands, so `brainseg --help` stays fast.


def features(root: Annotated[Optional[Path], typer.Argument(help="Dataset folder (default: data.root).")] = None,
             model: Annotated[Optional[str], typer.Option(help="Segment with this model (folder, runs:/, "
                                                          "models:/).")] = None,
             truth: Annotated[bool, typer.Option("--truth", help="Use the ground-truth masks instead of a "
                                                 "model.")] = False,
             oof: Annotated[bool, typer.Option("--oof", help="Out-of-fold predicted masks: one cheap segmenter per "
                                               "split fold (survival.oof), each predicting the patients it never saw.")]
             = False,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/features"),
             skip_unsupported: Annotated[bool, typer.Option("--skip-unsupported", help="With --oof: if data.csv "
                                                            "cannot support the death01 model (the fold "
                                                            "segmenters' only use), train none; the tables "
                                                            "then hold no features and source.json says why "
                                                            "(the pipeline's features stage).")] = False,
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Tumor area, centroid, spread and shape per slice and per patient (slices.csv, patients.csv, source.json)."""
    from brainseg.outcome.workflow import compute_features

    settings = settings_or_fail(profile, set_)
    try:
        res = compute_features(settings, out_dir=output, root=root, truth=truth, model=model, oof=oof,
                               skip_unsupported=skip_unsupported,
                               echo=lambda line: console.print(line, markup=False, highlight=False))
    except (FileNotFoundError, ValueError, ConfigError) as exc:
        fail(str(exc), 2)
    if res.get("skipped"):
        out.print(f"features --oof: skipped: {res['reason']}; no fold segmenter trained (they serve only the "
                  f"death01 model); {output}/ names the {res['patients']} patients without features "
                  f"(`brainseg features --truth` or `--model URI` gives features)")
        return
    out.print(f"features of {res['slices']} slices, {res['patients']} patients (masks: {res['features_from']}; "
              f"{'synthetic' if res['synthetic'] else 'real'} data {res['data_version'][:12]}) -> "
              f"{output}/slices.csv, patients.csv")


def survival(features_csv: Annotated[Path, typer.Option("--features", help="Per-patient features the final model is "
                                                        "fitted on (brainseg features --oof).")]
             = Path("reports/features/patients.csv"),
             compare_csv: Annotated[Optional[list[Path]], typer.Option("--compare", help="More per-patient feature "
                                                                       "tables to compare (e.g. --truth ones).")]
             = None,
             clinical_csv: Annotated[Optional[Path], typer.Option("--clinical", help="data.csv (default: "
                                                                  "data.root/data.csv).")] = None,
             output: Annotated[Path, typer.Option("--out")] = Path("reports/survival"),
             skip_unsupported: Annotated[bool, typer.Option("--skip-unsupported", help="If data.csv cannot support "
                                                            "the death01 cross-validation (no death01 for the "
                                                            "patients, or fewer than 2 of a class), write reports "
                                                            "saying so and exit 0 (the pipeline's survival stage).")]
             = False,
             profile: ProfileOpt = None, set_: SetOpt = None):
    """Repeated-CV comparison of death01 candidates, then the final pipeline of params.yaml, in MLflow."""
    from brainseg.data.clinical import ClinicalError
    from brainseg.outcome.workflow import run_survival, survival_skip_reason, write_skipped_survival

    settings = settings_or_fail(profile, set_)
    if not features_csv.is_file():
        fail(f"{features_csv}: per-patient features not found; compute them first with `brainseg features "
             f"--truth --out {features_csv.parent}` (ground-truth masks) or `brainseg features --oof --out "
             f"{features_csv.parent}` (predicted masks), or pass --features CSV", 2)
    try:
        reason = survival_skip_reason(settings, features_csv=features_csv, clinical_csv=clinical_csv)
    except (FileNotFoundError, ClinicalError, ValueError, KeyError) as exc:
        fail(str(exc), 2)
    if reason and not skip_unsupported:
        fail(reason, 2)
    if reason:
        write_skipped_survival(output, reason)
        out.print(f"survival: skipped: {reason} -> {output / 'cv.json'}", markup=False, highlight=False)
        return
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
    table = Table(title="death01: repeated stratified CV over patients; mean (2.5-97.5% of "
                        f"{int(r0.get('patients', 0))}-patient folds)")
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
