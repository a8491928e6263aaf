"""Outcome model: the join, fold-internal fitting, honest CV on synthetic data, the logged model."""

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from brainseg import survival
from brainseg.data import clinical, imageio, manifest, synth
from brainseg.features import features_for_manifest
from brainseg.survival_log import CLASS, PROBABILITY, log_final_model, log_survival_runs


def clinical_frame(rows):
    """rows: (patient, gender code, age, death01)."""
    df = pd.DataFrame(rows, columns=["Patient", "gender", "age_at_initial_pathologic", "death01"])
    return df.set_index("Patient")


def imaging_frame(patients, volumes):
    return pd.DataFrame({"patient": patients, "tumor_volume_px": volumes,
                         "centroid_x": np.nan})


# ---- join ---------------------------------------------------------------------------------

def test_join_counts_reports_unknown_and_excludes_missing_target():
    clin = clinical_frame([("A", 1, 40, 1), ("B", 2, 50, 0), ("C", np.nan, 60, np.nan),
                           ("D", 1, 30, 0)])
    img = imaging_frame(["A", "B", "C", "Z"], [10, 20, 30, 40])
    X, y, report = survival.join_features(clin, img)
    assert report == {"clinical_patients": 4, "imaging_patients": 4, "matched": 3,
                      "imaging_without_clinical": ["Z"], "clinical_without_imaging": 1,
                      "excluded_missing_target": 1, "patients": 2, "positives": 1}
    assert X.index.tolist() == ["A", "B"] and y.tolist() == [1, 0]
    assert list(X.columns) == ["gender", "age_at_initial_pathologic", "tumor_volume_px",
                               "centroid_x"]
    assert X.loc["B", "tumor_volume_px"] == 20


def test_join_without_imaging_keeps_clinical_columns():
    clin = clinical_frame([("A", 1, 40, 1), ("B", 2, 50, 0)])
    X, y, report = survival.join_features(clin, None)
    assert list(X.columns) == ["gender", "age_at_initial_pathologic"]
    assert report["matched"] == 2 and report["imaging_patients"] is None


@pytest.mark.parametrize("clin, img, message", [
    (clinical_frame([("A", 1, 40, 1)]), imaging_frame(["Z"], [1]), "no patient has both"),
    (clinical_frame([("A", 1, 40, 1)]).drop(columns="death01"), None, "no 'death01' column"),
    (clinical_frame([("A", 1, 40, 2), ("B", 1, 40, 0)]), None, r"must be 0/1.*2"),
    (clinical_frame([("A", 1, 40, np.nan)]), None, "lack death01"),
    (clinical_frame([("A", 1, 40, 1)]), imaging_frame(["A", "A"], [1, 2]), "twice: A"),
])
def test_join_refuses(clin, img, message):
    with pytest.raises(ValueError, match=message):
        survival.join_features(clin, img)


def test_feature_sets_drop_empty_columns_with_note():
    clin = clinical_frame([("A", 1, 40, 1), ("B", 2, 50, 0)])
    X, _, _ = survival.join_features(clin, imaging_frame(["A", "B"], [10, 20]))
    columns, notes = survival.feature_columns(X, "imaging")
    assert columns == ["tumor_volume_px"]
    assert notes == ["dropped centroid_x: no values for any patient"]
    assert survival.feature_columns(X, "both")[0] == ["gender", "age_at_initial_pathologic",
                                                      "tumor_volume_px"]
    with pytest.raises(ValueError, match="known: clinical, imaging, both"):
        survival.feature_columns(X, "genes")
    X_clin, _, _ = survival.join_features(clin, None)
    with pytest.raises(ValueError, match="no usable columns"):
        survival.feature_columns(X_clin, "imaging")


# ---- pipeline -----------------------------------------------------------------------------

def test_unknown_classifier_lists_known_names():
    with pytest.raises(ValueError, match="known: logreg, rf, gb"):
        survival.make_pipeline("svm", ["gender"])


