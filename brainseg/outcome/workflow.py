"""The ``brainseg features`` and ``brainseg survival`` workflows: read, compute, track, write.

``compute_features`` writes slices.csv, patients.csv and source.json (which masks, which data
version, whether the data is synthetic); with ``skip_unsupported``, out-of-fold features of data
whose data.csv cannot support the death01 model are not computed (their fold segmenters exist only
for that model): the tables then hold the patients and slices without features, and source.json says
why. ``run_survival`` reads them, compares the candidates
with repeated CV, fits the final pipeline declared in params.yaml (``survival.final``) and logs
everything to MLflow, then writes cv.json, metrics.json, comparison.csv and importances.csv. Where
data.csv cannot support the cross-validation (``survival_skip_reason``), ``write_skipped_survival``
writes cv.json and metrics.json saying why instead, with no score and no model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from brainseg.data.arrays import load_full_images, load_full_masks
from brainseg.data.clinical import read_clinical
from brainseg.data.context import DataContext
from brainseg.data.layout import find_root
from brainseg.data.manifest import scan
from brainseg.data.synth import is_synthetic
from brainseg.data.version import data_version
from brainseg.outcome.cv import (
    common_patients,
    compare,
    find_result,
    inner_folds_for,
    permutation_importances,
    survival_unsupported,
)
from brainseg.outcome.features import features_for_manifest
from brainseg.outcome.model import coefficients, join_features, make_pipeline
from brainseg.outcome.oof import FoldReport, oof_masks
from brainseg.outcome.runs import log_fit, summary_row
from brainseg.registry.model_registry import load_segmenter
from brainseg.registry.modelcard import survival_failures
from brainseg.settings.config import EPOCH_SIZED, Settings, Train

SOURCE_FILE = "source.json"
REPORT_FILES = ("cv.json", "metrics.json", "comparison.csv", "importances.csv", "coefficients.csv")
# ------------------------------------------------------------------------------------ features
def compute_features(settings: Settings, *, out_dir: Path, root: Path | None = None, truth: bool = False,
                     model: str | None = None, oof: bool = False, skip_unsupported: bool = False,
                     echo: Callable[[str], None] = print) -> dict:
    """Per-slice and per-patient features from truth masks, one model's masks, or out-of-fold masks.

    ``oof`` trains one cheap segmenter per split fold (``survival.oof.train`` on top of ``train``)
    on the project's manifest and split; the others read the dataset at ``root`` (default data.root).
    ``skip_unsupported`` (with ``oof``): where data.csv cannot support the death01 model
    (:func:`outcome_unsupported`), no fold segmenter is trained and :func:`write_skipped_features`
    writes the tables without features; the result then has ``skipped`` and ``reason``.
    """
    if sum([truth, model is not None, oof]) != 1:
        raise ValueError("give exactly one of --truth, --model URI or --oof")
    if skip_unsupported and not oof:
        raise ValueError("--skip-unsupported goes with --oof (the features made for the death01 model)")
    reports = None
    if oof:
        if root is not None and Path(root).resolve() != Path(settings.data.root).resolve():
            raise ValueError("--oof uses the project's manifest and split: set data.root (--set data.root=...) "
                             "instead of a ROOT argument")
        ctx = DataContext.from_settings(settings)
        reason = skip_unsupported and outcome_unsupported(settings, ctx.manifest["patient"].astype(str).unique())
        if reason:
            return write_skipped_features(Path(out_dir), ctx.manifest, ctx.root, reason)
        # fold segmenters are sized in epochs (survival.oof.train): no recipe budget or resize schedule
        cfg = Train.from_dict({**settings.train.model_dump(), **EPOCH_SIZED, **settings.survival.oof.train.given()})
        found, m = ctx.root, ctx.manifest
        masks, reports = oof_masks(m, ctx.split, cfg, settings.evaluate.given(), cache_dir=ctx.cache_dir,
                                   version=ctx.version, on_fold=lambda r: echo(
                                       f"fold {r.fold}: trained on {r.train_patients} patients, val Dice "
                                       f"{r.val_patient_dice:.3f} (epoch {r.best_epoch}), predicted "
                                       f"{r.test_patients} patients in {r.seconds:.0f} s"))
        source = "oof_predicted"
    else:
        found = find_root(Path(root or settings.data.root))
        result = scan(found)
        for p in result.problems:
            echo(f"skipped: {p}")
        m = result.manifest
        if m.empty:
            raise ValueError(f"{found}: no usable slices")
    images = load_full_images(m)
    if truth:
        masks, source = load_full_masks(m), "truth"
    elif not oof:
        segmenter = load_segmenter(model)
        masks, source = segmenter.segment(images, groups=m["patient"].tolist()).masks, model
    slices, patients = features_for_manifest(m, masks, images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slices.to_csv(out_dir / "slices.csv", index=False)
    patients.to_csv(out_dir / "patients.csv", index=False)
    doc = {"masks": source, "features_from": source if source in ("truth", "oof_predicted") else f"model:{source}",
           "root": str(found), "data_version": data_version(found),
           "synthetic": is_synthetic(found, patients["patient"].tolist())}
    if reports is not None:
        doc["folds"] = [dataclasses.asdict(r) for r in reports]
        pd.DataFrame(doc["folds"]).to_csv(out_dir / "folds.csv", index=False)
    (out_dir / SOURCE_FILE).write_text(json.dumps(doc, indent=2))
    return {"slices": len(slices), "patients": len(patients), "out_dir": out_dir, **doc}


def write_skipped_features(out_dir: Path, manifest: pd.DataFrame, root: Path, reason: str) -> dict:
    """The out-of-fold features' outputs when the data cannot support the death01 model: patients.csv
    and slices.csv name the patients and slices with no feature column, folds.csv has no row, and
    source.json says ``skipped`` and why (the survival stage then skips on the same reason)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    patients = manifest["patient"].astype(str).drop_duplicates().tolist()
    manifest[["patient", "slice"]].to_csv(out_dir / "slices.csv", index=False)
    pd.DataFrame({"patient": patients}).to_csv(out_dir / "patients.csv", index=False)
    pd.DataFrame(columns=[f.name for f in dataclasses.fields(FoldReport)]).to_csv(out_dir / "folds.csv", index=False)
    doc = {"masks": None, "features_from": "skipped", "skipped": True, "reason": reason, "root": str(root),
           "data_version": data_version(root), "synthetic": is_synthetic(root, patients)}
    (out_dir / SOURCE_FILE).write_text(json.dumps(doc, indent=2))
    return {"slices": 0, "patients": len(patients), "out_dir": out_dir, **doc}


