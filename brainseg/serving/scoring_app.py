"""MLflow's scoring server behind a limit on the request body and a required content type.

``mlflow models serve`` (MLflow 3.17: uvicorn running the FastAPI app of
``mlflow.pyfunc.scoring_server``) reads the whole body into memory and parses it before the model's
own checks run, and has no setting to bound it (uvicorn has none either). This module serves the
same app, built by MLflow's own ``scoring_server.init`` from the same model URI, wrapped in plain
ASGI middleware that reads no body byte before deciding:

- :class:`ContentTypeRequired`: a POST without a ``Content-Type`` header gets a **415** naming the
  header (MLflow's app answers it with a 500 and a traceback in the server log);
- :class:`BodyLimit`: a body over ``BRAINSEG_SERVE_MAX_BODY_BYTES``
  (:class:`brainseg.serving.limits.RequestLimits`, default 64 MiB) gets a **413**: with a
  ``Content-Length`` over the limit at once, before any byte is read (a client that declares
  70 MiB and sends nothing gets its answer too); with a chunked body (no length), as soon as the
  bytes read pass the limit;
- the whole body must arrive within ``BRAINSEG_SERVE_BODY_TIMEOUT_S`` (default 30 s), else a **408**:
  a client that declares a body and stalls (a partial body) is answered and holds nothing, while
  the other clients' requests go on (uvicorn serves connections concurrently).

The middleware never reads the rest of a refused body: once the answer is sent, uvicorn discards
what the client still sends on that connection (memory stays flat) and the client reads the answer.
Start it with uvicorn's factory mode::

    BRAINSEG_SERVE_MODEL=models:/brainseg-segmenter@champion \\
      python -m uvicorn --factory brainseg.serving.scoring_app:create_app --host 127.0.0.1 --port 5001
"""

from __future__ import annotations

import asyncio
import json
import os

from brainseg.serving.limits import RequestLimits

MODEL_ENV = "BRAINSEG_SERVE_MODEL"


async def answer(send, status: int, message: str) -> None:
    """An MLflow-style JSON error answer (``error_code``, ``message``) with ``status``."""
    content = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": message}).encode()
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
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def create_app(model_uri: str | None = None, limits: RequestLimits | None = None):
    """MLflow's scoring app for ``model_uri`` (default: ``$BRAINSEG_SERVE_MODEL``) behind
    :class:`ContentTypeRequired` and :class:`BodyLimit`."""
    from mlflow.pyfunc import scoring_server

    model_uri = model_uri or os.environ.get(MODEL_ENV)
    if not model_uri:
        raise SystemExit(f"set {MODEL_ENV} to the model to serve, e.g. models:/brainseg-segmenter@champion")
    limits = limits or RequestLimits.from_env()
    app = scoring_server.init(scoring_server.load_model_with_mlflow_config(model_uri))
    return ContentTypeRequired(BodyLimit(app, limits.max_body_bytes, limits.body_timeout_s))
