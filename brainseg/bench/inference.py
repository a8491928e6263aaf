"""Inference and serving speed: every path on the same model, input size and slices, interleaved.

Paths, each wrapping the one before it (so each must be at least as slow):

- ``network``: the Segmenter's compiled forward pass on prepared (B, S, S, C) float32 inputs;
- ``Segmenter.segment``: decoded slices -> final masks (preprocess, network, threshold, post-process);
- ``pyfunc``: the logged MLflow model's ``predict`` on a table of base64 PNG slices (decode, segment,
  features, mask PNG, MLflow's schema and params checks);
- ``REST``: the same table posted to ``mlflow models serve`` by the plainest keep-alive client, the
  standard library's ``http.client.HTTPConnection`` (pre-serialised JSON bytes, headers and body in
  one send, one connection);
- ``REST, requests.Session``: the same bytes posted with ``requests`` (built on ``http.client``
  through urllib3), what most Python users would write; it shows what the client library costs.

One reference: ``keras model.predict`` (Keras' own loop, wraps nothing above).

Timing: a warm-up, then rounds; in each round every path handles the same slices once, in an
order rotated round by round, so background load hits all paths alike. Statistics per path:
p10/p50/p90, spread (interquartile range / p50). :func:`consistency_checks` flags orderings that
cannot be true (a wrapper faster than what it wraps, ``requests`` faster than the ``http.client``
it is built on, a noisy machine) so the report does not present them as results.
"""

from __future__ import annotations

import base64
import cProfile
import http.client
import json
import pstats
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import requests

from brainseg.data import imageio

NETWORK, SEGMENT, PYFUNC, REST, REST_REQUESTS, KERAS = (
    "network (compiled)", "Segmenter.segment", "pyfunc (base64 PNG)", "REST /invocations",
    "REST, requests.Session", "keras model.predict")
# (wrapper, wrapped): requests posts through http.client, so it cannot be faster than REST
WRAPS = [(SEGMENT, NETWORK), (PYFUNC, SEGMENT), (REST, PYFUNC), (REST_REQUESTS, REST)]
ORDER_TOLERANCE = 0.05   # a wrapper may read up to 5% faster than what it wraps (noise)
NOISY_SPREAD = 0.5       # interquartile range above 50% of p50: the machine was not quiet


def latency_stats(seconds: Sequence[float], batch: int) -> dict:
    """Calls of ``batch`` slices -> p10/p50/p90 (ms), spread (IQR / p50) and slices/s at p50."""
    t = 1000 * np.asarray(seconds, float)
    p10, p25, p50, p75, p90 = (float(v) for v in np.percentile(t, [10, 25, 50, 75, 90]))
    return {"batch": batch, "calls": len(t), "p10_ms": p10, "p50_ms": p50, "p90_ms": p90,
            "spread": (p75 - p25) / p50 if p50 > 0 else float("nan"),
            "slices_per_s": 1000 * batch / p50 if p50 > 0 else float("nan")}


def interleaved(calls: dict[str, Callable[[int], object]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Time each call once per round, ``calls[name](round)``; the order rotates every round.

    Returns name -> ``rounds`` durations in seconds (the ``warmup`` rounds are not kept).
    """
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            calls[name](r)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


class PlainClient:
    """A keep-alive ``http.client`` connection posting pre-serialised JSON bytes.

    Like ``requests``, it reconnects once when the server has closed the idle connection
    (uvicorn closes keep-alive connections idle for 5 s).
    """

    def __init__(self, url: str, timeout: float = 120.0):
        u = urlparse(url)
        self.path = (u.path.rstrip("/") or "") + "/invocations"
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)

    def post(self, body: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                self.conn.request("POST", self.path, body=body, headers={"Content-Type": "application/json"})
                response = self.conn.getresponse()
                return response.status, response.read()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected,
                    http.client.CannotSendRequest):
                self.conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def request_body(encoded: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}).encode()


def path_calls(segmenter, pyfunc, session, plain: PlainClient, url: str, images: list[np.ndarray],
               encoded: list[str], batch: int) -> dict[str, Callable[[int], object]]:
    """One callable per path; round ``r`` handles slices ``r*batch ... r*batch+batch-1`` (cycled)."""
    import tensorflow as tf

    from brainseg.inference.segmenter import compiled_forward

    n = len(images)
    cache: dict[int, dict] = {}
    forward = compiled_forward(segmenter.network)

    def inputs(r: int) -> dict:
        start = (r * batch) % n
        if start not in cache:
            idx = [(start + j) % n for j in range(batch)]
            ims = [images[i] for i in idx]
            X, _ = segmenter.prepare(ims)
            cache[start] = {"images": ims, "X": X, "Xt": tf.constant(X),
                            "body": request_body([encoded[i] for i in idx]),
                            "frame": pd.DataFrame({"image": [encoded[i] for i in idx]})}
        return cache[start]

    def rest(r):
        status, text = plain.post(inputs(r)["body"])
        if status != 200:
            raise RuntimeError(f"REST batch {batch}: HTTP {status}: {text[:300]!r}")

    def rest_requests(r):
        resp = session.post(f"{url}/invocations", data=inputs(r)["body"], timeout=120,
                            headers={"Content-Type": "application/json"})
        if resp.status_code != 200:
            raise RuntimeError(f"REST (requests) batch {batch}: HTTP {resp.status_code}: {resp.text[:300]}")

    return {NETWORK: lambda r: forward(inputs(r)["Xt"]).numpy(),
            SEGMENT: lambda r: segmenter.segment(inputs(r)["images"]),
            PYFUNC: lambda r: pyfunc.predict(inputs(r)["frame"]),
            REST: rest, REST_REQUESTS: rest_requests,
            KERAS: lambda r: segmenter.network.predict(inputs(r)["X"], batch_size=batch, verbose=0)}


def stage_calls(served, images: list[np.ndarray], encoded: list[str]) -> dict[str, Callable[[int], object]]:
    """The parts of one batch-1 ``SegmenterModel.predict``, each callable on round ``r``'s slice."""
    from brainseg.serving import pyfunc as serving

    n = len(images)
    frames = [pd.DataFrame({"image": [e]}) for e in encoded]
    masks = [served.segmenter.segment([im]).masks for im in images]
    threshold = served.segmenter.settings.threshold
    return {"decode (base64, header, pixels)": lambda r: serving.decode_request(
                frames[r % n], served.segmenter.cfg.channels, served.limits),
            "answer (features, mask PNG, table)": lambda r: serving.answer_rows(
                masks[r % n], [images[r % n]], threshold, True, served.meta)}


def profile_pyfunc(pyfunc, encoded: list[str], calls: int, top: int = 15) -> list[dict]:
    """cProfile of ``calls`` batch-1 ``pyfunc.predict`` calls: the ``top`` functions by own time."""
    frames = [pd.DataFrame({"image": [e]}) for e in encoded]
    profiler = cProfile.Profile()
    profiler.enable()
    for r in range(calls):
        pyfunc.predict(frames[r % len(frames)])
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{file.rsplit('/site-packages/', 1)[-1]}:{line}({func})",
                     "calls_per_predict": ncalls / calls, "own_ms_per_predict": 1000 * tottime / calls,
                     "cum_ms_per_predict": 1000 * cumtime / calls})
    return sorted(rows, key=lambda d: -d["own_ms_per_predict"])[:top]


