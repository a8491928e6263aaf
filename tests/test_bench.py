"""``run_bench`` at its tiniest: every section is measured, the JSON holds sane numbers."""

from __future__ import annotations

import json
import math

import pytest

from brainseg.bench import run_bench

pytestmark = pytest.mark.timeout(300)

PATHS = {"keras model.predict", "compiled tf.function", "pyfunc (base64 PNG)", "REST /invocations"}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_bench_measures_every_section(tmp_path):
    from rich.console import Console

    out = tmp_path / "bench.json"
    console = Console(record=True, width=140)
    returned = run_bench(profile="smoke", arch="plain_unet", size=32, channels="flair", train_batch=4,
                         train_steps=2, rounds=1, batch_sizes=[1, 4], repeats=3, load_seconds=2, clients=2,
                         tuning=False, output=out, console=console)

    report = json.loads(out.read_text())
    assert report == returned
    assert {"settings", "environment", "training", "inference", "load", "memory", "tuning"} <= set(report)
    tr = report["training"]
    for key in ("pipeline_slices_per_s", "in_memory_slices_per_s", "efficiency", "pipeline_alone_slices_per_s"):
        assert positive(tr[key]), (key, tr[key])
    assert tr["efficiency"] == pytest.approx(tr["pipeline_slices_per_s"] / tr["in_memory_slices_per_s"])

    rows = report["inference"]["rows"]
    assert {(r["path"], r["batch"]) for r in rows} == {(p, b) for p in PATHS for b in (1, 4)}
    for r in rows:
        assert positive(r["p50_ms"]) and positive(r["slices_per_s"]) and r["p90_ms"] >= r["p50_ms"], r
    rest_b1 = next(r for r in rows if r["path"] == "REST /invocations" and r["batch"] == 1)
    bare_b1 = next(r for r in rows if r["path"] == "compiled tf.function" and r["batch"] == 1)
    assert report["inference"]["serving_overhead"] == pytest.approx(rest_b1["p50_ms"] / bare_b1["p50_ms"])
    assert positive(report["inference"]["server_startup_s"])
    bd = report["inference"]["breakdown"]
    stages = bd["stages_ms"]
    for stage in ("decode (base64, PNG, checks)", "preprocess", "network", "features", "mask PNG"):
        assert positive(stages[stage]), (stage, stages)
    # the profile accounts for the whole one-slice REST latency, part by part
    assert sum(stages.values()) == pytest.approx(bd["rest_p50_ms"])
    assert stages["MLflow scoring server (HTTP, JSON)"] == pytest.approx(bd["rest_p50_ms"] - bd["pyfunc_p50_ms"])
    assert bd["rest_p50_ms"] > stages["network"]

    load = report["load"]
    assert load["errors"] == 0 and load["requests"] > 0 and load["clients"] == 2, load
    assert positive(load["requests_per_s"]) and load["p99_ms"] >= load["p50_ms"] > 0
    mem = report["memory"]
    assert 50 < mem["train_peak_rss_mb"] < 16_000 and 50 < mem["server_worker_peak_rss_mb"] < 16_000, mem
    assert report["tuning"] == {"skipped": True}
    assert report["settings"]["train_config"]["size"] == 32

    table = console.export_text()
    for words in ("pipeline efficiency", "REST /invocations", "serving overhead", "MLflow scoring server", "errors",
                  "peak RSS"):
        assert words in table


@pytest.mark.parametrize("kwargs, words", [
    ({"arch": "segformer"}, "unknown architecture"),
    ({"batch_sizes": [0]}, "batch sizes"),
    ({"pruner": "random"}, "pruner"),
])
def test_bad_settings_fail_before_anything_runs(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        run_bench(output=tmp_path / "bench.json", **kwargs)
    assert not (tmp_path / "bench.json").exists()
