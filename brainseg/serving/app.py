"""MLflow's scoring server behind a limit on the request body.

``mlflow models serve`` (MLflow 3.17: uvicorn running the FastAPI app of
``mlflow.pyfunc.scoring_server``) reads the whole body into memory and parses it before the model's
own checks run, and has no setting to bound it (uvicorn has none either). This module serves the
same app, built by MLflow's own ``scoring_server.init`` from the same model URI, wrapped in a plain
ASGI middleware that answers **413** when the body exceeds ``BRAINSEG_SERVE_MAX_BODY_BYTES``
(:class:`brainseg.serving.limits.RequestLimits`, default 64 MiB):

- with a ``Content-Length`` over the limit, before reading any of it;
- with a chunked body (no length), as soon as the bytes read pass the limit.

The rest of an oversized body is read and discarded (memory stays flat) so the client gets the
answer instead of a reset connection. Start it with uvicorn's factory mode::

    BRAINSEG_SERVE_MODEL=models:/brainseg-segmenter@champion \\
      python -m uvicorn --factory brainseg.serving.app:create_app --host 127.0.0.1 --port 5001
"""

from __future__ import annotations

import json
import os

from brainseg.serving.limits import RequestLimits

MODEL_ENV = "BRAINSEG_SERVE_MODEL"


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: HTTP bodies over ``max_bytes`` get a 413 naming the limit; the app never sees them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def message(self, size: str) -> bytes:
        var = RequestLimits.ENV["max_body_bytes"]
        return json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                           "message": f"request body of {size} bytes exceeds the limit of {self.max_bytes:,} "
                                      f"bytes per request ({var}); split the request"}).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) <= self.max_bytes:
                return await self.app(scope, receive, send)  # the server stops the body at its length
            size = f"{int(declared):,}" if declared.isdigit() else "an unreadable number of"
            return await self.refuse(receive, send, size)
        chunks, total, more = [], 0, True  # chunked: read up to the limit, then replay it to the app
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            more = message.get("more_body", False)
            if total > self.max_bytes:
                return await self.refuse(receive, send, f"more than {self.max_bytes:,}", more)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def refuse(self, receive, send, size: str, more: bool = True):
        while more:  # discard the rest, so the client reads the answer rather than a reset
            message = await receive()
            more = message["type"] == "http.request" and message.get("more_body", False)
        content = self.message(size)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def create_app(model_uri: str | None = None, limits: RequestLimits | None = None):
    """MLflow's scoring app for ``model_uri`` (default: ``$BRAINSEG_SERVE_MODEL``) behind :class:`BodyLimit`."""
    from mlflow.pyfunc import scoring_server

    model_uri = model_uri or os.environ.get(MODEL_ENV)
    if not model_uri:
        raise SystemExit(f"set {MODEL_ENV} to the model to serve, e.g. models:/brainseg-segmenter@champion")
    limits = limits or RequestLimits.from_env()
    return BodyLimit(scoring_server.init(scoring_server.load_model_with_mlflow_config(model_uri)),
                     limits.max_body_bytes)
