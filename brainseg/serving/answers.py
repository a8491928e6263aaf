"""What the server of :mod:`brainseg.serving.scoring_app` checks in a request body before MLflow's
scoring app parses it, and what an error answer may hold (pure functions: no MLflow, no ASGI).

MLflow 3.17's scoring app (``mlflow.pyfunc.scoring_server``) answers some requests in ways a
served model cannot change, because they happen before or around the model:

- a body that is not UTF-8, or not JSON, gets a 400 whose message repeats the whole body
  (``Input: b'...'``, up to 7x its size once escaped);
- JSON nested about 1,000 levels deep, or an integer of more than 4,300 digits, makes Python's
  ``json`` raise an error MLflow does not catch: a 500;
- a model's refusal is prefixed with ``Failed to predict data '<the request table>'``; an error the
  model did not foresee comes back with its traceback in ``stack_trace``.

:func:`check_body` refuses the first two kinds before MLflow sees the body, naming the problem and
never quoting the body; :func:`error_document` rewrites any error answer of the app into
``{"error_code": ..., "message": ...}`` with at most :data:`MAX_REASON_CHARS` characters of
message, without MLflow's dump of the request, a stack trace or a file path.
"""

from __future__ import annotations

import http
import json
import re
import sys

MAX_REASON_CHARS = 1024  # an error answer's message, at most (its body: this plus ~60 bytes)
MAX_JSON_DEPTH = 64  # nesting of a request's JSON; MLflow's request formats need 5 at most
JSON_TYPES = ("application/json",)  # parsed as JSON by MLflow (the media type, exactly as MLflow compares it)
TEXT_TYPES = ("application/json", "text/csv")  # decoded as UTF-8 text by MLflow
GENERIC_500 = "internal error while answering the request (logged by the server)"
DUMP = "Failed to predict data '"  # MLflow's prefix before the model's message: the request table
DUMP_END = "'. \nError: "
ECHO = "\nInput: "  # MLflow's JSON error: what follows is the whole body
LEAK_MARKERS = ("Traceback (most recent call last)", "site-packages", 'File "/')
PATH_RE = re.compile(r"(?<![\w.:/<])/(?:[^\s'\"/,;()\[\]]+/)+[^\s'\",;()\[\]]*")
CODE_RE = re.compile(r"[A-Z][A-Z_]{0,63}")
PARAMS_FOUND = "Invalid parameters found: {"  # MLflow's refusal of params of the wrong type
PARAM_RE = re.compile(r"""\('(?P<name>[^']*)', ["'](?:Failed to validate type and shape for '[^']*': )?"""
                      r"(?P<type>\w+)(?: \(default: [^)]*\))?, error: (?P<error>.*?)[\"']\)(?:, |\})")


class BodyRefused(ValueError):
    """A request body refused before MLflow reads it: ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def media_type(content_type: str) -> str:
    """The media type of a Content-Type header as MLflow's scoring app reads it (before any ';')."""
    return content_type.split(";", 1)[0].strip()


def check_body(body: bytes, content_type: str) -> None:
    """Refuse (:class:`BodyRefused`, 400) a JSON or CSV body that is not UTF-8, a JSON body that
    does not parse, holds an integer over Python's digit limit, or nests deeper than
    :data:`MAX_JSON_DEPTH`. Other media types are left to MLflow (it answers them with a 415).

    >>> check_body(b'{"dataframe_split": {"columns": ["image"], "data": [["AA=="]]}}', "application/json")
    >>> try:
    ...     check_body(b"\\xff\\xfe{}", "application/json")
    ... except BodyRefused as exc:
    ...     print(exc.status, exc)
    400 the request body is not UTF-8 text (byte 0xff at offset 0); send JSON encoded as UTF-8
    """
    kind = media_type(content_type)
    if kind not in TEXT_TYPES:
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyRefused(400, f"the request body is not UTF-8 text (byte 0x{body[exc.start]:02x} at offset "
                               f"{exc.start:,}); send {'JSON' if kind in JSON_TYPES else 'CSV'} encoded as "
                               "UTF-8") from None
    if kind not in JSON_TYPES:
        return
    too_deep = (f"the request's JSON is nested more than {MAX_JSON_DEPTH} levels deep; a request needs 5 at "
                "most (dataframe_split, dataframe_records, instances or inputs)")
    try:
        doc = json.loads(text)
    except RecursionError:
        raise BodyRefused(400, too_deep) from None
    except json.JSONDecodeError as exc:
        raise BodyRefused(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                               f"{exc.colno} (character {exc.pos:,})") from None
    except ValueError:  # int() of more digits than sys.get_int_max_str_digits()
        raise BodyRefused(400, f"the request body holds a number of more than {sys.get_int_max_str_digits():,} "
                               "digits; send numbers as JSON numbers of ordinary size") from None
    if json_depth(doc) > MAX_JSON_DEPTH:
        raise BodyRefused(400, too_deep)


