"""The project's server's body checks and error answers, in process (issue 37): what
:mod:`brainseg.serving.answers` refuses and how :class:`brainseg.serving.scoring_app.CleanErrors`
rewrites an error answer of MLflow's app. The same requests against a real server are in
``test_hostile_server.py``."""

from __future__ import annotations

import asyncio
import json

import pytest

from brainseg.serving.answers import (
    GENERIC_500,
    MAX_JSON_DEPTH,
    MAX_REASON_CHARS,
    BodyRefused,
    check_body,
    clean_message,
    error_document,
)
from brainseg.serving.scoring_app import BodyChecks, CleanErrors

MLFLOW_400_WITH_TRACE = json.dumps({
    "error_code": "BAD_REQUEST", "sqlstate": "KAM00",
    "message": "Encountered an unexpected error while evaluating the model.",
    "stack_trace": 'Traceback (most recent call last):\n  File "/root/site-packages/mlflow/x.py", line 3\nValueError'})


@pytest.mark.parametrize("status, body, code, message", [
    (400, MLFLOW_400_WITH_TRACE, "BAD_REQUEST", "Encountered an unexpected error while evaluating the model."),
    (400, json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": "row 0: bad\nFailed to predict data "
                      "'  image\n0  AAAA'."}), "INVALID_PARAMETER_VALUE", "row 0: bad"),
    (400, json.dumps({"error_code": "BAD_REQUEST", "message": "Failed to predict data '  image\n0  AAAA'. \nError: "
                      "Incompatible input types for column age"}), "BAD_REQUEST",
     "Incompatible input types for column age"),
    (400, json.dumps({"error_code": "BAD_REQUEST", "message": "Invalid input. Ensure that input is a valid JSON "
                      "formatted string.\nInput: \nb'\\xff\\xfe'"}), "BAD_REQUEST",
     "Invalid input. Ensure that input is a valid JSON formatted string."),
    (500, "Internal Server Error", "INTERNAL_ERROR", GENERIC_500),
    (415, "This predictor only supports the following content types: Types: ['text/csv']. Got 'text/xml'.",
     "BAD_REQUEST", "This predictor only supports the following content types: Types: ['text/csv']. Got 'text/xml'."),
    (404, json.dumps({"detail": "Not Found"}), "BAD_REQUEST", "Not Found"),
    (400, json.dumps({"error_code": "BAD_REQUEST", "message": "cannot open /root/.cache/mlflow/artifacts/model.h5"}),
     "BAD_REQUEST", "cannot open <path>"),
    (400, json.dumps({"error_code": "BAD_REQUEST", "message": 'see File "/x/y.py", line 2'}), "BAD_REQUEST",
     GENERIC_500),
])
def test_an_error_answer_is_bounded_json_without_dump_trace_or_path(status, body, code, message):
    doc, dropped = error_document(status, body.encode())
    assert doc == {"error_code": code, "message": message}
    assert ("Traceback" in dropped) is ("stack_trace" in body)  # the trace goes to the server's log only


def test_a_long_message_is_cut_at_1_kib():
    doc, _ = error_document(400, json.dumps({"error_code": "BAD_REQUEST", "message": "x" * 100_000}).encode())
    assert len(doc["message"]) == MAX_REASON_CHARS and doc["message"].endswith(" ... (cut)")
    assert clean_message("short") == "short"


@pytest.mark.parametrize("body, content_type, words", [
    (b"\x1f\x8b\x08\x00", "application/json", "not UTF-8 text (byte 0x8b at offset 1); send JSON"),
    (b"a,b\n\xe9,1", "text/csv; charset=utf-8", "not UTF-8 text (byte 0xe9 at offset 4); send CSV"),
    (b"[" * 10_000, "application/json", f"nested more than {MAX_JSON_DEPTH} levels deep"),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "application/json", "nested more than"),
    (b'{"a": ' + b"7" * 5000 + b"}", "application/json", "a number of more than 4,300 digits"),
    (b'{"a": 1', "application/json", "not valid JSON: Expecting ',' delimiter at line 1 column 8 (character 7)"),
])
def test_a_body_mlflow_would_echo_or_500_is_refused_naming_the_problem(body, content_type, words):
    with pytest.raises(BodyRefused) as err:
        check_body(body, content_type)
    assert err.value.status == 400 and words in str(err.value) and len(str(err.value)) < 200


@pytest.mark.parametrize("body, content_type", [
    (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, "application/json"),
    (b'{"a": "\xc3\xa9"}', "application/json"),
    (b"\xff\xfe binary", "application/vnd.apache.parquet"),  # left to MLflow
])
def test_a_good_or_foreign_body_passes(body, content_type):
    check_body(body, content_type)


def run(app, body: bytes = b"{}", content_type: str = "application/json") -> tuple[list[dict], list[bytes]]:
    """One POST through ``app``: (the messages it sent, the bodies the inner app read)."""
    sent, inbox = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations",
             "headers": [(b"content-type", content_type.encode())]}
    asyncio.run(app(scope, receive, send))
    return sent


def inner(status: int, body: bytes, raise_after: bool = False, seen: list | None = None):
    async def app(scope, receive, send):
        message = await receive()
        if seen is not None:
            seen.append(message["body"])
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})
        if raise_after:  # as Starlette's ServerErrorMiddleware does after its 500
            raise RecursionError("maximum recursion depth exceeded")
    return app


def test_clean_errors_passes_a_good_answer_untouched_and_rewrites_an_error():
    sent = run(CleanErrors(inner(200, b'{"predictions": []}')))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"predictions": []}'
    sent = run(CleanErrors(inner(400, MLFLOW_400_WITH_TRACE.encode())))
    assert sent[0]["status"] == 400 and b"Traceback" not in sent[1]["body"]
    assert json.loads(sent[1]["body"]).keys() == {"error_code", "message"}


def test_an_exception_escaping_the_app_is_logged_and_answered_with_a_generic_500(caplog):
    async def app(scope, receive, send):
        raise RecursionError("deep in /secret/x.py")

    with caplog.at_level("ERROR", logger="brainseg.serving.scoring_app"):
        sent = run(CleanErrors(app))
    assert sent[0]["status"] == 500 and json.loads(sent[1]["body"]) == {"error_code": "INTERNAL_ERROR",
                                                                        "message": GENERIC_500}
    assert "deep in /secret/x.py" in caplog.records[0].exc_text
    sent = run(CleanErrors(inner(500, b"Internal Server Error", raise_after=True)))  # the framework's 500 first
    assert [m["status"] for m in sent if "status" in m] == [500]
    assert json.loads(sent[1]["body"])["message"] == GENERIC_500


def test_body_checks_hand_a_good_body_on_whole_and_answer_a_bad_one_themselves():
    seen = []
    sent = run(BodyChecks(inner(200, b"ok", seen=seen)), b'{"dataframe_split": {}}')
    assert seen == [b'{"dataframe_split": {}}'] and sent[0]["status"] == 200
    seen.clear()
    sent = run(BodyChecks(inner(200, b"ok", seen=seen)), b"\xff" * 100)
    assert seen == [] and sent[0]["status"] == 400 and b"\\xff" not in sent[1]["body"]