def test_imputed_codes_are_rounded_but_age_and_imaging_are_not():
    X = pd.DataFrame({"gender": [1, 2, 2, np.nan, 2],
                      "age_at_initial_pathologic": [30, np.nan, 52, 45, 60],
                      "tumor_volume_px": [1.25, 2.5, np.nan, 3.5, 4.5]})
    y = pd.Series([0, 1, 1, 0, 1])
    pipe = survival.make_pipeline("logreg", list(X.columns), knn_neighbors=4).fit(X, y)
    imputed = pipe[:3].transform(X)  # each gap: the mean of the 4 other rows, then codes rounded
    assert imputed[3, 0] == 2.0                                        # 1.75 -> 2
    assert imputed[1, 1] == pytest.approx((30 + 52 + 45 + 60) / 4)     # age stays continuous
    assert imputed[2, 2] == pytest.approx((1.25 + 2.5 + 3.5 + 4.5) / 4)
    assert not np.isnan(imputed).any()
    assert list(pipe[:-1].get_feature_names_out()) == list(X.columns)


def synthetic_xy(n=30, seed=0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"gender": rng.integers(1, 3, n).astype(float),
                      "tumor_volume_px": rng.normal(0, 1, n)},
                     index=[f"P{i:02d}" for i in range(n)])
    X.iloc[::4, 0] = np.nan
    y = pd.Series((X["tumor_volume_px"] + rng.normal(0, 0.5, n) > 0).astype(int), index=X.index)
    return X, y


def test_imputer_is_fitted_on_training_rows_only():
    X, y = synthetic_xy()
    cols = list(X.columns)
    cv = survival.cross_validate(lambda: survival.make_pipeline("logreg", cols), X, y,
                                 folds=3, repeats=2, seed=0, return_estimators=True)
    assert len(cv["estimators"]) == 6
    seen = []
    for est, test in zip(cv["estimators"], cv["test_indices"]):
        train = np.setdiff1d(np.arange(len(X)), test)
        fitted_rows = est.named_steps["impute"]._fit_X
        np.testing.assert_array_equal(fitted_rows, X.iloc[train][cols].to_numpy())
        seen.append(frozenset(test))
    # each repeat's test folds partition the patients
    for r in range(2):
        folds = seen[3 * r:3 * r + 3]
        assert sum(len(f) for f in folds) == len(X) and len(frozenset().union(*folds)) == len(X)


def test_cross_validate_reduces_folds_for_small_minority_and_reports_baseline():
    X, _ = synthetic_xy(12)
    y = pd.Series([1, 1, 1] + [0] * 9, index=X.index)
    cv = survival.cross_validate(lambda: survival.make_pipeline("logreg", list(X.columns)), X, y,
                                 folds=5, repeats=2, seed=1)
    assert cv["folds"] == 3 and cv["folds_requested"] == 5
    assert cv["notes"] == ["folds reduced from 5 to 3: minority class has 3 patients"]
    assert len(cv["fold_scores"]) == 6
    assert cv["baseline_roc_auc"] == 0.5 and cv["baseline_balanced_accuracy"] == 0.5
    # prior predictor: training prevalence 2/8 against test folds with one positive in four
    assert cv["baseline_brier"] == pytest.approx((0.75 ** 2 + 3 * 0.25 ** 2) / 4)
    assert cv["oof_probability"].index.equals(y.index)
    assert cv["oof_probability"].between(0, 1).all()


def test_cross_validate_refuses_one_class():
    X, _ = synthetic_xy(8)
    with pytest.raises(ValueError, match="at least 2 patients of each"):
        survival.cross_validate(lambda: survival.make_pipeline("logreg", list(X.columns)), X,
                                pd.Series([0] * 7 + [1], index=X.index, name="death01"))


@pytest.mark.parametrize("classifier", ["logreg", "rf"])
def test_feature_importances(classifier):
    X, y = synthetic_xy()
    pipe = survival.make_pipeline(classifier, list(X.columns)).fit(X, y)
    imp = survival.feature_importances(pipe, list(X.columns))
    assert set(imp.index) == {"gender", "tumor_volume_px"}
    assert imp.index[0] == "tumor_volume_px"  # the column y was made from
    assert (imp >= 0).all()


def test_figures_render():
    y = np.array([0, 0, 1, 1, 0, 1])
    prob = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    for fig in (survival.roc_figure(y, prob), survival.calibration_figure(y, prob, n_bins=2)):
        assert fig.axes and fig.axes[0].lines
        fig.savefig(Path("/dev/null"), format="png")


# ---- synthetic dataset end to end ---------------------------------------------------------

@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("k3m"), patients=40, slices=8, size=32, seed=0)


