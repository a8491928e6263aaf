"""MLflow's scoring server behind a limit on the request body, checks of the body and bounded error answers.

``mlflow models serve`` (MLflow 3.17: uvicorn running the FastAPI app of
``mlflow.pyfunc.scoring_server``) reads the whole body into memory and parses it before the model's
own checks run, and has no setting to bound it (uvicorn has none either); it cannot run this
wrapper (it starts ``mlflow.pyfunc.scoring_server.app:app`` itself). This module serves the same
app, built by MLflow's own ``scoring_server.init`` from the same model URI, wrapped in plain ASGI
middleware (docs/serving.md, "Which server answers what"); the header checks and the body limit
decide before the body is read (or as it arrives):

- :class:`ContentTypeRequired`: a POST without a ``Content-Type`` header gets a **415** naming the
  header (MLflow's app answers it with a 500 and a traceback in the server log);
- :class:`BodyLimit`: a body over ``BRAINSEG_SERVE_MAX_BODY_BYTES``
  (:class:`brainseg.serving.limits.RequestLimits`, default 64 MiB) gets a **413**: with a
  ``Content-Length`` over the limit at once, before any byte is read (a client that declares
  70 MiB and sends nothing gets its answer too); with a chunked body (no length), as soon as the
  bytes read pass the limit;
- the whole body must arrive within ``BRAINSEG_SERVE_BODY_TIMEOUT_S`` (default 30 s), else a **408**:
  a client that declares a body and stalls (a partial body) is answered and holds nothing, while
  the other clients' requests go on (uvicorn serves connections concurrently);
- :class:`ContentEncodingRefused`: a body sent with a ``Content-Encoding`` (gzip, deflate, br, ...)
  gets a **415** naming it: this server decodes no compressed body (MLflow's app would take the
  compressed bytes as the JSON and echo them back in its 400);
- :class:`BodyChecks`: a JSON or CSV body that is not UTF-8, JSON that does not parse, nests more
  than 64 levels or holds an integer of more than 4,300 digits gets a **400** naming the problem
  (:func:`brainseg.serving.answers.check_body`), never quoting the body (MLflow's app echoes such a
  body in its 400, or answers 500); this parses a body once more than MLflow does (about 0.1-0.3 s
  for a 34 MB request of 128 slices, beside seconds of segmentation);
- :class:`CleanErrors`: every error answer of MLflow's app is rewritten to ``{"error_code",
  "message"}`` with at most 1,024 characters of message, the reason first, without MLflow's dump
  of the request table, a stack trace or a file path (:func:`brainseg.serving.answers.error_document`);
  an exception that escapes the app is logged here and answered with a generic 500.

The middleware never reads the rest of a refused body: once the answer is sent, uvicorn discards
what the client still sends on that connection (memory stays flat) and the client reads the answer.
Start it with uvicorn's factory mode::

    BRAINSEG_SERVE_MODEL=models:/brainseg-segmenter@champion \\
      python -m uvicorn --factory brainseg.serving.scoring_app:create_app --host 127.0.0.1 --port 5001
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from brainseg.serving.answers import BodyRefused, check_body, error_document
from brainseg.serving.limits import RequestLimits

MODEL_ENV = "BRAINSEG_SERVE_MODEL"
LOG = logging.getLogger(__name__)


async def answer(send, status: int, message: str, error_code: str = "INVALID_PARAMETER_VALUE") -> None:
    """An MLflow-style JSON error answer (``error_code``, ``message``) with ``status``."""
    content = json.dumps({"error_code": error_code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})


class ContentTypeRequired:
    """ASGI middleware: a POST without a ``Content-Type`` header gets a 415 naming the header."""

    MESSAGE = "the request has no Content-Type header; send it as Content-Type: application/json"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
            if not content_type.strip():
                return await answer(send, 415, self.MESSAGE)
        return await self.app(scope, receive, send)


class ContentEncodingRefused:
    """ASGI middleware: a body with a ``Content-Encoding`` other than ``identity`` gets a 415 naming it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            raw = dict(scope.get("headers") or []).get(b"content-encoding", b"")
            encoding = raw.decode("latin-1").strip()
            if encoding and encoding.lower() != "identity":
                shown = encoding if len(encoding) <= 40 else encoding[:40] + "..."
                return await answer(send, 415, f"Content-Encoding {shown!r} is not accepted: this server decodes "
                                               "no compressed body; send the JSON uncompressed")
        return await self.app(scope, receive, send)


