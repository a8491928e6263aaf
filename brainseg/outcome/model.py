"""The ``death01`` model: one row per patient, clinical codes and imaging features -> P(death01 = 1).

Pure scikit-learn; no tracking. Every fitted step (imputers, encoders, scaler, the regularisation
strength, the class threshold) lives in one ``Pipeline`` that is refitted inside each
cross-validation fold, so no held-out patient's values reach any of them. Rows are patients, so
folds never split one patient.

Columns by kind:

- nominal codes (genomic clusters, histology, site, laterality, location, gender, race,
  ethnicity): one-hot, missing as its own level, levels seen in fewer than ``min_frequency``
  training patients pooled; no target information is used.
- ordinal codes (``neoplasm_histologic_grade``: G2 < G3): one number, median-imputed, scaled.
- continuous (age, imaging features): median-imputed with a missing-indicator, scaled; the
  count-like imaging features (volume, slices, largest area, z-extent) are log1p-transformed.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from brainseg.data.clinical import CLINICAL_COLUMNS, CONTINUOUS_COLUMNS, TARGET
from brainseg.outcome.features import PATIENT_FEATURE_COLUMNS
from brainseg.settings.config import Classifier, FeatureSet

ORDINAL_COLUMNS = ["neoplasm_histologic_grade"]
NOMINAL_COLUMNS = [c for c in CLINICAL_COLUMNS if c not in CONTINUOUS_COLUMNS + ORDINAL_COLUMNS]
CODE_COLUMNS = NOMINAL_COLUMNS + ORDINAL_COLUMNS
IMAGING_COLUMNS = list(PATIENT_FEATURE_COLUMNS)
COUNT_COLUMNS = ["tumor_volume_px", "tumor_slices", "largest_slice_area_px", "extent_z"]  # log1p
FEATURE_SETS = typing.get_args(FeatureSet)  # ("clinical", "imaging", "both")
CLASSIFIERS = typing.get_args(Classifier)  # ("logreg", "rf", "gb")
C_GRID = tuple(float(c) for c in np.logspace(-3, 1, 9))  # logreg's inverse regularisation strengths


# ----------------------------------------------------------------------------------- the table
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
        img = img.set_index("patient")[[c for c in IMAGING_COLUMNS if c in img.columns]]
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
    wanted = {"clinical": CLINICAL_COLUMNS, "imaging": IMAGING_COLUMNS,
              "both": CLINICAL_COLUMNS + IMAGING_COLUMNS}[feature_set]
    present = [c for c in wanted if c in X.columns]
    empty = [c for c in present if X[c].isna().all()]
    notes = [f"dropped {c}: no values for any patient" for c in empty]
    columns = [c for c in present if c not in empty]
    if not columns:
        raise ValueError(f"feature set {feature_set!r} has no usable columns "
                         f"(imaging features missing or all empty?)")
    return columns, notes


# -------------------------------------------------------------------------------- the pipeline
class PrevalenceThreshold(ClassifierMixin, BaseEstimator):
    """A probabilistic classifier whose ``predict`` is P >= the training prevalence.

    With calibrated probabilities this is the decision that balances sensitivity and specificity
    (the 0.5 cut of a 24%-prevalence outcome calls almost everyone 0).
    """

    def __init__(self, estimator=None):
        self.estimator = estimator

    def fit(self, X, y):
        y = np.asarray(y)
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        self.threshold_ = float(np.mean(y == self.classes_[1]))
        return self

    def predict_proba(self, X):
        return self.estimator_.predict_proba(X)

    def predict(self, X):
        return self.classes_[(self.predict_proba(X)[:, 1] >= self.threshold_).astype(int)]


def preprocessor(columns: Sequence[str], min_frequency: int = 3) -> ColumnTransformer:
    """The column-wise steps for ``columns`` of a patients frame (see the module docstring)."""
    columns = list(columns)
    nominal = [c for c in columns if c in NOMINAL_COLUMNS]
    counts = [c for c in columns if c in COUNT_COLUMNS]
    numeric = [c for c in columns if c not in nominal and c not in counts]

    def scaled(*first):
        return Pipeline([*first, ("impute", SimpleImputer(strategy="median", add_indicator=True,
                                                          keep_empty_features=True)),
                         ("scale", StandardScaler())])

    parts = []
    if nominal:
        parts.append(("nominal", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=min_frequency,
                                               sparse_output=False), nominal))
    if counts:
        parts.append(("counts", scaled(("log1p", FunctionTransformer(np.log1p, feature_names_out="one-to-one"))),
                      counts))
    if numeric:
        parts.append(("numeric", scaled(), numeric))
    return ColumnTransformer(parts, remainder="drop", verbose_feature_names_out=True)


def make_classifier(name: str, seed: int = 0, inner_folds: int = 5):
    """``logreg``: L2 logistic regression whose C is chosen by an inner stratified CV on log-loss
    (nested inside any outer fold); ``rf`` / ``gb``: small, regularised tree ensembles."""
    if name == "logreg":
        return LogisticRegressionCV(Cs=list(C_GRID), cv=StratifiedKFold(inner_folds, shuffle=True, random_state=seed),
                                    scoring="neg_log_loss", l1_ratios=(0.0,), max_iter=5000,
                                    use_legacy_attributes=False)
    if name == "rf":
        return RandomForestClassifier(n_estimators=300, min_samples_leaf=5, random_state=seed, n_jobs=1)
    if name == "gb":
        return GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.05, subsample=0.8,
                                          random_state=seed)
    raise ValueError(f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}")


def make_pipeline(classifier: str, feature_columns: Sequence[str], seed: int = 0, inner_folds: int = 5,
                  min_frequency: int = 3) -> Pipeline:
    """preprocess (column-wise) -> classifier with a prevalence threshold, on a patients frame.

    The input is a DataFrame holding at least ``feature_columns`` (codes as float, NaN = missing).
    """
    return Pipeline([("preprocess", preprocessor(feature_columns, min_frequency)),
                     ("classify", PrevalenceThreshold(make_classifier(classifier, seed, inner_folds)))])


def chosen_c(fitted: Pipeline) -> float | None:
    """The C the inner CV chose in a fitted logreg pipeline (None for other classifiers)."""
    clf = fitted[-1].estimator_
    return float(np.ravel(clf.C_)[0]) if hasattr(clf, "C_") else None


def coefficients(fitted: Pipeline) -> pd.Series:
    """Signed logreg coefficients on the standardised / one-hot features (or tree importances),
    indexed by transformed feature name (``nominal__gender_2.0``), largest magnitude first."""
    clf = fitted[-1].estimator_
    names = fitted[0].get_feature_names_out()
    values = np.ravel(clf.coef_) if hasattr(clf, "coef_") else np.asarray(clf.feature_importances_)
    s = pd.Series(values, index=names, name="coefficient" if hasattr(clf, "coef_") else "importance")
    return s.reindex(s.abs().sort_values(ascending=False).index)
