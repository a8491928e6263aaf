"""The served outcome model: its answer carries the evidence, its signature has explicit types, and
hostile input gets a 400 naming the column or an explicit ``insufficient_data`` row, as strict
JSON, never a stack trace. Most requests go through MLflow's own scoring code (the function
``mlflow models serve`` runs for /invocations) in process; a few go to a real ``mlflow models
serve`` of the same model, to show its HTTP handler answers the same way."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server

from brainseg.bench.server import serve_model
from brainseg.data.clinical import CLINICAL_COLUMNS
from brainseg.outcome import client, model, pyfunc
from brainseg.outcome.validate import InputSpec, InvalidInput, build_spec, check_frame
from conftest import Tracking
from helpers import strict_json

CLIN = list(CLINICAL_COLUMNS)
IMG = ["tumor_volume_px", "tumor_slices", "centroid_x"]
LEAKS = ("Traceback", "stack_trace", "site-packages", 'File "/')  # never in an answer (issue 37)
EVIDENCE = {"cv_roc_auc": 0.6125, "cv_n_patients": 30, "data_version": "abc123", "fitted_on": "synthetic",
            "features_from": "oof_predicted"}


def training_frame(n=30, seed=0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({c: rng.integers(1, 3, n).astype(float) for c in CLIN}, index=[f"P{i:02d}" for i in range(n)])
    X["age_at_initial_pathologic"] = rng.uniform(20, 80, n).round()
    X["tumor_volume_px"] = np.exp(rng.normal(6, 1, n)).round()
    X["tumor_slices"] = rng.integers(1, 20, n).astype(float)
    X["centroid_x"] = rng.uniform(60, 190, n)
    y = pd.Series((X["tumor_volume_px"] > np.median(X["tumor_volume_px"])).astype(int), index=X.index)
    return X, y


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A small logreg fitted on clinical + imaging columns, logged as the pyfunc and loaded back:
    (loaded, X, pipe, model URI, tracking URI, the artifacts folder)."""
    folder = tmp_path_factory.mktemp("survival-serving")
    X, y = training_frame()
    columns = CLIN + IMG
    pipe = model.make_pipeline("logreg", columns, inner_folds=3).fit(X[columns], y)
    spec = build_spec(X, columns, 0.5)
    spec.max_rows = 50
    with Tracking(folder / "mlflow.db") as tracking:
        exp = mlflow.MlflowClient().create_experiment("serve", artifact_location=str(folder / "artifacts"))
        mlflow.set_experiment(experiment_id=exp)
        _, uri = pyfunc.log_final_model(pipe, X, spec, EVIDENCE)
        loaded = mlflow.pyfunc.load_model(uri)
        yield loaded, X, pipe, uri, tracking.uri, folder / "artifacts"


@pytest.fixture(scope="module")
def served(logged):
    return logged[:3]


def good_record(X: pd.DataFrame, i: int = 0) -> dict:
    row = X.iloc[i]
    return {c: (str(int(row[c])) if c in model.CODE_COLUMNS else float(row[c])) for c in CLIN + IMG}


def request(loaded, body) -> tuple[int, dict]:
    """POST /invocations as `mlflow models serve` answers it: (status, parsed strict JSON)."""
    data = body if isinstance(body, str) else json.dumps(body)
    try:
        r = scoring_server.invocations(data, "application/json", loaded, loaded.metadata.get_input_schema())
        status, text = r.status, r.response
    except MlflowException as exc:  # what the server's exception wrapper sends back
        status, text = exc.get_http_status_code(), exc.serialize_as_json()
    assert not [leak for leak in LEAKS if leak in text], text[-500:]
    return status, strict_json(text)


