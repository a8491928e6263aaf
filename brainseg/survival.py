"""Outcome model: ``death01`` from clinical codes and imaging features, one row per patient.

Pure scikit-learn; no tracking. Every fitted step (imputer, rounding, scaler, classifier) lives in
one ``Pipeline`` and is refitted inside each cross-validation fold, so no held-out patient's values
reach the imputer or scaler. Rows are patients, so folds cannot split one patient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.calibration import CalibrationDisplay
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import KNNImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import RocCurveDisplay, brier_score_loss
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.model_selection import cross_validate as sk_cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from brainseg.data.clinical import CLINICAL_COLUMNS, CONTINUOUS_COLUMNS, TARGET
from brainseg.features import PATIENT_FEATURE_COLUMNS

FEATURE_SETS = ("clinical", "imaging", "both")
CLASSIFIERS = {
    "logreg": lambda seed: LogisticRegression(class_weight="balanced", max_iter=1000),
    "rf": lambda seed: RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1),
    "gb": lambda seed: GradientBoostingClassifier(random_state=seed),
}


def join_features(clinical: pd.DataFrame, imaging: pd.DataFrame | None
                  ) -> tuple[pd.DataFrame, pd.Series, dict]:
    """Inner-join data.csv rows with per-patient imaging features.

    ``clinical``: :func:`brainseg.data.clinical.read_clinical`'s frame (indexed by Patient);
    ``imaging``: one row per patient with a ``patient`` column (or None: clinical only).
    Returns X (patients x [clinical codes present + PATIENT_FEATURE_COLUMNS present], float,
    indexed by ``patient``, sorted), y (int 0/1, same index) and a report of the counts.
    Patients whose ``death01`` is missing are excluded and counted.
    """
    if TARGET not in clinical.columns:
        raise ValueError(f"clinical table has no {TARGET!r} column (columns: "
                         f"{', '.join(map(str, clinical.columns[:8]))})")
    clin = clinical.copy()
    clin.index = clin.index.astype(str)
    clin_cols = [c for c in CLINICAL_COLUMNS if c in clin.columns]
    report = {"clinical_patients": int(len(clin)), "imaging_patients": None,
              "imaging_without_clinical": [], "clinical_without_imaging": 0}
    if imaging is None:
        joined = clin[clin_cols + [TARGET]]
    else:
        if "patient" not in imaging.columns:
            raise ValueError("imaging table has no 'patient' column")
        img = imaging.assign(patient=imaging["patient"].astype(str))
        dups = img["patient"][img["patient"].duplicated()].unique().tolist()
        if dups:
            raise ValueError(f"imaging table lists patient(s) twice: {', '.join(dups[:5])}")
        img = img.set_index("patient")[[c for c in PATIENT_FEATURE_COLUMNS if c in img.columns]]
        report["imaging_patients"] = int(len(img))
        report["imaging_without_clinical"] = sorted(set(img.index) - set(clin.index))
        report["clinical_without_imaging"] = int(len(set(clin.index) - set(img.index)))
        joined = clin[clin_cols + [TARGET]].join(img, how="inner")
    report["matched"] = int(len(joined))
    if not len(joined):
        raise ValueError(f"no patient has both a data.csv row and imaging features "
                         f"({report['clinical_patients']} clinical, {report['imaging_patients']} "
                         f"imaging patients; check that patient ids look like TCGA_CS_4941)")
    missing = joined[TARGET].isna()
    report["excluded_missing_target"] = int(missing.sum())
    joined = joined[~missing].sort_index()
    target = pd.to_numeric(joined[TARGET], errors="coerce")
    values = sorted(set(target.dropna().tolist()))
    if target.isna().any() or not set(values) <= {0, 1}:
        raise ValueError(f"{TARGET} must be 0/1, found values {values[:6]}")
    if not len(joined):
        raise ValueError(f"all {report['matched']} matched patients lack {TARGET}")
    X = joined.drop(columns=[TARGET]).astype(float)
    X.index.name = "patient"
    y = target.astype(int).rename(TARGET)
    report.update(patients=int(len(y)), positives=int(y.sum()))
    return X, y, report


def feature_columns(X: pd.DataFrame, feature_set: str) -> tuple[list[str], list[str]]:
    """Columns of ``feature_set`` present in X, minus all-NaN ones; returns (columns, notes)."""
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; known: {', '.join(FEATURE_SETS)}")
    wanted = {"clinical": CLINICAL_COLUMNS, "imaging": PATIENT_FEATURE_COLUMNS,
              "both": CLINICAL_COLUMNS + PATIENT_FEATURE_COLUMNS}[feature_set]
    present = [c for c in wanted if c in X.columns]
    empty = [c for c in present if X[c].isna().all()]
    notes = [f"dropped {c}: no values for any patient" for c in empty]
    columns = [c for c in present if c not in empty]
    if not columns:
        raise ValueError(f"feature set {feature_set!r} has no usable columns "
                         f"(imaging features missing or all empty?)")
    return columns, notes


class SelectColumns(BaseEstimator, TransformerMixin):
    """First step: the named columns of a DataFrame, in order, as a float array (n, k)."""

    def __init__(self, columns: Sequence[str] = ()):
        self.columns = columns

    def fit(self, X, y=None):
        self.transform(X)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        if not isinstance(X, pd.DataFrame):
            return np.asarray(X, dtype=float)
        missing = [c for c in self.columns if c not in X.columns]
        if missing:
            raise ValueError(f"input lacks feature column(s): {', '.join(missing)}")
        return X[list(self.columns)].to_numpy(dtype=float)

    def get_feature_names_out(self, input_features=None):
        return np.asarray(self.columns, dtype=object)


class RoundCodes(BaseEstimator, TransformerMixin):
    """Rounds the columns flagged in ``mask`` to integers (imputed category codes, as the seed)."""

    def __init__(self, mask: Sequence[bool] = ()):
        self.mask = mask

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X):
        X = np.array(X, dtype=float)
        flags = np.asarray(self.mask, dtype=bool)
        X[:, flags] = np.round(X[:, flags])
        return X

    def get_feature_names_out(self, input_features=None):
        return np.asarray(input_features if input_features is not None
                          else [f"x{i}" for i in range(len(self.mask))], dtype=object)


def make_pipeline(classifier: str, feature_columns: Sequence[str], knn_neighbors: int = 4,
                  seed: int = 0) -> Pipeline:
    """select -> KNNImputer -> round codes -> StandardScaler -> classifier, on a patients frame.

    Category codes (CLINICAL_COLUMNS except CONTINUOUS_COLUMNS) are rounded after imputation;
    age and imaging features are left continuous. Columns empty in a training fold are kept
    (imputed as 0) so the column count never changes between folds.
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; known: {', '.join(CLASSIFIERS)}")
    columns = list(feature_columns)
    codes = [c in CLINICAL_COLUMNS and c not in CONTINUOUS_COLUMNS for c in columns]
    return Pipeline([
        ("select", SelectColumns(columns)),
        ("impute", KNNImputer(n_neighbors=knn_neighbors, keep_empty_features=True)),
        ("round", RoundCodes(codes)),
        ("scale", StandardScaler()),
        ("classify", CLASSIFIERS[classifier](seed)),
    ])


