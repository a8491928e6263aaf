"""``run_bench``: run the sections, check their numbers against each other, print and save them."""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401

import base64
import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import requests
from rich.console import Console
from rich.table import Table

from brainseg.bench import inference as inf
from brainseg.bench.server import dataframe_split, load_test, register_champion, serve_model
from brainseg.bench.training import PIPELINE_TARGET, run_training_child
from brainseg.bench.tuning import project_file, tuning_comparison
from brainseg.data import imageio
from brainseg.data.arrays import load_full_images
from brainseg.data.manifest import scan
from brainseg.data.synth import generate
from brainseg.settings.architectures import model_name
from brainseg.settings.config import Train, load_settings

OVERHEAD_TARGET = 1.3
CLIENT = ("REST: http.client.HTTPConnection (keep-alive, one connection, headers and body in one send), "
          "JSON serialised once and posted as bytes; requests.Session on the same bytes beside it; "
          "load test: one requests.Session per client thread")


def _f(v, fmt=".1f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def bench_table(report: dict):
    m = report["inference"]["model"]
    c = m["train_config"]
    name = model_name(c["arch"], c.get("encoder"), "/")
    table = Table(title=f"brainseg bench: {name}, {c['size']} px, {c['channels']} channels, {m['precision']}, "
                        f"{report['environment']['cpus']} CPUs "
                        f"(load {_f(report['environment']['load_average_1m'], '.2f')})")
    for col in ("section", "measurement", "value", "p90 / spread / note"):
        table.add_column(col)
    tr = report["training"]
    if tr.get("skipped"):
        table.add_row("training", "skipped", "", "--training to run it")
    else:
        table.add_row("training", f"fit, real pipeline (batch {tr['batch_size']})",
                      f"{_f(tr['pipeline_slices_per_s'])} slices/s", "")
        table.add_row("", "fit, in-memory batch", f"{_f(tr['in_memory_slices_per_s'])} slices/s", "")
        table.add_row("", "pipeline efficiency", _f(tr["efficiency"], ".2f"), f">= {PIPELINE_TARGET}")
    i = report["inference"]
    for r in i["rows"]:
        table.add_row("inference", f"{r['path']}, batch {r['batch']} ({r['calls']} calls)",
                      f"p50 {_f(r['p50_ms'])} ms, {_f(r['slices_per_s'])} slices/s",
                      f"p90 {_f(r['p90_ms'])} ms, spread {_f(100 * r['spread'], '.0f')}%")
    for c in i["checks"]:
        if not c["ok"]:
            table.add_row("[red]FLAGGED[/]", f"{c['check']}, batch {c['batch']}", "not a result", c["detail"])
    ov = i["serving_overhead"]
    table.add_row("", "serving overhead (REST / network p50, batch 1)",
                  f"{_f(ov['value'], '.2f')}x" if ov["value"] is not None else "not reported",
                  f"<= {OVERHEAD_TARGET}x" if ov["value"] is not None else ov["why"][:120])
    bd = i.get("breakdown")
    if bd:
        table.add_row("", "one slice over REST, by part", f"{_f(bd['rest_p50_ms'])} ms", "p50 of each part")
        for stage, ms in bd["stages_ms"].items():
            table.add_row("", f"  {stage}", f"{_f(ms)} ms", f"{_f(100 * ms / bd['rest_p50_ms'], '.0f')} %")
    for row in i["pyfunc_profile"][:5]:
        table.add_row("", f"  cProfile: {row['function'][-60:]}", f"{_f(row['own_ms_per_predict'], '.2f')} ms",
                      "own time per predict")
    table.add_row("", "server start to /ping", f"{_f(i['server_startup_s'])} s",
                  f"first request {_f(i['first_request_ms'])} ms")
    ld = report["load"]
    table.add_row("load", f"{ld['clients']} clients x {ld['seconds']:.0f} s", f"{_f(ld['requests_per_s'])} req/s",
                  f"p50 {_f(ld['p50_ms'])} ms, p99 {_f(ld['p99_ms'])} ms, errors {ld['errors']}")
    mem = report["memory"]
    table.add_row("memory", "training process peak RSS", f"{_f(mem['train_peak_rss_mb'], '.0f')} MB", "")
    table.add_row("", "server worker peak RSS", f"{_f(mem['server_worker_peak_rss_mb'], '.0f')} MB",
                  f"whole tree {_f(mem['server_tree_peak_rss_mb_sum'], '.0f')} MB")
    tu = report["tuning"]
    if tu.get("skipped"):
        table.add_row("tuning", "skipped", "", "--tuning to run it")
    else:
        for label in ("pruned", "unpruned"):
            r = tu[label]
            table.add_row("tuning" if label == "pruned" else "", f"{label} ({r['pruner']}), {tu['trials']} trials",
                          f"best val Dice {_f(r['best_val_dice'], '.3f')}",
                          f"{r['epochs_spent']} epochs, {r['pruned']} pruned, {_f(r['seconds'], '.0f')} s")
        table.add_row("", "epochs saved by pruning", f"{_f(tu['epochs_saved_pct'], '.0f')} %", "")
    return table


def bench_config(profile: str, arch: str | None, encoder: str | None, size: int | None, channels: str | None,
                 train_batch: int | None):
    """The profile's training settings with the given options on top (raises ValueError if unusable)."""
    from brainseg.models.factory import check_names

    train = load_settings(profile, [], params_file=project_file("params.yaml"),
                          profiles_file=project_file("experiments/profiles.yaml"))["train"]
    given = {"arch": arch, "encoder": encoder, "size": size, "channels": channels, "batch_size": train_batch}
    cfg = Train.from_dict({**train, **{k: v for k, v in given.items() if v is not None}})
    check_names(cfg.arch, cfg.encoder)
    return cfg


def copy_given_model(uri: str, dest: Path) -> Path:
    """Resolve ``uri`` (folder, ``runs:/``, ``models:/``) in the user's tracking store (before the
    bench switches to its scratch store) and copy its model.h5 + brainseg.json folder to ``dest``."""
    from brainseg.inference.segmenter import MODEL_FILE
    from brainseg.registry.model_registry import resolve_model_dir

    found = resolve_model_dir(uri)
    h5 = found if found.suffix == ".h5" else next(iter(sorted(found.rglob(MODEL_FILE))), None)
    if h5 is None:
        raise FileNotFoundError(f"model {uri!r}: no {MODEL_FILE} in {found}")
    shutil.copytree(h5.parent, dest)
    return dest


def run_bench(*, profile: str = "cpu", arch: str | None = None, encoder: str | None = None,
              size: int | None = None, channels: str | None = None, train_batch: int | None = None,
              train_steps: int = 8, rounds: int = 2, batch_sizes: Sequence[int] = (1, 32), repeats: int = 200,
              batch_repeats: int = 20, profile_calls: int = 50, load_seconds: float = 20.0, clients: int = 4,
              training: bool = True, tuning: bool = True, trials: int = 4, tuning_epochs: int = 4,
              pruner: str = "hyperband", model: str | None = None, output: Path | None = Path("reports/bench.json"),
              workdir: Path | None = None, server_timeout: float = 180.0, console=None) -> dict:
    """Run every measurement once, print a table, write ``output`` (JSON) and return the report.

    ``model``: measure inference and serving with this model (folder, ``runs:/``, ``models:/``
    resolved in the user's tracking store: MLFLOW_TRACKING_URI, else ./mlflow.db) with its stored
    InferenceSettings; without it, the model trained by the training section (the ``profile``'s
    config with ``arch``... ``train_batch`` on top). ``repeats``: interleaved rounds at batch 1;
    ``batch_repeats``: at larger batches. Bad settings raise ValueError before anything runs.
    """
    settings = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, (tuple, list)) else v)
                for k, v in locals().items() if k != "console"}

    from brainseg.tune.plan import PRUNERS

    cfg = bench_config(profile, arch, encoder, size, channels, train_batch)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1 (got {list(batch_sizes)})")
    if min(train_steps, rounds, repeats, batch_repeats, profile_calls, clients, trials, tuning_epochs) < 1 \
            or load_seconds <= 0:
        raise ValueError("train_steps, rounds, repeats, batch_repeats, profile_calls, clients, trials, "
                         "tuning_epochs and load_seconds must be positive")
    if pruner not in PRUNERS:
        raise ValueError(f"pruner {pruner!r} is not one of {', '.join(PRUNERS)}")
    if not training and not model:
        raise ValueError("--no-training needs --model (the training section makes the model otherwise)")
    settings["train_config"] = cfg.to_dict()
    console = console or Console()
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="brainseg-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        if model:
            console.log(f"resolving {model} in the tracking store")
            copy_given_model(model, work / "given-model")
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


