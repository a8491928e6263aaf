"""Honest scores of the ``death01`` model: repeated stratified CV over patients, feature-set and
feature-source comparison, permutation importance, figures. Pure scikit-learn; no tracking."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.calibration import CalibrationDisplay
from sklearn.inspection import permutation_importance
from sklearn.metrics import RocCurveDisplay, brier_score_loss
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold
from sklearn.model_selection import cross_validate as sk_cross_validate
from sklearn.pipeline import Pipeline

from brainseg.data.clinical import TARGET
from brainseg.outcome.model import CLASSIFIERS, FEATURE_SETS, chosen_c, feature_columns, make_pipeline

SCORES = ("roc_auc", "balanced_accuracy", "brier")


def inner_folds_for(y: pd.Series, outer_folds: int, wanted: int = 5) -> int:
    """Inner CV folds that every outer training fold can stratify (>= 2)."""
    minority = int(y.value_counts().min())
    return max(2, min(wanted, minority * (outer_folds - 1) // outer_folds))


MIN_PER_CLASS = 2  # the least of each class a stratified CV takes: cross_validate's folds drop to it, not below


def too_few_per_class(y: pd.Series) -> str | None:
    """Why a stratified CV cannot score the 0/1 labels ``y`` (one per patient), in words: fewer than
    MIN_PER_CLASS patients of a class (more folds than that are reduced, see :func:`cross_validate`).
    None when it can.

    >>> print(too_few_per_class(pd.Series([1, 0, 0, 0, 0, 0], name="death01")))
    death01 = 1 for 1 of 6 patients (5 with 0): the cross-validation needs at least 2 patients of each death01 class
    >>> too_few_per_class(pd.Series([1, 0, 1, 0], name="death01")) is None
    True
    """
    name = y.name or "target"
    counts = y.value_counts()
    if len(counts) >= 2 and counts.min() >= MIN_PER_CLASS:
        return None
    positives = int((y == 1).sum())
    return (f"{name} = 1 for {positives} of {len(y)} patients ({len(y) - positives} with 0): the cross-validation "
            f"needs at least {MIN_PER_CLASS} patients of each {name} class")


def survival_unsupported(clinical: pd.DataFrame | None, patients: Sequence[str], source: str = "data.csv"
                         ) -> str | None:
    """Why data.csv's rows cannot support the death01 CV of the imaged ``patients``, in words, or None.

    ``clinical``: :func:`brainseg.data.clinical.read_clinical`'s frame (indexed by Patient), None when
    there is no ``source`` file. Reasons: no file, no death01 for any of ``patients``, fewer than
    MIN_PER_CLASS of a class among those with one (:func:`too_few_per_class`). Values other than 0/1
    are not a reason to skip: None, and the survival workflow refuses them by name.
    """
    n = len(patients)
    if clinical is None:
        return f"{source} not found: no {TARGET} for the {n} patients"
    column = clinical[TARGET] if TARGET in clinical.columns else pd.Series(dtype=float)
    column = pd.to_numeric(column, errors="coerce").set_axis(column.index.astype(str))
    known = column.reindex([str(p) for p in patients]).dropna()
    if known.empty:
        return f"{source} has no {TARGET} for the {n} patients"
    if not set(known) <= {0, 1}:
        return None
    reason = too_few_per_class(known.astype(int).rename(TARGET))
    unknown = f" ({n - len(known)} of the {n} patients have no {TARGET})" if len(known) < n else ""
    return f"{source}: {reason}{unknown}" if reason else None


def cross_validate(pipeline_factory: Callable[[], Pipeline], X: pd.DataFrame, y: pd.Series,
                   folds: int = 5, repeats: int = 5, seed: int = 0,
                   return_estimators: bool = False) -> dict:
    """Repeated stratified k-fold over patients with a fresh pipeline fitted in every fold.

    For ROC-AUC, balanced accuracy (classes from ``predict``) and Brier score it reports the mean
    over all folds x repeats (``<score>_mean``) and the 2.5th / 97.5th percentiles of the fold
    values (``<score>_low`` / ``_high``: the spread of held-out performance, not a confidence
    interval). ``baseline_brier`` is the Brier score of predicting the training fold's prevalence
    (AUC 0.5, balanced accuracy 0.5). ``oof_probability`` is each patient's held-out
    P(death01=1) averaged over repeats; ``c_median`` the median C chosen by logreg's inner CV.
    Folds drop to the minority class count when it is smaller (recorded in ``notes``).
    """
    refusal = too_few_per_class(y)
    if refusal:
        raise ValueError(refusal)
    counts = y.value_counts()
    notes = []
    n_splits = min(folds, int(counts.min()))
    if n_splits < folds:
        notes.append(f"folds reduced from {folds} to {n_splits}: minority class has "
                     f"{int(counts.min())} patients")
    cv = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=repeats, random_state=seed)
    res = sk_cross_validate(pipeline_factory(), X, y, cv=cv, return_estimator=True,
                            return_indices=True, error_score="raise",
                            scoring={"roc_auc": "roc_auc", "balanced_accuracy": "balanced_accuracy",
                                     "brier": "neg_brier_score"})
    y_arr = y.to_numpy()
    oof = np.zeros(len(y))
    base_brier, cs = [], []
    for est, test, train in zip(res["estimator"], res["indices"]["test"], res["indices"]["train"]):
        oof[test] += est.predict_proba(X.iloc[test])[:, 1] / repeats
        base_brier.append(float(np.mean((y_arr[train].mean() - y_arr[test]) ** 2)))
        cs.append(chosen_c(est))
    scores = pd.DataFrame({"repeat": np.arange(len(base_brier)) // n_splits,
                           "roc_auc": res["test_roc_auc"],
                           "balanced_accuracy": res["test_balanced_accuracy"],
                           "brier": -res["test_brier"], "baseline_brier": base_brier})
    out = {}
    for name in SCORES:
        low, high = np.percentile(scores[name], [2.5, 97.5])
        out.update({f"{name}_mean": float(scores[name].mean()), f"{name}_std": float(scores[name].std()),
                    f"{name}_low": float(low), f"{name}_high": float(high)})
    known_cs = [c for c in cs if c is not None]
    out.update({
        "baseline_roc_auc": 0.5, "baseline_balanced_accuracy": 0.5,
        "baseline_brier": float(np.mean(base_brier)),
        "c_median": float(np.median(known_cs)) if known_cs else float("nan"),
        "folds": n_splits, "folds_requested": folds, "repeats": repeats, "seed": seed,
        "patients": int(len(y)), "positives": int(y.sum()), "notes": notes,
        "fold_scores": scores, "oof_probability": pd.Series(oof, index=y.index, name="probability"),
    })
    if return_estimators:
        out["estimators"] = list(res["estimator"])
        out["test_indices"] = [np.asarray(t) for t in res["indices"]["test"]]
    return out


def permutation_importances(pipeline_factory: Callable[[], Pipeline], X: pd.DataFrame, y: pd.Series,
                            folds: int = 5, seed: int = 0, n_repeats: int = 10) -> pd.DataFrame:
    """Held-out permutation importance (drop in ROC-AUC) of every input column of X.

    One stratified k-fold pass: each fold's pipeline is fitted on the other folds and each column
    of its test fold permuted ``n_repeats`` times. Returns columns feature, auc_drop_mean,
    auc_drop_std (over folds x repeats), largest drop first. Input fields, not encoded ones.
    """
    n_splits = min(folds, int(y.value_counts().min()))
    drops = []
    for train, test in StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(X, y):
        est = pipeline_factory().fit(X.iloc[train], y.iloc[train])
        r = permutation_importance(est, X.iloc[test], y.iloc[test], scoring="roc_auc",
                                   n_repeats=n_repeats, random_state=seed)
        drops.append(r.importances)
    all_drops = np.concatenate(drops, axis=1)
    table = pd.DataFrame({"feature": list(X.columns), "auc_drop_mean": all_drops.mean(axis=1),
                          "auc_drop_std": all_drops.std(axis=1)})
    return table.sort_values("auc_drop_mean", ascending=False).reset_index(drop=True)


# --------------------------------------------------------------------------------- comparison
@dataclasses.dataclass
class SurvivalResult:
    """One classifier x feature set x feature source: its CV scores."""

    classifier: str
    feature_set: str
    features_from: str   # which masks the imaging features came from; "none" for clinical
    columns: list[str]
    notes: list[str]
    cv: dict

    @property
    def key(self) -> str:
        return f"{self.classifier}/{self.feature_set}" + (
            "" if self.feature_set == "clinical" else f"@{self.features_from}")


def common_patients(tables: Mapping[str, pd.DataFrame], y: pd.Series) -> tuple[dict, pd.Series]:
    """Restrict every source's X (and y) to the patients all sources share, so they compare on
    the same patients and the same folds."""
    keep = y.index
    for X in tables.values():
        keep = keep.intersection(X.index)
    return {k: X.loc[keep] for k, X in tables.items()}, y.loc[keep]


def compare(tables: Mapping[str, pd.DataFrame], y: pd.Series, classifiers: Sequence[str] = CLASSIFIERS,
            feature_sets: Sequence[str] = FEATURE_SETS, folds: int = 5, repeats: int = 5,
            seed: int = 0, inner_folds: int = 5, min_frequency: int = 3) -> list[SurvivalResult]:
    """Cross-validate every classifier x feature set x source (``tables``: features_from -> X
    with the clinical columns and that source's imaging columns, same patients as ``y``).
    The clinical set is scored once (from the first source). All candidates share the folds."""
    results = []
    inner = inner_folds_for(y, folds, inner_folds)
    for feature_set in feature_sets:
        sources = list(tables)[:1] if feature_set == "clinical" else list(tables)
        for source in sources:
            X = tables[source]
            columns, notes = feature_columns(X, feature_set)
            for name in classifiers:
                def factory(name=name, columns=columns):
                    return make_pipeline(name, columns, seed=seed, inner_folds=inner, min_frequency=min_frequency)
                cv = cross_validate(factory, X, y, folds=folds, repeats=repeats, seed=seed)
                results.append(SurvivalResult(name, feature_set, "none" if feature_set == "clinical" else source,
                                              columns, notes + cv["notes"], cv))
    return results


def find_result(results: Sequence[SurvivalResult], classifier: str, feature_set: str,
                features_from: str) -> SurvivalResult | None:
    for r in results:
        if r.classifier == classifier and r.feature_set == feature_set and (
                feature_set == "clinical" or r.features_from == features_from):
            return r
    return None


# ------------------------------------------------------------------------------------ figures
def roc_figure(y: pd.Series | np.ndarray, prob: np.ndarray) -> Figure:
    """ROC curve of out-of-fold probabilities with the chance line."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    RocCurveDisplay.from_predictions(np.asarray(y), np.asarray(prob), ax=ax, name="out-of-fold",
                                     plot_chance_level=True)
    ax.set_title(f"ROC ({TARGET})")
    fig.tight_layout()
    return fig


def calibration_figure(y: pd.Series | np.ndarray, prob: np.ndarray, n_bins: int = 5) -> Figure:
    """Reliability curve (quantile bins) of out-of-fold probabilities."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    CalibrationDisplay.from_predictions(np.asarray(y), np.asarray(prob), n_bins=n_bins,
                                        strategy="quantile", ax=ax, name="out-of-fold")
    ax.set_title(f"calibration ({TARGET}), Brier {brier_score_loss(np.asarray(y), prob):.3f}")
    fig.tight_layout()
    return fig