def cross_validate(pipeline_factory: Callable[[], Pipeline], X: pd.DataFrame, y: pd.Series,
                   folds: int = 5, repeats: int = 5, seed: int = 0,
                   return_estimators: bool = False) -> dict:
    """Repeated stratified k-fold over patients with a fresh pipeline fitted in every fold.

    Reports the mean over all folds x repeats of ROC-AUC, balanced accuracy (classes from
    ``predict``) and Brier score; ``roc_auc_ci_low/high`` are the 2.5th/97.5th percentiles of
    the fold-level AUCs (the spread of held-out performance, not a confidence interval of the
    population AUC). ``baseline_*`` are the same scores of the majority-class predictor (class and
    probability from the training fold's prevalence): AUC 0.5, balanced accuracy 0.5.
    ``oof_probability`` is each patient's held-out P(death01=1) averaged over repeats.
    Folds drop to the minority class count when it is smaller (recorded in ``notes``).
    ``return_estimators`` adds the fitted pipelines and their test indices (for checks).
    """
    counts = y.value_counts()
    if len(counts) < 2 or counts.min() < 2:
        raise ValueError(f"need at least 2 patients of each {y.name or 'target'} class, "
                         f"got {counts.to_dict()}")
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
    base_brier = []
    for est, test, train in zip(res["estimator"], res["indices"]["test"], res["indices"]["train"]):
        oof[test] += est.predict_proba(X.iloc[test])[:, 1] / repeats
        prior = y_arr[train].mean()
        base_brier.append(float(np.mean((prior - y_arr[test]) ** 2)))
    scores = pd.DataFrame({"repeat": np.arange(len(base_brier)) // n_splits,
                           "roc_auc": res["test_roc_auc"],
                           "balanced_accuracy": res["test_balanced_accuracy"],
                           "brier": -res["test_brier"], "baseline_brier": base_brier})
    low, high = np.percentile(scores["roc_auc"], [2.5, 97.5])
    out = {
        "roc_auc_mean": float(scores["roc_auc"].mean()),
        "roc_auc_std": float(scores["roc_auc"].std()),
        "roc_auc_ci_low": float(low), "roc_auc_ci_high": float(high),
        "balanced_accuracy": float(scores["balanced_accuracy"].mean()),
        "brier": float(scores["brier"].mean()),
        "baseline_roc_auc": 0.5, "baseline_balanced_accuracy": 0.5,
        "baseline_brier": float(np.mean(base_brier)),
        "folds": n_splits, "folds_requested": folds, "repeats": repeats, "seed": seed,
        "patients": int(len(y)), "positives": int(y.sum()), "notes": notes,
        "fold_scores": scores, "oof_probability": pd.Series(oof, index=y.index, name="probability"),
    }
    if return_estimators:
        out["estimators"] = list(res["estimator"])
        out["test_indices"] = [np.asarray(t) for t in res["indices"]["test"]]
    return out