def _load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _run_all(work: Path, s: dict, cfg, log) -> dict:
    from brainseg.registry import model_registry

    report: dict = {"settings": s, "environment": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "mlflow": version("mlflow"),
        "machine": platform.processor() or platform.machine(), "load_average_1m": _load_average()}}
    log("generating synthetic slices (256x256, as the real data)")
    root = generate(work / "data" / "kaggle_3m", patients=6, slices=12, size=256, seed=0)
    manifest = scan(root).manifest
    manifest_csv = work / "manifest.csv"
    manifest.to_csv(manifest_csv, index=False)
    if s["training"]:
        log(f"training throughput in a child process ({s['rounds']} rounds x {s['train_steps']} steps, "
            f"{model_name(cfg.arch, cfg.encoder, '/')} at {cfg.size} px, batch {cfg.batch_size})")
        report["training"] = run_training_child({"train": cfg.to_dict(), "manifest": str(manifest_csv),
                                                 "steps": s["train_steps"], "rounds": s["rounds"],
                                                 "model_dir": str(work / "model")}, work)
    else:
        report["training"] = {"skipped": True}
    images = load_full_images(manifest.head(max(32, max(s["batch_sizes"]))))
    with model_registry.temporary_store(f"sqlite:///{work / 'mlflow.db'}") as store:
        report.update(_serving_sections(work, s, images, log, store))
        if s["tuning"]:
            log(f"tuning: {s['trials']} trials x {s['tuning_epochs']} epochs, {s['pruner']} vs none")
            report["tuning"] = tuning_comparison(work, s["trials"], s["tuning_epochs"], s["pruner"])
        else:
            report["tuning"] = {"skipped": True}
    report["memory"] = {"train_peak_rss_mb": report["training"].get("peak_rss_mb"),
                        "server_worker_peak_rss_mb": report["server_memory"]["worker_peak_rss_mb"],
                        "server_tree_peak_rss_mb_sum": report["server_memory"]["tree_peak_rss_mb_sum"]}
    report["environment"]["load_average_1m_end"] = _load_average()
    return report


