"""Outcome model: the join, the column-wise pipeline, fold-internal fitting, nested C, honest CV on
synthetic data, the comparison across feature sources, and the `survival` command end to end."""

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from brainseg.data import clinical, imageio, manifest, synth
from brainseg.outcome import cv as outcome_cv
from brainseg.outcome import model
from brainseg.outcome.features import features_for_manifest
from conftest import Tracking, make_project
from helpers import invoke


def clinical_frame(rows):
    """rows: (patient, gender code, age, death01)."""
    df = pd.DataFrame(rows, columns=["Patient", "gender", "age_at_initial_pathologic", "death01"])
    return df.set_index("Patient")


def imaging_frame(patients, volumes):
    return pd.DataFrame({"patient": patients, "tumor_volume_px": volumes, "centroid_x": np.nan})


# ---- join ---------------------------------------------------------------------------------

def test_join_counts_reports_unknown_and_excludes_missing_target():
    clin = clinical_frame([("A", 1, 40, 1), ("B", 2, 50, 0), ("C", np.nan, 60, np.nan), ("D", 1, 30, 0)])
    X, y, report = model.join_features(clin, imaging_frame(["A", "B", "C", "Z"], [10, 20, 30, 40]))
    assert report == {"clinical_patients": 4, "imaging_patients": 4, "matched": 3,
                      "imaging_without_clinical": ["Z"], "clinical_without_imaging": 1,
                      "excluded_missing_target": 1, "patients": 2, "positives": 1}
    assert X.index.tolist() == ["A", "B"] and y.tolist() == [1, 0]
    assert list(X.columns) == ["gender", "age_at_initial_pathologic", "tumor_volume_px", "centroid_x"]


@pytest.mark.parametrize("clin, img, message", [
    (clinical_frame([("A", 1, 40, 1)]), imaging_frame(["Z"], [1]), "no patient has both"),
    (clinical_frame([("A", 1, 40, 1)]).drop(columns="death01"), None, "no 'death01' column"),
    (clinical_frame([("A", 1, 40, 2), ("B", 1, 40, 0)]), None, r"must be 0/1.*2"),
    (clinical_frame([("A", 1, 40, np.nan)]), None, "lack death01"),
    (clinical_frame([("A", 1, 40, 1)]), imaging_frame(["A", "A"], [1, 2]), "twice: A"),
])
def test_join_refuses(clin, img, message):
    with pytest.raises(ValueError, match=message):
        model.join_features(clin, img)


def test_feature_sets_drop_empty_columns_with_note():
    clin = clinical_frame([("A", 1, 40, 1), ("B", 2, 50, 0)])
    X, _, _ = model.join_features(clin, imaging_frame(["A", "B"], [10, 20]))
    assert model.feature_columns(X, "imaging") == (["tumor_volume_px"],
                                                   ["dropped centroid_x: no values for any patient"])
    with pytest.raises(ValueError, match="known: clinical, imaging, both"):
        model.feature_columns(X, "genes")


# ---- the pipeline -------------------------------------------------------------------------

def test_unknown_classifier_lists_known_names():
    with pytest.raises(ValueError, match="known: logreg, rf, gb"):
        model.make_pipeline("svm", ["gender"])


TRAIN = pd.DataFrame({
    "gender": [1, 2, 2, np.nan, 2, 1],
    "neoplasm_histologic_grade": [1, 2, np.nan, 2, 1, 2],
    "age_at_initial_pathologic": [30, np.nan, 52, 45, 60, 40],
    "tumor_volume_px": [0, 9, np.nan, 99, 999, 9],
})


@pytest.mark.parametrize("feature, expected", [
    # one-hot, missing as its own level (min_frequency 1 keeps every level)
    ("nominal__gender_1.0", [1, 0, 0, 0, 0, 1]),
    ("nominal__gender_nan", [0, 0, 0, 1, 0, 0]),
    # ordinal grade: one column, median-imputed (2), then standardised
    ("numeric__neoplasm_histologic_grade", None),
    # a missing-indicator beside age (standardised like the other numbers)
    ("numeric__missingindicator_age_at_initial_pathologic", "indicator"),
])
def test_preprocessor_columns(feature, expected):
    pre = model.preprocessor(list(TRAIN.columns), min_frequency=1).fit(TRAIN)
    names = list(pre.get_feature_names_out())
    assert "nominal__gender_2.0" in names and feature in names
    values = pre.transform(TRAIN)[:, names.index(feature)]
    if expected == "indicator":
        raw = np.array([0, 1, 0, 0, 0, 0], float)
        np.testing.assert_allclose(values, (raw - raw.mean()) / raw.std())
    elif expected is not None:
        assert values.tolist() == expected
    else:  # imputed with the median of 1, 2, 2, 1, 2 -> 2; scaled over [1, 2, 2, 2, 1, 2]
        raw = np.array([1, 2, 2, 2, 1, 2], float)
        np.testing.assert_allclose(values, (raw - raw.mean()) / raw.std())