def time_inference(segmenter, pyfunc, served, url: str, images: list[np.ndarray], batch_sizes: Sequence[int],
                   rounds_b1: int, rounds_batch: int) -> dict:
    """Rows per (path, batch), the batch-1 profile of the served path and the consistency checks."""
    encoded = [base64.b64encode(imageio.encode_png(im)).decode("ascii") for im in images]
    session, plain = requests.Session(), PlainClient(url)
    rows, stages = [], {}
    try:
        for b in batch_sizes:
            calls = path_calls(segmenter, pyfunc, session, plain, url, images, encoded, b)
            if b == 1:
                calls.update(stage_calls(served, images, encoded))
            times = interleaved(calls, rounds_b1 if b == 1 else rounds_batch)
            for name, t in times.items():
                stats = latency_stats(t, b)
                if name in (NETWORK, SEGMENT, PYFUNC, REST, REST_REQUESTS, KERAS):
                    rows.append({"path": name, **stats})
                else:
                    stages[name] = stats["p50_ms"]
    finally:
        plain.close()
    out = {"rows": rows, "checks": consistency_checks(rows)}
    if 1 in batch_sizes:
        out["breakdown"] = breakdown(rows, stages)
    return out


def _p50(rows: list[dict], path: str, batch: int) -> float | None:
    return next((r["p50_ms"] for r in rows if r["path"] == path and r["batch"] == batch), None)


def breakdown(rows: list[dict], stages: dict[str, float]) -> dict:
    """Where one slice's REST time goes (p50 of each part, same rounds as the paths).

    The parts not timed on their own are differences of p50s: pre/post-processing = segment -
    network; MLflow pyfunc = pyfunc - (decode + segment + answer); HTTP = REST - pyfunc.
    """
    net, seg, pyf, rest = (_p50(rows, p, 1) for p in (NETWORK, SEGMENT, PYFUNC, REST))
    decode = stages["decode (base64, header, pixels)"]
    answer = stages["answer (features, mask PNG, table)"]
    parts = {"decode (base64, header, pixels)": decode, "preprocess + threshold/post-process": seg - net,
             "network": net, "answer (features, mask PNG, table)": answer,
             "MLflow pyfunc (schema, params)": pyf - decode - seg - answer,
             "MLflow scoring server (HTTP, JSON)": rest - pyf}
    return {"stages_ms": parts, "rest_p50_ms": rest, "pyfunc_p50_ms": pyf}


def consistency_checks(rows: list[dict]) -> list[dict]:
    """Orderings that must hold, per batch: each ``{"check", "batch", "ok", "detail"}``."""
    checks = []
    for b in sorted({r["batch"] for r in rows}):
        for wrapper, inner in WRAPS:
            a, c = _p50(rows, wrapper, b), _p50(rows, inner, b)
            if a is None or c is None:
                continue
            checks.append({"check": f"{wrapper} >= {inner}", "batch": b, "ok": a >= c * (1 - ORDER_TOLERANCE),
                           "detail": f"p50 {a:.1f} ms vs {c:.1f} ms"})
        for r in rows:
            if r["batch"] == b and r["spread"] > NOISY_SPREAD:
                checks.append({"check": f"{r['path']} spread", "batch": b, "ok": False,
                               "detail": f"IQR is {100 * r['spread']:.0f}% of p50: the machine was busy"})
    return checks


def serving_overhead(measured: dict) -> dict:
    """REST p50 / network p50 at batch 1, or None with the reason when a check failed."""
    rows, checks = measured["rows"], measured["checks"]
    rest, net = _p50(rows, REST, 1), _p50(rows, NETWORK, 1)
    failed = [c for c in checks if c["batch"] == 1 and not c["ok"]]
    if rest is None or net is None:
        return {"value": None, "why": "batch 1 not measured"}
    if failed:
        return {"value": None, "why": "inconsistent: " + "; ".join(f"{c['check']} ({c['detail']})" for c in failed),
                "unchecked_ratio": rest / net}
    return {"value": rest / net, "why": ""}
