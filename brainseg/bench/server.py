"""The REST side of the benchmark: start/stop ``mlflow models serve``, the tracking store it
reads, the request body, and the load test.

Bodies are serialised once with ``json.dumps`` and posted as bytes over keep-alive connections:
the latency paths use ``http.client`` (bench/inference.py, with ``requests`` beside it), the load
test one ``requests.Session`` per client thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

from brainseg.serving.scoring_app import MODEL_ENV

SEGMENTER_NAME = "brainseg-segmenter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil missing or the process is gone
        return []


def _status_kb(pid: int, field: str) -> int:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of a process in kB from /proc; 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclasses.dataclass
class ModelServer:
    """A running ``mlflow models serve`` (its own process group) on 127.0.0.1."""

    url: str
    process: subprocess.Popen
    log_path: Path
    startup_s: float

    def pids(self) -> list[int]:
        return [self.process.pid, *_children(self.process.pid)]

    def memory_mb(self) -> dict:
        """Peak RSS (VmHWM) per process of the server tree; the largest is the model worker."""
        peaks = {pid: _status_kb(pid, "VmHWM") / 1024 for pid in self.pids()}
        return {"worker_peak_rss_mb": max(peaks.values(), default=0.0),
                "tree_peak_rss_mb_sum": sum(peaks.values()), "processes": len(peaks)}

    def worker_pid(self) -> int:
        """The process of the tree holding the most memory now: the one running the model."""
        return max(self.pids(), key=lambda pid: _status_kb(pid, "VmRSS"))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # the group this module started (start_new_session)
        process.wait(timeout=20)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def serve_model(model_uri: str, tracking_uri: str, workdir: Path, timeout_s: float = 90.0,
                workers: int = 1, env: dict | None = None, body_limit: bool = False):
    """Start ``mlflow models serve -m MODEL_URI --env-manager local`` on a free 127.0.0.1 port
    (``body_limit``: the same MLflow app behind the request-body limit, :mod:`brainseg.serving.scoring_app`).

    Yields a :class:`ModelServer` once ``/ping`` answers 200; raises RuntimeError (with the
    server's log tail) if it exits or is not ready within ``timeout_s``. Always stopped on exit.
    ``env``: extra environment variables of the server (e.g. the BRAINSEG_SERVE_* request limits).
    """
    port = free_port()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"serve-{port}.log"
    env = {**os.environ, **(env or {}), "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    if body_limit:
        env[MODEL_ENV] = model_uri
        argv = [sys.executable, "-m", "uvicorn", "--factory", "brainseg.serving.scoring_app:create_app",
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    start = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(argv, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = ModelServer(f"http://127.0.0.1:{port}", process, log_path, 0.0)
    try:
        while True:
            try:
                if requests.get(f"{server.url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {process.returncode}:\n{server.log_tail()}")
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"mlflow models serve not ready after {timeout_s:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
        server.startup_s = time.monotonic() - start
        yield server
    finally:
        _stop(process)


def dataframe_split(values: list[str], params: dict | None = None) -> dict:
    body = {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}
    if params:
        body["params"] = params
    return body


def experiment_in(name: str, artifact_root: Path) -> str:
    """Create (or find) experiment ``name`` with its artifacts under ``artifact_root`` and make it
    the active one. Without this, a new SQLite store puts artifacts in ``./mlruns`` of the
    working folder."""
    from brainseg.tracking import mlflow_runs

    return mlflow_runs.set_experiment(name, artifact_root).experiment_id


def register_champion(model_dir: Path, example_image: np.ndarray | None = None,
                      artifact_root: Path | None = None) -> str:
    """Log ``model_dir`` as the pyfunc segmenter in a run, register it, make it champion."""
    from brainseg.registry import model_registry
    from brainseg.tracking import mlflow_runs

    mlflow_runs.set_experiment("brainseg-bench", artifact_root)
    with mlflow_runs.run("bench-model", {"data_version": "bench"}) as run:
        uri = mlflow_runs.log_segmenter_model(Path(model_dir), example_image, {"data_version": "bench"})
    mv, _ = model_registry.register(SEGMENTER_NAME, uri, run.info.run_id, {"source_run_id": run.info.run_id},
                              "Benchmark model. Not for use.")
    mlflow_runs.client().set_registered_model_alias(SEGMENTER_NAME, model_registry.CHAMPION, mv.version)
    return f"models:/{SEGMENTER_NAME}@{model_registry.CHAMPION}"


def load_test(url: str, payload: str, clients: int, seconds: float) -> dict:
    """``clients`` threads posting ``payload`` for ``seconds``: requests/s, p50/p99, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client():
        session = requests.Session()
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                r = session.post(f"{url}/invocations", data=payload, timeout=60,
                                 headers={"Content-Type": "application/json"})
                ok, why = r.status_code == 200, f"HTTP {r.status_code}"
            except requests.RequestException as exc:
                ok, why = False, type(exc).__name__
            with lock:
                (latencies.append(time.perf_counter() - t0) if ok else errors.append(why))

    start = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 90)
    elapsed = time.monotonic() - start
    t = np.asarray(latencies or [float("nan")])
    return {"clients": clients, "seconds": elapsed, "requests": len(latencies), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "requests_per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * float(np.median(t)), "p99_ms": 1000 * float(np.percentile(t, 99))}