def test_counts_are_log1p_then_median_imputed():
    pre = model.preprocessor(["tumor_volume_px"]).fit(TRAIN)
    imputer = pre.named_transformers_["counts"].named_steps["impute"]
    # log1p of 0, 9, 99, 999, 9 -> median log1p(9) = log(10)
    assert imputer.statistics_[0] == pytest.approx(math.log(10))


def test_rare_code_levels_are_pooled():
    frame = pd.DataFrame({"tumor_location": [1.0, 1, 1, 2, 2, 2, 6]})
    pre = model.preprocessor(["tumor_location"], min_frequency=3).fit(frame)
    names = list(pre.get_feature_names_out())
    assert names == ["nominal__tumor_location_1.0", "nominal__tumor_location_2.0",
                     "nominal__tumor_location_infrequent_sklearn"]
    # an unseen code in serving lands in the pooled level, never crashes
    assert pre.transform(pd.DataFrame({"tumor_location": [5.0]})).tolist() == [[0, 0, 1]]


def test_prevalence_threshold_decides_classes():
    X = pd.DataFrame({"age_at_initial_pathologic": [20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75]})
    y = pd.Series([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])  # prevalence 0.25
    pipe = model.make_pipeline("logreg", ["age_at_initial_pathologic"], inner_folds=3).fit(X, y)
    assert pipe[-1].threshold_ == 0.25
    prob = pipe.predict_proba(X)[:, 1]
    np.testing.assert_array_equal(pipe.predict(X), (prob >= 0.25).astype(int))
    assert model.chosen_c(pipe) in model.C_GRID


def synthetic_xy(n=30, seed=0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"gender": rng.integers(1, 3, n).astype(float),
                      "tumor_volume_px": np.exp(rng.normal(5, 1, n))},
                     index=[f"P{i:02d}" for i in range(n)])
    X.iloc[::4, 0] = np.nan
    y = pd.Series((np.log(X["tumor_volume_px"]) + rng.normal(0, 0.5, n) > 5).astype(int), index=X.index)
    return X, y


def test_imputer_and_encoder_are_fitted_on_training_rows_only():
    X, y = synthetic_xy()
    factory = lambda: model.make_pipeline("logreg", list(X.columns), inner_folds=3)  # noqa: E731
    res = outcome_cv.cross_validate(factory, X, y, folds=3, repeats=2, seed=0, return_estimators=True)
    assert len(res["estimators"]) == 6
    for est, test in zip(res["estimators"], res["test_indices"]):
        train = np.setdiff1d(np.arange(len(X)), test)
        imputer = est[0].named_transformers_["counts"].named_steps["impute"]
        assert imputer.statistics_[0] == pytest.approx(np.median(np.log1p(X["tumor_volume_px"].iloc[train])))
        assert model.chosen_c(est) in model.C_GRID  # each outer fold chose its own C (nested)
    assert min(model.C_GRID) <= res["c_median"] <= max(model.C_GRID)


def test_cross_validate_reduces_folds_and_reports_baseline_and_spread():
    X, _ = synthetic_xy(12)
    y = pd.Series([1, 1, 1] + [0] * 9, index=X.index)
    res = outcome_cv.cross_validate(lambda: model.make_pipeline("logreg", list(X.columns), inner_folds=2),
                                    X, y, folds=5, repeats=2, seed=1)
    assert res["folds"] == 3 and res["notes"] == ["folds reduced from 5 to 3: minority class has 3 patients"]
    assert len(res["fold_scores"]) == 6
    # prior predictor: training prevalence 2/8 against test folds with one positive in four
    assert res["baseline_brier"] == pytest.approx((0.75 ** 2 + 3 * 0.25 ** 2) / 4)
    for score in outcome_cv.SCORES:
        assert res[f"{score}_low"] <= res[f"{score}_mean"] <= res[f"{score}_high"]
    assert res["oof_probability"].index.equals(y.index) and res["oof_probability"].between(0, 1).all()


def test_cross_validate_refuses_one_class():
    X, _ = synthetic_xy(8)
    with pytest.raises(ValueError, match="at least 2 patients of each"):
        outcome_cv.cross_validate(lambda: model.make_pipeline("logreg", list(X.columns)), X,
                                  pd.Series([0] * 7 + [1], index=X.index, name="death01"))


@pytest.mark.parametrize("minority, folds, expected", [(21, 5, 5), (3, 3, 2), (6, 3, 4), (2, 2, 2)])
def test_inner_folds_fit_the_outer_training_folds(minority, folds, expected):
    y = pd.Series([1] * minority + [0] * 40)
    assert outcome_cv.inner_folds_for(y, folds, 5) == expected


def test_permutation_importance_ranks_the_signal_first():
    X, y = synthetic_xy(40)
    table = outcome_cv.permutation_importances(
        lambda: model.make_pipeline("logreg", list(X.columns), inner_folds=3), X, y, folds=3, n_repeats=3)
    assert table["feature"].tolist()[0] == "tumor_volume_px"
    assert table["auc_drop_mean"].iloc[0] > 0.1