def read_features(csv: Path) -> tuple[pd.DataFrame, dict]:
    """A patients.csv and the source.json beside it (``features_from`` defaults to the file name)."""
    csv = Path(csv)
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: per-patient features not found; make them with "
                                f"`brainseg features --oof --out {csv.parent}` (or --truth)")
    source_file = csv.with_name(SOURCE_FILE)
    source = json.loads(source_file.read_text()) if source_file.is_file() else {}
    source.setdefault("features_from", source.get("masks", str(csv)))
    return pd.read_csv(csv), source


# ------------------------------------------------------------------------------------ survival
@dataclasses.dataclass
class SurvivalFit:
    """What ``brainseg survival`` computed: the compared candidates and the declared final pipeline."""

    results: list
    final: object            # the final candidate's SurvivalResult
    pipeline: object         # fitted on every patient
    X: pd.DataFrame          # the final candidate's feature table (features_from)
    y: pd.Series
    features_from: str
    join: dict
    notes: list
    importance: pd.DataFrame
    coefs: pd.DataFrame
    data_version: str
    fitted_on: str           # real | synthetic
    failures: dict


def fit_survival(settings: Settings, *, features_csv: Path, clinical_csv: Path | None = None,
                 compare_csvs: Sequence[Path] = ()) -> SurvivalFit:
    """Compare the candidates by repeated CV and fit the declared final pipeline (no tracking)."""
    sv = settings.survival
    root = Path(settings.data.root)
    main_table, source = read_features(features_csv)
    if source.get("skipped"):
        raise ValueError(f"{features_csv}: holds no features: `brainseg features --oof --skip-unsupported` skipped "
                         f"them ({source.get('reason')}); run `brainseg features --oof` again")
    clinical = read_clinical(Path(clinical_csv or root / "data.csv"))
    X_main, y, report = join_features(clinical, main_table)
    main_from = source["features_from"]
    tables = {main_from: X_main}
    for extra in compare_csvs:
        table, extra_source = read_features(extra)
        name = extra_source["features_from"]
        tables[name if name not in tables else f"{name}:{Path(extra).parent.name}"] = join_features(clinical, table)[0]
    tables, y = common_patients(tables, y)
    results = compare(tables, y, classifiers=sv.classifiers, feature_sets=sv.feature_sets, folds=sv.folds,
                      repeats=sv.repeats, seed=sv.seed, inner_folds=sv.inner_folds, min_frequency=sv.min_frequency)
    declared = sv.final
    final = find_result(results, declared.classifier, declared.feature_set, main_from)
    if final is None:
        raise ValueError(f"survival.final {declared.given()} is not among the compared candidates "
                         f"(survival.classifiers / survival.feature_sets)")
    notes = list(final.notes)
    if declared.features_from and declared.features_from != main_from:
        notes.append(f"survival.final declares features_from={declared.features_from} but the features "
                     f"given are {main_from}: the served model sees other masks than it was fitted on")
    X = tables[main_from]
    inner = inner_folds_for(y, sv.folds, sv.inner_folds)

    def factory():
        return make_pipeline(final.classifier, final.columns, seed=sv.seed, inner_folds=inner,
                             min_frequency=sv.min_frequency)

    pipeline = factory().fit(X[final.columns], y)
    importance = permutation_importances(factory, X[final.columns], y, folds=sv.folds, seed=sv.seed)
    version = source.get("data_version") or (data_version(root) if root.exists() else "unknown")
    fitted_on = "synthetic" if source.get("synthetic", is_synthetic(root, list(y.index))) else "real"
    failures = survival_failures(final.cv["fold_scores"], final.cv["oof_probability"], y,
                                 float(pipeline[-1].threshold_))
    return SurvivalFit(results, final, pipeline, X, y, main_from, report, notes, importance,
                       coefficients(pipeline).rename_axis("feature").reset_index(), version, fitted_on, failures)