def _serving_sections(work: Path, s: dict, images: list[np.ndarray], log, store: str) -> dict:
    from brainseg.registry import model_registry

    model_dir = work / "given-model" if s["model"] else work / "model"
    log("logging and registering the pyfunc model (the current serving code)")
    uri = register_champion(model_dir, images[0], work / "artifacts")
    pyfunc = model_registry.load_pyfunc(uri)
    served = pyfunc.unwrap_python_model()  # the SegmenterModel the server runs, loaded the same way
    seg = served.segmenter
    log("starting mlflow models serve")
    with serve_model(uri, store, work, timeout_s=s["server_timeout"]) as server:
        one = json.dumps(dataframe_split([base64.b64encode(imageio.encode_png(images[0])).decode("ascii")]))
        t0 = time.perf_counter()
        first = requests.post(f"{server.url}/invocations", data=one, timeout=120,
                              headers={"Content-Type": "application/json"})
        first_ms = 1000 * (time.perf_counter() - t0)
        if first.status_code != 200:
            raise RuntimeError(f"server answered {first.status_code}: {first.text[:500]}")
        log(f"inference paths, batches {s['batch_sizes']}: {s['repeats']} rounds at batch 1, "
            f"{s['batch_repeats']} at larger batches, interleaved")
        measured = inf.time_inference(seg, pyfunc, served, server.url, images, s["batch_sizes"], s["repeats"],
                                      s["batch_repeats"])
        log(f"cProfile of {s['profile_calls']} pyfunc calls")
        encoded = [base64.b64encode(imageio.encode_png(im)).decode("ascii") for im in images]
        measured["pyfunc_profile"] = inf.profile_pyfunc(pyfunc, encoded, s["profile_calls"])
        log(f"load test: {s['clients']} clients for {s['load_seconds']} s")
        load = load_test(server.url, one, s["clients"], s["load_seconds"])
        memory = server.memory_mb()
        startup = server.startup_s
    measured["serving_overhead"] = inf.serving_overhead(measured)
    measured.update({"overhead_target": OVERHEAD_TARGET, "client": CLIENT, "server_startup_s": startup,
                     "first_request_ms": first_ms, "input": f"{len(images)} synthetic 256x256 slices (PNG)",
                     "model": {"uri": s["model"] or "trained in the training section",
                               "train_config": seg.cfg.to_dict(), "inference": seg.settings.to_dict(),
                               "precision": seg.precision}})
    return {"inference": measured, "load": load, "server_memory": memory}