def test_compare_scores_clinical_once_and_each_source():
    X, y = synthetic_xy(24)
    X["age_at_initial_pathologic"] = np.linspace(20, 80, len(X))
    other = X.assign(tumor_volume_px=X["tumor_volume_px"] * 2)
    results = outcome_cv.compare({"oof_predicted": X, "truth": other}, y, classifiers=["logreg"],
                                 folds=3, repeats=1, inner_folds=2)
    assert [r.key for r in results] == ["logreg/clinical", "logreg/imaging@oof_predicted", "logreg/imaging@truth",
                                        "logreg/both@oof_predicted", "logreg/both@truth"]
    # a monotone change of one feature does not change a logreg on log1p-scaled features much
    assert outcome_cv.find_result(results, "logreg", "clinical", "truth").features_from == "none"


def test_common_patients_aligns_sources():
    X, y = synthetic_xy(6)
    tables, y2 = outcome_cv.common_patients({"a": X, "b": X.iloc[1:]}, y)
    assert list(y2.index) == list(X.index[1:]) and all(list(t.index) == list(y2.index) for t in tables.values())


# ---- synthetic dataset end to end ---------------------------------------------------------

@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("k3m"), patients=40, slices=8, size=32, seed=0)


@pytest.fixture(scope="module")
def synth_xy(synth_root):
    m = manifest.scan(synth_root).manifest
    masks = [imageio.read_mask(Path(p)) for p in m["mask_path"]]
    _, patients = features_for_manifest(m, masks)
    return model.join_features(clinical.read_clinical(synth_root / "data.csv"), patients)


def test_imaging_features_carry_signal_on_synthetic_data(synth_xy):
    # synthetic death01 depends on lesion volume and age; the other codes are noise
    X, y, report = synth_xy
    assert report["matched"] == 40
    columns, _ = model.feature_columns(X, "imaging")
    res = outcome_cv.cross_validate(lambda: model.make_pipeline("logreg", columns, inner_folds=3), X, y,
                                    folds=5, repeats=2, seed=0)
    assert res["roc_auc_mean"] > 0.65


def test_features_and_survival_commands_on_a_synthetic_project(tmp_path, monkeypatch):
    project = make_project(tmp_path / "p", patients=24, slices=6, size=32)
    monkeypatch.chdir(project)
    with Tracking(project / "mlflow.db"):
        mlflow.set_experiment("brainseg-survival")
        done = invoke("features", "--truth", "--out", "reports/features")
        assert done.exit_code == 0, done.output
        source = json.loads((project / "reports/features/source.json").read_text())
        assert source["features_from"] == "truth" and source["synthetic"] is True
        assert invoke("features", "--out", "x").exit_code == 2  # neither --truth, --model nor --oof
        done = invoke("survival", "--features", "reports/features/patients.csv", "--out", "reports/survival",
                      "--set", "survival.classifiers=[logreg]", "--set", "survival.folds=3",
                      "--set", "survival.repeats=1")
        assert done.exit_code == 0, done.output
        summary = json.loads((project / "reports/survival/cv.json").read_text())
        assert summary["final"]["key"] == "logreg/both@truth" and summary["fitted_on"] == "synthetic"
        assert any("features_from=oof_predicted" in n for n in summary["notes"])  # the declared skew
        assert {"roc_auc_mean", "roc_auc_low", "roc_auc_high", "brier_mean", "baseline_brier",
                "balanced_accuracy_mean"} <= set(summary["final"])
        importances = pd.read_csv(project / "reports/survival/importances.csv")
        assert {"feature", "auc_drop_mean"} <= set(importances.columns) and len(importances) >= 10
        client = mlflow.MlflowClient()
        note = client.get_run(summary["final_run_id"]).data.tags["mlflow.note.content"]
        assert (note.startswith("Final death01 survival model")
                and f"`{summary['data_version'][:12]}` (synthetic)" in note)
        candidate = client.get_run(summary["parent_run_id"]).data.tags["final_run_id"]  # the final's CV run
        oof = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=candidate, artifact_path="oof_probability.csv"),
                          index_col=0)
        wrong = oof[(oof["probability"] >= summary["failures"]["threshold"]).astype(int) != oof["death01"]]
        misses = summary["failures"]["misses"]
        assert [m["patient"] for m in misses] == list(
            (wrong["probability"] - wrong["death01"]).abs().sort_values(ascending=False, kind="stable").index[:3])
        assert summary["failures"]["threshold"] == pytest.approx(summary["positives"] / summary["patients"])
        folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=candidate, artifact_path="fold_scores.csv"))
        assert summary["failures"]["worst_folds"][0]["roc_auc"] == pytest.approx(folds["roc_auc"].min())
        loaded = mlflow.pyfunc.load_model(summary["final_model_uri"])
        # numbers are typed Any, so that the model's own check sees a JSON boolean and refuses it (issue 37)
        inputs = {c.name: getattr(c.type, "name", "any") for c in loaded.metadata.get_input_schema().inputs}
        assert inputs["gender"] == "string" and inputs["age_at_initial_pathologic"] == "any"
        missing = invoke("survival", "--features", "nowhere/patients.csv")
        assert missing.exit_code == 2 and "brainseg features --oof" in missing.output