@pytest.fixture(scope="module")
def synth_xy(synth_root):
    m = manifest.scan(synth_root).manifest
    masks = [imageio.read_mask(Path(p)) for p in m["mask_path"]]
    _, patients = features_for_manifest(m, masks)
    return survival.join_features(clinical.read_clinical(synth_root / "data.csv"), patients)


@pytest.mark.parametrize("feature_set, min_auc", [("imaging", 0.65), ("both", 0.55)])
def test_imaging_features_carry_signal_on_synthetic_data(synth_xy, feature_set, min_auc):
    # synthetic death01 depends on lesion volume and age; the other codes are noise
    X, y, report = synth_xy
    assert report["matched"] == 40 and report["imaging_without_clinical"] == []
    columns, _ = survival.feature_columns(X, feature_set)
    cv = survival.cross_validate(lambda: survival.make_pipeline("logreg", columns), X, y,
                                 folds=5, repeats=2, seed=0)
    assert cv["roc_auc_mean"] > min_auc
    assert cv["roc_auc_ci_low"] <= cv["roc_auc_mean"] <= cv["roc_auc_ci_high"]


def test_semicolon_data_csv_reads_like_comma(synth_root, tmp_path):
    comma = clinical.read_clinical(synth_root / "data.csv")
    path = tmp_path / "data.csv"
    pd.read_csv(synth_root / "data.csv").to_csv(path, sep=";", index=False)
    semi = clinical.read_clinical(path)
    pd.testing.assert_frame_equal(semi, comma)
    X, y, _ = survival.join_features(semi, None)
    assert len(X) == 40 and y.isin([0, 1]).all()


def test_non_numeric_code_is_refused_naming_column(synth_root, tmp_path):
    df = pd.read_csv(synth_root / "data.csv")
    df["gender"] = df["gender"].astype(object)
    df.loc[3, "gender"] = "male"
    df.to_csv(tmp_path / "data.csv", index=False)
    with pytest.raises(clinical.ClinicalError, match="'gender' has non-numeric value 'male'"):
        clinical.read_clinical(tmp_path / "data.csv")


# ---- MLflow -------------------------------------------------------------------------------

@pytest.fixture
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("survival-test", artifact_location=str(tmp_path / "artifacts"))
    mlflow.set_experiment(experiment_id=exp)
    yield client
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


def test_logged_runs_and_final_model_load_back(synth_xy, tracking):
    X, y, report = synth_xy
    results = survival.compare(X, y, classifiers=["logreg"], feature_sets=["imaging", "both"],
                               folds=3, repeats=1, seed=0)
    logged = log_survival_runs(results, features_from="truth", tags={"data_version": "abc"},
                               join_report=report)
    assert set(logged["runs"]) == {"logreg/imaging", "logreg/both"}
    child = tracking.get_run(logged["runs"]["logreg/imaging"])
    assert child.data.params["feature_set"] == "imaging" and child.data.params["folds"] == "3"
    assert child.data.tags["features_from"] == "truth" and child.data.tags["data_version"] == "abc"
    assert child.data.tags["mlflow.parentRunId"] == logged["parent_run_id"]
    assert child.data.metrics["baseline_roc_auc"] == 0.5
    assert child.data.metrics["roc_auc_mean"] == pytest.approx(results[0].cv["roc_auc_mean"])
    names = {a.path for a in tracking.list_artifacts(child.info.run_id)}
    assert {"roc.png", "calibration.png", "feature_importances.csv"} <= names
    parent = tracking.get_run(logged["parent_run_id"])
    assert parent.data.tags["best_run_id"] == logged["runs"][logged["best"]]

    best = survival.best_result(results)
    run_id, uri = log_final_model(best.pipeline, X, columns=best.columns,
                                  run_id=logged["parent_run_id"])
    assert run_id == logged["parent_run_id"]
    model = mlflow.pyfunc.load_model(uri)
    batch = X[best.columns].head(5).copy()
    batch.iloc[0, 0] = np.nan  # missing values are imputed, not refused
    out = model.predict(batch)
    assert list(out.columns) == [PROBABILITY, CLASS]
    expected = best.pipeline.predict_proba(batch)[:, 1]
    np.testing.assert_allclose(out[PROBABILITY].to_numpy(), expected)
    assert out[CLASS].tolist() == (expected >= 0.5).astype(int).tolist()
    assert not math.isnan(out[PROBABILITY].iloc[0])
    assert [c.name for c in model.metadata.get_input_schema().inputs] == best.columns