def feature_importances(fitted_pipeline: Pipeline, columns: Sequence[str]) -> pd.Series:
    """|coefficient| (logreg, on standardised features) or impurity importance (trees), sorted."""
    clf = fitted_pipeline[-1]
    if hasattr(clf, "coef_"):
        values = np.abs(np.ravel(clf.coef_))
    elif hasattr(clf, "feature_importances_"):
        values = np.asarray(clf.feature_importances_)
    else:
        raise ValueError(f"{type(clf).__name__} has neither coef_ nor feature_importances_")
    if len(values) != len(columns):
        raise ValueError(f"{len(values)} importances for {len(columns)} columns")
    return pd.Series(values, index=list(columns), name="importance").sort_values(ascending=False)


@dataclasses.dataclass
class SurvivalResult:
    """One classifier x feature set: CV scores, and a pipeline refitted on all patients."""

    classifier: str
    feature_set: str
    columns: list[str]
    notes: list[str]
    cv: dict
    y: pd.Series
    pipeline: Pipeline
    importances: pd.Series


def compare(X: pd.DataFrame, y: pd.Series, classifiers: Sequence[str] = tuple(CLASSIFIERS),
            feature_sets: Sequence[str] = FEATURE_SETS, folds: int = 5, repeats: int = 5,
            seed: int = 0, knn_neighbors: int = 4) -> list[SurvivalResult]:
    """Cross-validate every classifier x feature set, then refit each on all patients (the refit
    is for importances and for serving; the honest scores are the cross-validated ones)."""
    results = []
    for feature_set in feature_sets:
        columns, notes = feature_columns(X, feature_set)
        for name in classifiers:
            def factory(name=name, columns=columns):
                return make_pipeline(name, columns, knn_neighbors=knn_neighbors, seed=seed)
            cv = cross_validate(factory, X, y, folds=folds, repeats=repeats, seed=seed)
            final = factory().fit(X, y)
            results.append(SurvivalResult(name, feature_set, columns, notes + cv["notes"], cv, y,
                                          final, feature_importances(final, columns)))
    return results


def best_result(results: Sequence[SurvivalResult]) -> SurvivalResult:
    """Highest mean cross-validated ROC-AUC (first listed on ties)."""
    return max(results, key=lambda r: r.cv["roc_auc_mean"])


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
