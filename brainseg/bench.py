"""``brainseg bench``: training, inference, serving, memory and tuning measured side by side in one run.

Everything is written into a temporary working folder (synthetic data, a throw-away MLflow
tracking/registry database, the logged model, the Optuna storage) except the JSON report.

Sections of the report (numbers are per second of wall clock on this machine, slices = images):

- ``training``: slices/s of the real input pipeline (``train_dataset`` over ``load_arrays``) and of
  the same model fed one fixed in-memory batch; their ratio is the pipeline efficiency (target
  >= 0.95). Runs in a child process, whose peak RSS is the training memory.
- ``inference``: ``model.predict``, the compiled ``tf.function``, the pyfunc model (base64 PNG in,
  features and mask out) and the REST server, per batch size: p50 latency and slices/s. Serving
  overhead = REST p50 / compiled-network p50 at batch 1 (target <= 1.3).
- ``load``: ``clients`` threads posting batch-1 requests to 127.0.0.1 for ``load_seconds``.
- ``memory``: peak RSS of the training process and of the server processes (VmHWM).
- ``tuning`` (optional): the same smoke study with and without pruning: best val Dice vs epochs.

With the defaults (the ``cpu`` profile's model, tuning on) a run takes about 8-10 minutes on the
project's 2-core machine while another job runs; ``tuning=False`` saves about half. The numbers
are only as quiet as the machine: the report records the load average before and after.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SEGMENTER_NAME = "brainseg-segmenter"
PIPELINE_TARGET = 0.95
OVERHEAD_TARGET = 1.3
PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- the REST server
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
                workers: int = 1):
    """Start ``mlflow models serve -m MODEL_URI --env-manager local`` on a free 127.0.0.1 port.

    Yields a :class:`ModelServer` once ``/ping`` answers 200; raises RuntimeError (with the
    server's log tail) if it exits or is not ready within ``timeout_s``. Always stopped on exit.
    """
    import requests

    port = free_port()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"serve-{port}.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
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


@contextlib.contextmanager
def temporary_tracking(uri: str):
    """Point MLflow tracking and registry (and child processes, via the environment) at ``uri``."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_REGISTRY_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])


def experiment_in(name: str, artifact_root: Path) -> str:
    """Create (or find) experiment ``name`` with its artifacts under ``artifact_root`` and make it
    the active one. Without this, a new SQLite store puts artifacts in ``./mlruns`` of the
    working folder."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        name, artifact_location=Path(artifact_root).resolve().as_uri())
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def register_champion(model_dir: Path, example_image: np.ndarray | None = None,
                      artifact_root: Path | None = None) -> str:
    """Log ``model_dir`` as the pyfunc segmenter in a run, register it, make it champion."""
    import mlflow

    from brainseg import registry
    from brainseg.serving import log_pyfunc_segmenter

    if artifact_root is not None:
        experiment_in("brainseg-bench", artifact_root)
    else:
        mlflow.set_experiment("brainseg-bench")
    with mlflow.start_run(run_name="bench-model") as run:
        uri = log_pyfunc_segmenter(Path(model_dir), example_image, {"data_version": "bench"})
    mv, _ = registry.register(SEGMENTER_NAME, uri, run.info.run_id, {"source_run_id": run.info.run_id},
                              "Benchmark model. Not for use.")
    registry.client().set_registered_model_alias(SEGMENTER_NAME, registry.CHAMPION, mv.version)
    return f"models:/{SEGMENTER_NAME}@{registry.CHAMPION}"


# ------------------------------------------------------------------------------ timing helpers
def latency_stats(seconds: Sequence[float], batch: int) -> dict:
    """p50/p90 latency (ms) of calls of ``batch`` slices and the slices/s at the median."""
    t = np.asarray(seconds, float)
    p50 = float(np.median(t))
    return {"batch": batch, "calls": len(t), "p50_ms": 1000 * p50, "p90_ms": 1000 * float(np.percentile(t, 90)),
            "slices_per_s": batch / p50 if p50 > 0 else float("nan")}


def time_calls(fn: Callable[[], object], calls: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------ training (child process)
def train_throughput(spec: dict) -> dict:
    """Slices/s of ``fit`` fed by the real pipeline vs a fixed in-memory batch (same model).

    ``spec``: ``train`` (TrainConfig dict), ``manifest`` (CSV path), ``steps``, ``rounds``,
    ``model_dir`` (where the model is saved afterwards, for the inference benchmarks).
    """
    import resource

    import brainseg.keras_env  # noqa: F401
    import pandas as pd
    import tensorflow as tf
    import tf_keras as keras

    from brainseg.config import TrainConfig
    from brainseg.data.arrays import load_arrays
    from brainseg.data.pipeline import train_dataset
    from brainseg.models.factory import build_model
    from brainseg.train import _compile, save_model  # the exact compile step training uses

    cfg = TrainConfig.from_dict(spec["train"])
    steps, rounds = int(spec["steps"]), int(spec["rounds"])
    X, Y = load_arrays(pd.read_csv(spec["manifest"]), cfg.prep)
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg)
    _compile(model, cfg, cfg.lr)
    batch = min(cfg.batch_size, len(X))
    pipeline = train_dataset(X, Y, batch_size=batch, tumor_fraction=cfg.tumor_fraction,
                             augment=cfg.augment, seed=cfg.seed)
    xb, yb = next(iter(pipeline))
    in_memory = tf.data.Dataset.from_tensors((xb, yb)).repeat()

    class StepClock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, b, logs=None):
            self.ends.append(time.perf_counter())

    clock = StepClock()

    def fit_rate(ds) -> float:  # steady state: from the end of the first step to the end of the last
        model.fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[clock])
        return steps * batch / (clock.ends[-1] - clock.ends[0])

    for ds in (pipeline, in_memory):  # trace the train step and start the pipeline's threads
        model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
    rates: dict[str, list[float]] = {"pipeline": [], "in_memory": []}
    for _ in range(rounds):  # alternate, so background load hits both alike
        rates["pipeline"].append(fit_rate(pipeline))
        rates["in_memory"].append(fit_rate(in_memory))
    it = iter(pipeline)
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    alone = steps * batch / (time.perf_counter() - t0)
    save_model(model, cfg, Path(spec["model_dir"]))
    pipe, mem = float(np.median(rates["pipeline"])), float(np.median(rates["in_memory"]))
    return {"batch_size": batch, "steps": steps, "rounds": rounds, "train_slices": len(X),
            "pipeline_slices_per_s": pipe, "in_memory_slices_per_s": mem,
            "efficiency": pipe / mem, "target": PIPELINE_TARGET,
            "pipeline_alone_slices_per_s": alone, "rounds_pipeline": rates["pipeline"],
            "rounds_in_memory": rates["in_memory"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_training_child(spec: dict, workdir: Path, timeout_s: float = 900) -> dict:
    spec_path, out_path = Path(workdir) / "train_spec.json", Path(workdir) / "train_result.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "brainseg.bench", "train-worker", str(spec_path), str(out_path)],
                          check=False, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not out_path.is_file():
        raise RuntimeError(f"training benchmark failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out_path.read_text())


# --------------------------------------------------------------------------------- inference
def _calls_for_batch(model, forward, pyfunc, session, server_url: str, images: list[np.ndarray],
                     encoded: list[str], b: int, prep) -> dict[str, Callable[[], object]]:
    """One callable per path, each handling the same ``b`` slices."""
    import pandas as pd
    import tensorflow as tf

    from brainseg.data.preprocess import prepare_image

    idx = [i % len(images) for i in range(b)]
    X = np.stack([prepare_image(images[i], prep) for i in idx]).astype(np.float32)
    Xt = tf.constant(X)
    frame = pd.DataFrame({"image": [encoded[i] for i in idx]})
    body = json.dumps(dataframe_split([encoded[i] for i in idx]))

    def rest():
        r = session.post(f"{server_url}/invocations", data=body, timeout=120,
                         headers={"Content-Type": "application/json"})
        if r.status_code != 200:
            raise RuntimeError(f"REST batch {b}: HTTP {r.status_code}: {r.text[:300]}")

    return {"keras model.predict": lambda: model.predict(X, batch_size=b, verbose=0),
            "compiled tf.function": lambda: forward(Xt).numpy(),
            "pyfunc (base64 PNG)": lambda: pyfunc.predict(frame),
            "REST /invocations": rest}


def inference_paths(model, cfg, pyfunc, server_url: str, images: list[np.ndarray], batch_sizes: Sequence[int],
                    repeats: int) -> list[dict]:
    """p50 latency and slices/s of each path for each batch size (same slices for all paths).

    Batch 1 is timed ``repeats`` times, larger batches ``repeats // 8`` times (at least 3).
    """
    import requests

    from brainseg.data import imageio
    from brainseg.train import compiled_forward

    forward = compiled_forward(model)
    encoded = [base64.b64encode(imageio.encode_png(im)).decode("ascii") for im in images]
    session = requests.Session()
    rows = []
    for b in batch_sizes:
        calls = repeats if b == 1 else max(3, repeats // 8)
        paths = _calls_for_batch(model, forward, pyfunc, session, server_url, images, encoded, b, cfg.prep)
        for name, fn in paths.items():
            rows.append({"path": name, **latency_stats(time_calls(fn, calls), b)})
    return rows


def serving_breakdown(model, cfg, pyfunc, server_url: str, images: list[np.ndarray], repeats: int) -> dict:
    """Where one slice's REST latency goes: the profile of the served path.

    The stages are the functions ``SegmenterModel.predict`` calls. Each round times every stage,
    the pyfunc model and the REST server once on the same slice (slices cycled), so a change in the
    machine's load hits all of them alike; the MLflow parts are the medians' differences.
    """
    import pandas as pd
    import requests

    from brainseg.data import imageio
    from brainseg.data.preprocess import prepare_image
    from brainseg.evaluate import EvalSettings, masks_from_probs
    from brainseg.features import slice_features
    from brainseg.serving import decode_row, encode_mask_png
    from brainseg.train import predict_probs

    ev = EvalSettings(threshold=cfg.threshold)
    encoded = [base64.b64encode(imageio.encode_png(im)).decode("ascii") for im in images]
    X = [prepare_image(im, cfg.prep).astype(np.float16)[None] for im in images]
    probs = [predict_probs(model, x) for x in X]
    masks = [masks_from_probs(p, [im.shape[:2]], ev)[0] for p, im in zip(probs, images)]
    bodies = [json.dumps(dataframe_split([e])) for e in encoded]
    session = requests.Session()

    def rest(i):
        r = session.post(f"{server_url}/invocations", data=bodies[i], timeout=120,
                         headers={"Content-Type": "application/json"})
        r.raise_for_status()

    calls = {
        "decode (base64, PNG, checks)": lambda i: decode_row(encoded[i], 0, cfg.channels),
        "preprocess": lambda i: prepare_image(images[i], cfg.prep),
        "network": lambda i: predict_probs(model, X[i]),
        "threshold + resize": lambda i: masks_from_probs(probs[i], [images[i].shape[:2]], ev),
        "features": lambda i: slice_features(masks[i], images[i]),
        "mask PNG": lambda i: encode_mask_png(masks[i]),
        "pyfunc": lambda i: pyfunc.predict(pd.DataFrame({"image": [encoded[i]]})),
        "REST": rest,
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats + 2):  # two warm-up rounds
        i = r % len(images)
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn(i)
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    p50 = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    rest_ms, pyfunc_ms = p50.pop("REST"), p50.pop("pyfunc")
    stages = dict(p50)
    stages["MLflow pyfunc (schema, tables)"] = pyfunc_ms - sum(p50.values())
    stages["MLflow scoring server (HTTP, JSON)"] = rest_ms - pyfunc_ms
    return {"stages_ms": stages, "rest_p50_ms": rest_ms, "pyfunc_p50_ms": pyfunc_ms, "rounds": repeats}


def load_test(url: str, payload: str, clients: int, seconds: float) -> dict:
    """``clients`` threads posting ``payload`` for ``seconds``: requests/s, p50/p99, errors."""
    import requests

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


# ------------------------------------------------------------------------------------ tuning
def tuning_comparison(workdir: Path, trials: int, epochs: int, pruner: str, seed: int = 0) -> dict:
    """The smoke study run twice on the same tiny synthetic data: with ``pruner`` and without."""
    import optuna

    from brainseg.config import load_settings
    from brainseg.data.context import DataContext
    from brainseg.data.manifest import patients_table, scan
    from brainseg.data.split import split_patients
    from brainseg.data.synth import generate
    from brainseg.tune import plan_from_settings, run_study

    root = generate(workdir / "tune-data" / "kaggle_3m", patients=12, slices=12, size=64, seed=seed)
    manifest = scan(root).manifest
    split = split_patients(patients_table(manifest), val_fraction=0.25, test_fraction=0.15, folds=1, seed=seed)
    ctx = DataContext(root, manifest, split, "bench-synthetic", workdir / "tune-cache")
    out = {"trials": trials, "epochs_per_trial": epochs, "search_space": "experiments/search_space_smoke.yaml"}
    experiment_in("brainseg-bench-tune", workdir / "artifacts")  # run_study finds it by name
    for label, name in (("pruned", pruner), ("unpruned", "none")):
        storage = f"sqlite:///{workdir / f'optuna-{label}.db'}"
        settings = load_settings("smoke", [
            f"tune.search_space={project_file('experiments/search_space_smoke.yaml').resolve()}",
            f"tune.pruner={name}", f"tune.n_trials={trials}", f"tune.epochs={epochs}", f"tune.storage={storage}",
            f"tune.sampler_seed={seed}", f"train.patience={epochs}"],
            params_file=project_file("params.yaml"), profiles_file=project_file("experiments/profiles.yaml"))
        plan = plan_from_settings(settings, f"bench-{label}", storage, trials, 3600)
        t0 = time.monotonic()
        summary = run_study(plan, ctx, "brainseg-bench-tune")
        study = optuna.load_study(study_name=plan.study_name, storage=storage)
        states = [t.state.name for t in study.trials]
        out[label] = {"pruner": name, "best_val_dice": summary.get("best_value"),
                      "epochs_spent": sum(len(t.intermediate_values) for t in study.trials),
                      "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                      "failed": states.count("FAIL"), "seconds": time.monotonic() - t0}
    full = out["unpruned"]["epochs_spent"] or 1
    out["epochs_saved_pct"] = 100 * (1 - out["pruned"]["epochs_spent"] / full)
    return out


# ------------------------------------------------------------------------------------ report
def bench_table(report: dict):
    from rich.table import Table

    def f(v, fmt=".1f"):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    c = report["settings"]["train_config"]
    table = Table(title=f"brainseg bench: {c['arch']}" + (f"/{c['encoder']}" if c["arch"] not in ("plain_unet", "unetpp")
                                                          else "") + f", {c['size']} px, {c['channels']} channels, "
                        f"{report['environment']['cpus']} CPUs")
    for col in ("section", "measurement", "value", "target / note"):
        table.add_column(col)
    tr = report["training"]
    table.add_row("training", f"fit, real pipeline (batch {tr['batch_size']})", f"{f(tr['pipeline_slices_per_s'])} slices/s", "")
    table.add_row("", "fit, in-memory batch", f"{f(tr['in_memory_slices_per_s'])} slices/s", "")
    table.add_row("", "pipeline efficiency", f(tr["efficiency"], ".2f"), f">= {PIPELINE_TARGET}")
    table.add_row("", "input pipeline alone", f"{f(tr['pipeline_alone_slices_per_s'])} slices/s", "no model")
    for row in report["inference"]["rows"]:
        value = (f"p50 {f(row['p50_ms'])} ms" if row["batch"] == 1 else f"{f(row['slices_per_s'])} slices/s")
        table.add_row("inference", f"{row['path']}, batch {row['batch']}", value,
                      f"{f(row['slices_per_s'])} slices/s" if row["batch"] == 1 else f"p50 {f(row['p50_ms'])} ms")
    inf = report["inference"]
    table.add_row("", "serving overhead (REST / compiled p50, batch 1)", f"{f(inf['serving_overhead'], '.2f')}x",
                  f"<= {OVERHEAD_TARGET}x")
    table.add_row("", "HTTP overhead (REST / pyfunc p50, batch 1)", f"{f(inf['http_overhead'], '.2f')}x", "")
    bd = inf["breakdown"]
    table.add_row("", f"profile of one slice over REST ({bd['rounds']} rounds)", f"{f(bd['rest_p50_ms'])} ms",
                  "p50 of each part")
    for stage, ms in bd["stages_ms"].items():
        table.add_row("", f"  {stage}", f"{f(ms)} ms", f"{f(100 * ms / bd['rest_p50_ms'], '.0f')} %")
    table.add_row("", "server start to /ping", f"{f(inf['server_startup_s'])} s",
                  f"first request {f(inf['first_request_ms'])} ms")
    ld = report["load"]
    table.add_row("load", f"{ld['clients']} clients x {ld['seconds']:.0f} s", f"{f(ld['requests_per_s'])} req/s",
                  f"p50 {f(ld['p50_ms'])} ms, p99 {f(ld['p99_ms'])} ms")
    table.add_row("", "errors", str(ld["errors"]), "must be 0")
    mem = report["memory"]
    table.add_row("memory", "training process peak RSS", f"{f(mem['train_peak_rss_mb'], '.0f')} MB", "")
    table.add_row("", "server worker peak RSS", f"{f(mem['server_worker_peak_rss_mb'], '.0f')} MB",
                  f"whole tree {f(mem['server_tree_peak_rss_mb_sum'], '.0f')} MB")
    tu = report["tuning"]
    if tu.get("skipped"):
        table.add_row("tuning", "skipped", "", "--tuning to run it")
    else:
        for label in ("pruned", "unpruned"):
            r = tu[label]
            table.add_row("tuning" if label == "pruned" else "", f"{label} ({r['pruner']}), {tu['trials']} trials",
                          f"best val Dice {f(r['best_val_dice'], '.3f')}",
                          f"{r['epochs_spent']} epochs, {r['pruned']} pruned, {f(r['seconds'], '.0f')} s")
        table.add_row("", "epochs saved by pruning", f"{f(tu['epochs_saved_pct'], '.0f')} %", "")
    return table


def project_file(relative: str) -> Path:
    """``relative`` in the working folder when it is there (a project), else in this checkout."""
    here = Path(relative)
    return here if here.is_file() else PROJECT_ROOT / relative


def bench_config(profile: str, arch: str | None, encoder: str | None, size: int | None, channels: str | None,
                 train_batch: int | None):
    """The profile's training settings with the given options on top (raises ValueError if unusable)."""
    from brainseg.config import TrainConfig, load_settings
    from brainseg.models.factory import check_names

    train = load_settings(profile, [], params_file=project_file("params.yaml"),
                          profiles_file=project_file("experiments/profiles.yaml"))["train"]
    given = {"arch": arch, "encoder": encoder, "size": size, "channels": channels, "batch_size": train_batch}
    cfg = TrainConfig.from_dict({**train, **{k: v for k, v in given.items() if v is not None}})
    check_names(cfg.arch, cfg.encoder)
    return cfg


def run_bench(*, profile: str = "cpu", arch: str | None = None, encoder: str | None = None,
              size: int | None = None, channels: str | None = None, train_batch: int | None = None,
              train_steps: int = 8, rounds: int = 2, batch_sizes: Sequence[int] = (1, 32), repeats: int = 20,
              load_seconds: float = 20.0, clients: int = 4,
              tuning: bool = True, trials: int = 4, tuning_epochs: int = 4, pruner: str = "hyperband",
              model: str | None = None, output: Path | None = Path("reports/bench.json"),
              workdir: Path | None = None, server_timeout: float = 180.0, console=None) -> dict:
    """Run every measurement once, print a table, write ``output`` (JSON) and return the report.

    The model is the ``profile``'s training config (params.yaml + experiments/profiles.yaml) with
    ``arch``, ``encoder``, ``size``, ``channels`` and ``train_batch`` on top. ``batch_sizes``:
    inference batches (p50 latency of the smallest, slices/s of each). ``model``: benchmark
    inference and serving with this model (folder, ``runs:/``, ``models:/``) instead of the one
    trained by the training measurement. ``workdir``: keep the working files there (default: a
    temporary folder, removed afterwards). Bad settings raise ValueError before anything runs.
    """
    settings = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, (tuple, list)) else v)
                for k, v in locals().items() if k != "console"}
    from rich.console import Console

    from brainseg.tune import PRUNERS

    cfg = bench_config(profile, arch, encoder, size, channels, train_batch)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1 (got {list(batch_sizes)})")
    if min(train_steps, rounds, repeats, clients, trials, tuning_epochs) < 1 or load_seconds <= 0:
        raise ValueError("train_steps, rounds, repeats, clients, trials, tuning_epochs and load_seconds must be positive")
    if pruner not in PRUNERS:
        raise ValueError(f"pruner {pruner!r} is not one of {', '.join(PRUNERS)}")
    settings["train_config"] = cfg.to_dict()
    console = console or Console()
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="brainseg-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        report = _clean(_run_all(work, settings, cfg, console.log))
    console.print(bench_table(report))
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
        console.print(f"report -> {output}")
    return report