def test_answer_carries_probability_status_and_evidence(served):
    loaded, X, pipe = served
    status, answer = request(loaded, {"dataframe_records": [good_record(X, 0), good_record(X, 1)]})
    assert status == 200
    rows = answer["predictions"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    expected = pipe.predict_proba(X[CLIN + IMG].iloc[:2])[:, 1]
    np.testing.assert_allclose([r["death01_probability"] for r in rows], expected)
    assert [r["death01_class"] for r in rows] == [int(p >= pipe[-1].threshold_) for p in expected]
    for r in rows:
        assert {k: r[k] for k in EVIDENCE} == EVIDENCE


def test_signature_has_explicit_types_and_no_required_columns(served):
    loaded, _, _ = served
    inputs = loaded.metadata.get_input_schema().inputs
    assert [c.name for c in inputs] == CLIN + IMG
    assert {c.name: c.type.name for c in inputs if c.name in model.CODE_COLUMNS} == {
        c: "string" for c in model.CODE_COLUMNS}
    # numbers are typed Any: MLflow hands the model what was sent (a JSON true is not cast to 1.0)
    assert {repr(c.type) for c in inputs if c.name not in model.CODE_COLUMNS} == {"Any"}
    assert not any(c.required for c in inputs)
    outputs = [c.name for c in loaded.metadata.get_output_schema().inputs]
    assert outputs == list(pyfunc.OUTPUT_COLUMNS)


def test_the_stored_example_is_not_a_patient(served):
    loaded, X, _ = served
    example = loaded.input_example
    assert example is not None and len(example) == 2
    assert example["gender"].iloc[0] == str(int(X["gender"].mode().iloc[0]))
    assert float(example["age_at_initial_pathologic"].iloc[0]) == X["age_at_initial_pathologic"].median()


def with_(X, **changes) -> dict:
    return {**good_record(X), **changes}


# (name, record changes or a whole body, status, expected text in the message or row)
HOSTILE = [
    ("age far below zero", {"age_at_initial_pathologic": -500}, 400,
     "column 'age_at_initial_pathologic', row 0: -500.0 is outside the plausible range 0-120"),
    ("age above 120", {"age_at_initial_pathologic": 121}, 400, "outside the plausible range 0-120"),
    ("age as a word", {"age_at_initial_pathologic": "old"}, 400, "age_at_initial_pathologic"),
    ("unseen code", {"gender": "7"}, 400,
     "column 'gender', row 0: code 7 was not seen in training (known codes: 1, 2)"),
    ("code as a word", {"gender": "male"}, 400, "column 'gender', row 0: 'male' is not an integer code"),
    ("fractional code", {"gender": 1.5}, 400, "column 'gender', row 0: 1.5 is not an integer code"),
    ("boolean code", {"race": True}, 400, "column 'race', row 0: True is not an integer code"),
    ("negative volume", {"tumor_volume_px": -3}, 400, "column 'tumor_volume_px', row 0: -3.0 is outside"),
    ("infinite volume", {"tumor_volume_px": float("inf")}, 400, "column 'tumor_volume_px', row 0: inf is outside"),
    ("all null", {c: None for c in CLIN + IMG}, 200, "0 of 16 clinical fields known, need 8"),
    ("clinical missing", {c: None for c in CLIN}, 200, "0 of 16 clinical fields known, need 8"),
    ("imaging missing", {c: None for c in IMG}, 200, "imaging features unknown (tumor_volume_px missing)"),
    ("only unknown columns", "UNKNOWN_ONLY", 400, "no row with a known column (the model reads RNASeqCluster"),
    ("no rows", "NO_ROWS", 400, "no row with a known column"),
    ("too many rows", "MANY_ROWS", 400, "51 rows in one request; the limit is 50"),
    # issue 37: accepted nonsense and a traceback in the answer
    ("age as a boolean", {"age_at_initial_pathologic": True}, 400,
     "column 'age_at_initial_pathologic', row 0: 'True' is a boolean; expected a number or null"),
    ("age as a string of digits", {"age_at_initial_pathologic": "42"}, 400,
     "column 'age_at_initial_pathologic', row 0: '42' is not a number; expected a number or null"),
    ("age of 400 digits", {"age_at_initial_pathologic": 10**400}, 400,
     "column 'age_at_initial_pathologic', row 0: inf is outside the plausible range 0-120"),
    ("code of 5,000 digits", {"gender": "1" * 5000}, 400,
     f"column 'gender', row 0: '{'1' * 40}...' is not an integer code"),
    ("code of unicode digits", {"gender": "\u0661"}, 400, "column 'gender', row 0: '\u0661' is not an integer code"),
]


@pytest.mark.parametrize("name, change, status, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input(served, name, change, status, message):
    loaded, X, _ = served
    if change == "UNKNOWN_ONLY":
        body = {"dataframe_records": [{"shoe_size": 44}]}
    elif change == "NO_ROWS":
        body = {"dataframe_split": {"columns": ["gender"], "data": []}}
    elif change == "MANY_ROWS":
        body = {"dataframe_records": [good_record(X)] * 51}
    else:
        body = json.dumps({"dataframe_records": [with_(X, **change)]})  # json.dumps writes inf as Infinity
    got, answer = request(loaded, body)
    assert got == status, answer
    if status == 400:
        assert answer["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
        assert message in answer["message"]
    else:
        row = answer["predictions"][0]
        assert row["status"] == "insufficient_data" and message in row["message"]
        assert row["death01_probability"] is None and row["death01_class"] is None
        assert row["cv_roc_auc"] == EVIDENCE["cv_roc_auc"]  # the evidence travels even then
    ok_status, ok = request(loaded, {"dataframe_records": [good_record(X)]})  # the server still answers
    assert ok_status == 200 and ok["predictions"][0]["status"] == "ok"


# ------------------------------------------------------------ a real `mlflow models serve` of the model
@pytest.fixture(scope="module")
def rest(logged, tmp_path_factory):
    """``mlflow models serve`` of the logged model (one worker); yields its URL."""
    _, _, _, uri, tracking_uri, artifacts = logged
    with serve_model(uri, tracking_uri, tmp_path_factory.mktemp("survival-serve"), timeout_s=300) as server:
        server.artifacts = artifacts
        yield server


def post_rest(url: str, body) -> tuple[int, str]:
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=60)
    return r.status_code, r.text


# (name, record changes, status, words of the message (400) or of the row's message (200))
REST_HOSTILE = [
    ("age far below zero", {"age_at_initial_pathologic": -500}, 400,
     ["column 'age_at_initial_pathologic', row 0", "plausible range 0-120"]),
    ("unseen code", {"gender": "7"}, 400, ["column 'gender', row 0", "not seen in training"]),
    ("Infinity token", {"tumor_volume_px": float("inf")}, 400, ["column 'tumor_volume_px', row 0", "inf"]),
    ("code as a word", {"race": "white"}, 400, ["column 'race', row 0", "not an integer code"]),
    ("age as a word", {"age_at_initial_pathologic": "old"}, 400,
     ["column 'age_at_initial_pathologic', row 0: 'old' is not a number"]),
    ("all null", {c: None for c in CLIN + IMG}, 200, ["0 of 16 clinical fields known"]),
    # issue 37: a boolean read as 1 year; an over-long code answered with a traceback in `stack_trace`
    ("age as a boolean", {"age_at_initial_pathologic": True}, 400,
     ["column 'age_at_initial_pathologic', row 0: 'True' is a boolean; expected a number or null"]),
    ("code of 5,000 digits", {"gender": "1" * 5000}, 400, ["column 'gender', row 0: '1111", "not an integer code"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, change, status, words", REST_HOSTILE, ids=[h[0] for h in REST_HOSTILE])
def test_the_real_server_refuses_by_column_in_strict_json(rest, served, name, change, status, words):
    _, X, _ = served
    got, text = post_rest(rest.url, json.dumps({"dataframe_records": [with_(X, **change)]}))  # inf as Infinity
    assert got == status, text[:500]
    for leak in (*LEAKS, str(rest.artifacts), str(rest.artifacts.resolve())):
        assert leak not in text, f"{name}: the answer leaks {leak!r}: {text[-500:]!r}"
    answer = strict_json(text)
    if status == 400:
        assert answer["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
        for word in words:
            assert word in answer["message"], f"{name}: {word!r} not in {answer['message']!r}"
    else:
        row = answer["predictions"][0]
        assert row["status"] == "insufficient_data" and row["death01_probability"] is None
        assert all(word in row["message"] for word in words), row["message"]
    ok_status, ok_text = post_rest(rest.url, {"dataframe_records": [good_record(X)]})  # still answers
    assert ok_status == 200 and strict_json(ok_text)["predictions"][0]["status"] == "ok", ok_text[:500]


def test_an_error_the_model_did_not_foresee_is_logged_and_answered_with_a_generic_500(served, monkeypatch, caplog):
    """Once MLflow answered it with a 400 holding the traceback (machine paths) in ``stack_trace``."""
    loaded, X, _ = served
    pipeline = loaded.unwrap_python_model().pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("boom in /secret/place/model.py")

    monkeypatch.setattr(pipeline, "predict_proba", broken)
    with caplog.at_level("ERROR", logger="brainseg.serving.pyfunc"):
        status, answer = request(loaded, {"dataframe_records": [good_record(X)]})
    assert status == 500 and answer["error_code"] == "INTERNAL_ERROR"
    assert answer["message"].startswith("the model failed on this request (an internal error, logged by the server)")
    assert "boom" not in json.dumps(answer) and "/secret" not in json.dumps(answer)
    logged = [r for r in caplog.records if r.name == "brainseg.serving.pyfunc"]
    assert logged and "boom in /secret/place/model.py" in logged[0].exc_text  # the traceback, server-side


# ------------------------------------------------------------------------------ unknown columns
@pytest.mark.parametrize("extra", [["gendr"], ["shoe_size", "tumour_volume"], ["x" * 10_000]])
def test_check_frame_refuses_unknown_columns_by_name(served, extra):
    loaded, X, _ = served
    frame = pd.DataFrame([{**good_record(X), **{c: 1 for c in extra}}])
    spec = loaded.unwrap_python_model().spec
    with pytest.raises(InvalidInput) as err:
        check_frame(frame, spec)
    message = str(err.value)
    shown = [repr(c if len(c) <= 40 else c[:40] + "...") for c in extra]  # a name is cut, never repeated whole
    assert all(name in message for name in shown) and "unknown column" in message and len(message) < 1000
    assert "gender" in message  # the columns the model reads are listed
    checked, reasons = check_frame(frame.drop(columns=extra), spec)
    assert reasons == [None] and list(checked.columns) == spec.columns


def test_the_model_given_an_unknown_column_directly_answers_400_naming_it(served):
    loaded, X, _ = served
    frame = pd.DataFrame([{**good_record(X), "gendr": "1"}])
    with pytest.raises(MlflowException) as err:
        loaded.unwrap_python_model().predict(None, frame)
    assert err.value.get_http_status_code() == 400 and "'gendr'" in err.value.message
    assert loaded.unwrap_python_model().predict(None, frame.drop(columns="gendr"))["status"].tolist() == ["ok"]


@pytest.mark.parametrize("change", [{"race": None}, {"gender": " 2 "}, {"gender": 2}, {"centroid_x": None}])
def test_tolerated_variants_answer_ok(served, change):
    loaded, X, _ = served
    status, answer = request(loaded, {"dataframe_records": [with_(X, **change)]})
    assert status == 200 and answer["predictions"][0]["status"] == "ok"


def test_a_missing_optional_column_is_unknown_not_an_error(served):
    loaded, X, _ = served
    record = good_record(X)
    del record["ethnicity"], record["centroid_x"]
    status, answer = request(loaded, {"dataframe_split": {"columns": list(record), "data": [list(record.values())]}})
    assert status == 200 and answer["predictions"][0]["status"] == "ok"


def test_mixed_batch_answers_each_row(served):
    loaded, X, _ = served
    status, answer = request(loaded, {"dataframe_records": [good_record(X), {c: None for c in CLIN + IMG}]})
    assert status == 200
    assert [r["status"] for r in answer["predictions"]] == ["ok", "insufficient_data"]
    assert answer["predictions"][0]["death01_probability"] is not None


def test_client_builds_typed_inputs_and_predict_rows_carry_evidence(served, tmp_path):
    loaded, X, _ = served
    patients = pd.DataFrame({"patient": ["P00", "P01", "Q99"], "tumor_volume_px": [100.0, 0.0, 50.0],
                             "tumor_slices": [3, 0, 2], "centroid_x": [120.0, np.nan, 80.0]})
    csv = tmp_path / "data.csv"
    X[CLIN].iloc[:2].assign(death01=0).rename_axis("Patient").reset_index().to_csv(csv, index=False)
    inputs = client.model_inputs(loaded, patients, csv)
    assert inputs.loc["P00", "gender"] == str(int(X.loc["P00", "gender"]))
    assert inputs.loc["Q99", "gender"] is None and np.isnan(inputs.loc["P01", "centroid_x"])
    out = pd.DataFrame(loaded.predict(inputs))
    assert out["status"].tolist() == ["ok", "ok", "insufficient_data"]  # Q99 has no data.csv row
    assert (out["fitted_on"] == "synthetic").all() and (out["cv_n_patients"] == 30).all()


def test_model_refuses_evidence_without_fitted_on():
    X, y = training_frame()
    pipe = model.make_pipeline("logreg", ["tumor_volume_px"], inner_folds=3).fit(X, y)
    spec = InputSpec(["tumor_volume_px"], {}, 0)
    with pytest.raises(ValueError, match="fitted_on must be one of"):
        pyfunc.SurvivalModel(pipe, spec, {**EVIDENCE, "fitted_on": "TCGA-LGG"})
    with pytest.raises(ValueError, match="evidence lacks cv_roc_auc"):
        pyfunc.SurvivalModel(pipe, spec, {k: v for k, v in EVIDENCE.items() if k != "cv_roc_auc"})


# ------------------------------------------------------------- non-finite numbers, nulls in every format
AGE = "age_at_initial_pathologic"


@pytest.mark.parametrize("value", [float("nan"), np.nan, None])
def test_a_nan_age_is_unknown_like_null_and_the_answer_names_it(served, value):
    """Over REST a JSON null of a number column reaches the model as NaN: NaN is unknown (imputed),
    as null is, never a silent ``ok`` that says nothing; the row's message names the field."""
    loaded, X, pipe = served
    model_ = loaded.unwrap_python_model()
    answer = model_.predict(None, pd.DataFrame([with_(X, **{AGE: value})]))
    row = answer.iloc[0]
    assert row["status"] == "ok" and row["message"] == f"unknown, imputed: {AGE}"
    expected = pipe.predict_proba(X[CLIN + IMG].iloc[:1].assign(**{AGE: np.nan}))[:, 1][0]
    assert row["death01_probability"] == pytest.approx(expected)  # the imputed answer, as for null
    known = model_.predict(None, pd.DataFrame([good_record(X)])).iloc[0]
    assert known["message"] == "" and known["death01_probability"] != row["death01_probability"]


@pytest.mark.parametrize("value, shown", [(float("inf"), "inf"), (float("-inf"), "-inf")])
def test_an_infinite_age_is_refused_naming_the_field_reason_first(served, value, shown):
    loaded, X, _ = served
    status, answer = request(loaded, json.dumps({"dataframe_records": [with_(X, **{AGE: value})]}))
    assert status == 400
    assert answer["message"].startswith(f"column '{AGE}', row 0: {shown} is outside the plausible range 0-120")


NULL_CODE_BODIES = {  # the same record, gender null, in each request format of MLflow's scoring server
    "dataframe_records": lambda r: {"dataframe_records": [r]},
    "dataframe_split": lambda r: {"dataframe_split": {"columns": list(r), "data": [list(r.values())]}},
    "instances": lambda r: {"instances": [r]},
    "inputs": lambda r: {"inputs": [r]},
}


@pytest.mark.parametrize("fmt", list(NULL_CODE_BODIES))
def test_a_null_code_is_unknown_in_every_request_format(served, fmt):
    """In ``instances`` and ``inputs`` MLflow hands a null of a string column to the model as the
    text "None": it is unknown there as in the dataframe formats, not an unseen code."""
    loaded, X, pipe = served
    status, answer = request(loaded, NULL_CODE_BODIES[fmt](with_(X, gender=None)))
    assert status == 200, answer
    row = answer["predictions"][0]
    assert row["status"] == "ok" and row["message"] == "unknown, imputed: gender"
    expected = pipe.predict_proba(X[CLIN + IMG].iloc[:1].assign(gender=np.nan))[:, 1][0]
    assert row["death01_probability"] == pytest.approx(expected)


@pytest.mark.parametrize("text", ["None", "nan", " NULL ", ""])
def test_the_texts_of_a_null_code_are_unknown_and_a_word_is_still_refused(served, text):
    loaded, X, _ = served
    model_ = loaded.unwrap_python_model()
    assert model_.predict(None, pd.DataFrame([with_(X, race=text)]))["message"].tolist() == ["unknown, imputed: race"]
    with pytest.raises(MlflowException) as err:
        model_.predict(None, pd.DataFrame([with_(X, race="Nonesuch")]))
    assert err.value.message.startswith("column 'race', row 0: 'Nonesuch' is not an integer code")


def test_a_400_from_the_model_begins_with_its_reason_over_mlflows_scoring_code(served):
    loaded, X, _ = served
    status, answer = request(loaded, {"dataframe_records": [with_(X, gender="7")]})
    assert status == 400
    message = answer["message"]
    assert message.startswith("column 'gender', row 0: code 7 was not seen in training"), message[:300]
    assert "Failed to predict data" in message.split("\n", 1)[1]  # MLflow's detail, after the reason