async def read_body(receive) -> bytes | None:
    """The whole request body (None if the client went away)."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


class BodyChecks:
    """ASGI middleware (inside :class:`BodyLimit`, so the body is bounded and already here): a JSON
    or CSV body that MLflow's app would echo back or answer with a 500 gets a 400 naming the problem
    (:func:`brainseg.serving.answers.check_body`); a good one is handed on unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body = await read_body(receive)
        if body is None:
            return None
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        try:
            await asyncio.to_thread(check_body, body, content_type)  # a 64 MiB parse off the event loop
        except BodyRefused as exc:
            return await answer(send, exc.status, str(exc), "BAD_REQUEST")
        return await self.app(scope, replaying(body, receive), send)


class CleanErrors:
    """ASGI middleware around MLflow's app: an error answer (status >= 400) is held and rewritten by
    :func:`brainseg.serving.answers.error_document` (bounded, reason first, no dump of the request,
    no stack trace, no path); what it drops is logged. An exception escaping the app is logged with
    its traceback and answered with a generic 500. Successful answers pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}  # the error answer being held: status and body chunks
        state = {"answer": None}  # "passed": a good answer went out; "cleaned": an error answer, rewritten

        async def hold(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held.update(status=message["status"], body=[])
                return None
            if held and message["type"] == "http.response.body":
                held["body"].append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._send_clean(send, held["status"], b"".join(held["body"]))
                    state["answer"] = "cleaned"
                return None
            if message["type"] == "http.response.start":
                state["answer"] = "passed"
            return await send(message)

        try:
            await self.app(scope, receive, hold)
        except Exception:
            LOG.exception("error answering %s %s", scope.get("method"), scope.get("path"))
            if state["answer"] == "passed":
                raise  # a good answer had begun: the server closes the connection
            if state["answer"] is None:
                await answer(send, 500, error_document(500, b"")[0]["message"], "INTERNAL_ERROR")

    @staticmethod
    async def _send_clean(send, status: int, body: bytes) -> None:
        doc, dropped = error_document(status, body)
        if dropped:
            LOG.warning("HTTP %s: the app's answer held a stack trace (not sent):\n%s", status, dropped[-4000:])
        await answer(send, status, doc["message"], doc["error_code"])


class BodyLimit:
    """ASGI middleware: the body is read whole before the app runs. Over ``max_bytes`` it gets a 413
    naming the limit (from a declared length before any byte is read); not all there within
    ``timeout_s`` a 408. The app sees neither."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def message(self, size: str) -> str:
        var = RequestLimits.ENV["max_body_bytes"]
        return (f"request body of {size} bytes exceeds the limit of {self.max_bytes:,} "
                f"bytes per request ({var}); split the request")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not (declared.isdigit() and int(declared) <= self.max_bytes):
            size = f"{int(declared):,}" if declared.isdigit() else "an unreadable number of"
            return await answer(send, 413, self.message(size))  # at once: no byte of the body read
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, total, more = [], 0, True  # read up to the limit and the deadline, then replay it to the app
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                of = f" of the {int(declared):,} declared" if declared is not None else ""
                return await answer(send, 408, f"request body incomplete: {total:,}{of} bytes arrived in "
                                                f"{self.timeout_s:g} s ({RequestLimits.ENV['body_timeout_s']}); "
                                                "send the whole body")
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            more = message.get("more_body", False)
            if total > self.max_bytes:
                return await answer(send, 413, self.message(f"more than {self.max_bytes:,}"))
        return await self.app(scope, replaying(b"".join(chunks), receive), send)


def create_app(model_uri: str | None = None, limits: RequestLimits | None = None):
    """MLflow's scoring app for ``model_uri`` (default: ``$BRAINSEG_SERVE_MODEL``) behind
    :class:`ContentTypeRequired`, :class:`ContentEncodingRefused`, :class:`BodyLimit`,
    :class:`BodyChecks` and :class:`CleanErrors`, in that order from the client."""
    from mlflow.pyfunc import scoring_server

    model_uri = model_uri or os.environ.get(MODEL_ENV)
    if not model_uri:
        raise SystemExit(f"set {MODEL_ENV} to the model to serve, e.g. models:/brainseg-segmenter@champion")
    limits = limits or RequestLimits.from_env()
    app = scoring_server.init(scoring_server.load_model_with_mlflow_config(model_uri))
    checked = BodyChecks(CleanErrors(app))
    return ContentTypeRequired(ContentEncodingRefused(BodyLimit(checked, limits.max_body_bytes, limits.body_timeout_s)))


def replaying(body: bytes, receive):
    """An ASGI ``receive`` that hands the app the body already read (once), then the client's own."""
    replayed = False

    async def replay():
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