def _clean(obj):
    """JSON-safe: NumPy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _run_all(work: Path, s: dict, cfg, log) -> dict:
    import platform

    import brainseg.keras_env  # noqa: F401
    import mlflow

    from brainseg.data.arrays import load_full_images
    from brainseg.data.manifest import scan
    from brainseg.data.synth import generate

    report: dict = {"settings": s, "environment": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "mlflow": mlflow.__version__,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}}
    log("generating synthetic slices (256x256, as the real data)")
    root = generate(work / "data" / "kaggle_3m", patients=6, slices=12, size=256, seed=0)
    manifest = scan(root).manifest
    manifest_csv = work / "manifest.csv"
    manifest.to_csv(manifest_csv, index=False)
    log(f"training throughput in a child process ({s['rounds']} rounds x {s['train_steps']} steps, "
        f"{cfg.arch}/{cfg.encoder} at {cfg.size} px, batch {cfg.batch_size})")
    report["training"] = run_training_child({"train": cfg.to_dict(), "manifest": str(manifest_csv),
                                             "steps": s["train_steps"], "rounds": s["rounds"],
                                             "model_dir": str(work / "model")}, work)
    images = load_full_images(manifest.head(max(s["batch_sizes"])))
    with temporary_tracking(f"sqlite:///{work / 'mlflow.db'}"):
        report.update(_serving_sections(work, s, images, log))
        if s["tuning"]:
            log(f"tuning: {s['trials']} trials x {s['tuning_epochs']} epochs, {s['pruner']} vs none")
            report["tuning"] = tuning_comparison(work, s["trials"], s["tuning_epochs"], s["pruner"])
        else:
            report["tuning"] = {"skipped": True}
    report["memory"] = {"train_peak_rss_mb": report["training"]["peak_rss_mb"],
                        "server_worker_peak_rss_mb": report["server_memory"]["worker_peak_rss_mb"],
                        "server_tree_peak_rss_mb_sum": report["server_memory"]["tree_peak_rss_mb_sum"]}
    report["environment"]["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return report


def _serving_sections(work: Path, s: dict, images: list[np.ndarray], log) -> dict:
    import mlflow

    from brainseg.serving import load_segmenter
    from brainseg.train import load_model_dir, save_model

    if s["model"]:
        net, cfg = load_segmenter(s["model"])
        save_model(net, cfg, work / "given-model")
        model_dir = work / "given-model"
    else:
        model_dir = work / "model"
        net, cfg = load_model_dir(model_dir)
    log("logging and registering the pyfunc model")
    uri = register_champion(model_dir, images[0], work / "artifacts")
    pyfunc = mlflow.pyfunc.load_model(uri)
    log("starting mlflow models serve")
    with serve_model(uri, mlflow.get_tracking_uri(), work, timeout_s=s["server_timeout"]) as server:
        import requests

        one = json.dumps(dataframe_split([base64.b64encode(_png(images[0])).decode("ascii")]))
        t0 = time.perf_counter()
        first = requests.post(f"{server.url}/invocations", data=one, timeout=120,
                              headers={"Content-Type": "application/json"})
        first_ms = 1000 * (time.perf_counter() - t0)
        if first.status_code != 200:
            raise RuntimeError(f"server answered {first.status_code}: {first.text[:500]}")
        log(f"inference paths, batches {s['batch_sizes']}")
        rows = inference_paths(net, cfg, pyfunc, server.url, images, s["batch_sizes"], s["repeats"])
        breakdown = serving_breakdown(net, cfg, pyfunc, server.url, images, s["repeats"])
        log(f"load test: {s['clients']} clients for {s['load_seconds']} s")
        load = load_test(server.url, one, s["clients"], s["load_seconds"])
        memory = server.memory_mb()
        startup = server.startup_s
    p50 = {(r["path"], r["batch"]): r["p50_ms"] for r in rows}
    b1 = min(s["batch_sizes"])
    rest, bare, pyf = (p50[("REST /invocations", b1)], p50[("compiled tf.function", b1)],
                       p50[("pyfunc (base64 PNG)", b1)])
    return {"inference": {"rows": rows, "serving_overhead": rest / bare, "http_overhead": rest / pyf,
                          "breakdown": breakdown,
                          "overhead_target": OVERHEAD_TARGET, "overhead_batch": b1,
                          "server_startup_s": startup, "first_request_ms": first_ms,
                          "model_uri": s["model"] or "trained in the training section"},
            "load": load, "server_memory": memory}


def _png(image: np.ndarray) -> bytes:
    from brainseg.data import imageio

    return imageio.encode_png(image)


if __name__ == "__main__":  # python -m brainseg.bench train-worker SPEC.json OUT.json (used by run_bench)
    if len(sys.argv) == 4 and sys.argv[1] == "train-worker":
        result = train_throughput(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(result))
    else:
        sys.exit("usage: python -m brainseg.bench train-worker SPEC.json OUT.json")