def run_survival(settings: Settings, *, features_csv: Path, out_dir: Path, clinical_csv: Path | None = None,
                 compare_csvs: Sequence[Path] = (), experiment: str = "brainseg-survival") -> dict:
    """Fit (:func:`fit_survival`), log to MLflow (:func:`brainseg.outcome.runs.log_fit`), write the
    reports; returns the summary written to ``out_dir/cv.json`` (``final``, ``results``, run ids,
    ``final_model_uri``, and the final candidate's ``failures`` for its model card: worst folds,
    largest out-of-fold misses)."""
    fit = fit_survival(settings, features_csv=features_csv, clinical_csv=clinical_csv, compare_csvs=compare_csvs)
    logged = log_fit(fit, settings, experiment)
    final = fit.final
    summary = {"features_from": fit.features_from, "fitted_on": fit.fitted_on, "data_version": fit.data_version,
               "join": fit.join, "patients": int(len(fit.y)), "positives": int(fit.y.sum()), "notes": fit.notes,
               **logged,
               "final": {**summary_row(final), "key": final.key, "roc_auc_mean": final.cv["roc_auc_mean"],
                         "balanced_accuracy": final.cv["balanced_accuracy_mean"], "brier": final.cv["brier_mean"]},
               "failures": fit.failures, "results": [{**summary_row(r), "key": r.key} for r in fit.results]}
    _write_reports(Path(out_dir), summary, fit.results, fit.importance, fit.coefs)
    return summary


def survival_skip_reason(settings: Settings, *, features_csv: Path, clinical_csv: Path | None = None) -> str | None:
    """Why the data cannot support ``brainseg survival`` (:func:`brainseg.outcome.cv.survival_unsupported`:
    no data.csv, no death01 for the patients of ``features_csv``, too few of a class), or None.
    Reads data.csv and the features' patients; a data.csv that cannot be read raises ClinicalError."""
    return outcome_unsupported(settings, read_features(features_csv)[0]["patient"].astype(str).tolist(), clinical_csv)


def outcome_unsupported(settings: Settings, patients: Sequence[str], clinical_csv: Path | None = None) -> str | None:
    """Why data.csv (``clinical_csv``, default data.root/data.csv) cannot support the death01 model
    of ``patients`` (:func:`brainseg.outcome.cv.survival_unsupported`), or None."""
    path = Path(clinical_csv or Path(settings.data.root) / "data.csv")
    return survival_unsupported(read_clinical(path) if path.is_file() else None, list(patients), str(path))


def write_skipped_survival(out_dir: Path, reason: str) -> dict:
    """The survival stage's outputs when it did not run: cv.json and metrics.json say so and why (no
    score, no model); the other reports of an earlier run are removed, so that none is taken for
    this data's. Returns the summary written to cv.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:
        (out_dir / name).unlink(missing_ok=True)
    summary = {"skipped": True, "reason": reason}
    (out_dir / "cv.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "metrics.json").write_text(json.dumps({"survival_skipped": True}, indent=2))
    return summary


def _write_reports(out_dir: Path, summary: dict, results, importance: pd.DataFrame, coefs: pd.DataFrame) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cv.json").write_text(json.dumps(summary, indent=2, default=float))
    metrics = {f"{r.key.replace('/', '_').replace('@', '_')}_roc_auc": r.cv["roc_auc_mean"] for r in results}
    final = summary["final"]
    metrics.update({"final_roc_auc": final["roc_auc_mean"], "final_brier": final["brier"],
                    "final_balanced_accuracy": final["balanced_accuracy"],
                    "baseline_brier": final.get("baseline_brier"), "baseline_roc_auc": 0.5})
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pd.DataFrame(summary["results"]).to_csv(out_dir / "comparison.csv", index=False)
    importance.to_csv(out_dir / "importances.csv", index=False)
    coefs.to_csv(out_dir / "coefficients.csv", index=False)