def json_depth(doc) -> int:
    """How deeply lists and objects nest in a parsed JSON document (a scalar: 0), without recursion.

    >>> json_depth({"a": [[1], 2]}), json_depth(3)
    (3, 0)
    """
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:  # deeper than the limit: refused anyway, no need to go on
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)
                             if isinstance(child, (list, dict)))
    return deepest


def clean_message(message: str) -> str:
    """An error message as the server may send it: without MLflow's dump of the request table
    (the model's reason kept), without an echoed body, without a traceback or a file path, at most
    :data:`MAX_REASON_CHARS` characters.

    >>> clean_message("row 0: bad\\nFailed to predict data '  image\\n0  @@@'. \\nError: row 0: bad")
    'row 0: bad'
    >>> clean_message("cannot read /root/x/site/model.h5")
    'cannot read <path>'
    >>> clean_message("Invalid parameters found: {('threshold', \\"Failed to validate type and shape for "
    ...               "'threshold': double (default: 0.5), error: Can not safely convert `str` to `double`\\")}")
    "param 'threshold': expected double; Can not safely convert `str` to `double`"
    """
    if DUMP in message:
        before, _, rest = message.partition(DUMP)
        _, found, after = rest.rpartition(DUMP_END)
        before, after = before.strip(), after.strip() if found else ""
        message = before if before and (not after or after in before) else "\n".join(p for p in (before, after) if p)
    message = message.split(ECHO, 1)[0]
    if message.startswith(PARAMS_FOUND):  # MLflow's params check: the reason per param, first
        found = [f"param {m['name']!r}: expected {m['type']}; {m['error']}" for m in PARAM_RE.finditer(message)]
        message = "; ".join(found) or message
    if any(marker in message for marker in LEAK_MARKERS):
        return GENERIC_500
    message = PATH_RE.sub("<path>", message).strip()
    if len(message) > MAX_REASON_CHARS:
        cut = " ... (cut)"
        message = message[:MAX_REASON_CHARS - len(cut)] + cut
    return message


def error_document(status: int, body: bytes) -> tuple[dict, str]:
    """An error answer of MLflow's app (``status`` >= 400, its ``body``) -> (the JSON document to
    send instead, what was dropped from it for the server's log: a stack trace, or "")."""
    try:
        doc = json.loads(body)
    except ValueError:  # MLflow's text/plain 415s, the framework's "Internal Server Error"
        doc = body.decode("utf-8", "replace")
    if isinstance(doc, dict):
        text = doc.get("message") if isinstance(doc.get("message"), str) else doc.get("detail")
        code, dropped = doc.get("error_code"), str(doc.get("stack_trace") or "")
    else:
        text, code, dropped = doc, None, ""
    if not isinstance(text, str) or not text.strip():
        text = GENERIC_500 if status >= 500 else http.HTTPStatus(status).phrase
    elif status == 500 and not isinstance(doc, dict):
        text = GENERIC_500
    if not (isinstance(code, str) and CODE_RE.fullmatch(code)):
        code = "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST"
    return {"error_code": code, "message": clean_message(text)}, dropped
