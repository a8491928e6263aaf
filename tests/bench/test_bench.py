"""The benchmark: its statistics and consistency checks on hand-built numbers, the model URI
resolved in the user's tracking store, and ``run_bench`` at its tiniest end to end."""

from __future__ import annotations

import json
import math

import pytest

from brainseg.bench import inference as inf
from brainseg.bench import run_bench

pytestmark = pytest.mark.timeout(1800)  # the tiny end-to-end run starts a server; slow on a loaded machine

PATHS = {inf.NETWORK, inf.SEGMENT, inf.PYFUNC, inf.REST, inf.REST_REQUESTS, inf.KERAS}


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def row(path: str, p50: float, batch: int = 1, spread: float = 0.1) -> dict:
    return {"path": path, "batch": batch, "p50_ms": p50, "spread": spread}


# ------------------------------------------------------------------------- statistics, checks
def test_latency_stats_of_known_durations():
    s = inf.latency_stats([0.010, 0.020, 0.030, 0.040, 0.050], batch=2)
    assert (s["calls"], s["p50_ms"], s["p10_ms"], s["p90_ms"]) == (5, 30.0, 14.0, 46.0)
    assert s["spread"] == pytest.approx((40 - 20) / 30) and s["slices_per_s"] == pytest.approx(2 / 0.030)


def test_interleaved_rotates_the_order_and_keeps_only_rounds_after_the_warm_up():
    order = []
    calls = {name: (lambda r, n=name: order.append((r, n))) for name in "abc"}
    times = inf.interleaved(calls, rounds=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert [n for _, n in order] == list("abc" "bca" "cab" "abc")
    assert [r for r, _ in order] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3


CONSISTENT = [row(inf.NETWORK, 20), row(inf.SEGMENT, 24), row(inf.PYFUNC, 30), row(inf.REST, 40),
              row(inf.REST_REQUESTS, 46)]  # requests slower than http.client: possible, not flagged
REQUESTS_FIRST = f"{inf.REST_REQUESTS} >= {inf.REST}"


@pytest.mark.parametrize("rows, flagged", [
    (CONSISTENT, []),
    # the numbers: REST p50 158.6 ms beside a requests client at 48 ms (it wraps http.client)
    ([*CONSISTENT[:3], row(inf.REST, 158.6), row(inf.REST_REQUESTS, 48)], [REQUESTS_FIRST]),
    # a wrapper faster than what it wraps (pyfunc 46.7 slices/s vs network 34.7 at batch 32)
    ([row(inf.NETWORK, 922, 32), row(inf.SEGMENT, 700, 32), row(inf.PYFUNC, 685, 32)],
     [f"{inf.SEGMENT} >= {inf.NETWORK}"]),
    ([row(inf.NETWORK, 20), row(inf.SEGMENT, 19.5)], []),  # within the 5% tolerance
    ([row(inf.NETWORK, 20, spread=0.9), row(inf.SEGMENT, 24)], [f"{inf.NETWORK} spread"]),
])
def test_consistency_checks_flag_impossible_orderings(rows, flagged):
    checks = inf.consistency_checks(rows)
    assert [c["check"] for c in checks if not c["ok"]] == flagged


def test_the_serving_overhead_is_not_reported_from_inconsistent_numbers():
    good = {"rows": CONSISTENT, "checks": inf.consistency_checks(CONSISTENT)}
    assert inf.serving_overhead(good) == {"value": 2.0, "why": ""}
    bad_rows = [*CONSISTENT[:3], row(inf.REST, 158.6), row(inf.REST_REQUESTS, 48)]
    bad = inf.serving_overhead({"rows": bad_rows, "checks": inf.consistency_checks(bad_rows)})
    assert bad["value"] is None and REQUESTS_FIRST in bad["why"]


def test_the_breakdown_accounts_for_the_rest_time_part_by_part():
    stages = {"decode (base64, header, pixels)": 2.0, "answer (features, mask PNG, table)": 3.0}
    bd = inf.breakdown(CONSISTENT, stages)
    parts = bd["stages_ms"]
    assert parts["network"] == 20 and parts["preprocess + threshold/post-process"] == 4
    assert parts["MLflow pyfunc (schema, params)"] == 30 - 2 - 24 - 3
    assert parts["MLflow scoring server (HTTP, JSON)"] == 10 and sum(parts.values()) == bd["rest_p50_ms"] == 40


# --------------------------------------------------------------------- --model in the user's store
@pytest.fixture
def registered_model(tmp_path):
    """A tiny model registered as ``tiny@champion`` in a SQLite store at tmp_path (the 'user's')."""
    import mlflow
    import tf_keras as keras

    from brainseg.bench import register_champion
    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.models.factory import build_model
    from brainseg.settings.config import Train
    from conftest import Tracking

    cfg = Train.from_dict({"arch": "plain_unet", "base_filters": 4, "size": 32, "channels": "flair"})
    keras.utils.set_random_seed(0)
    model_dir = save_model(build_model(cfg), cfg, InferenceSettings(threshold=0.35), tmp_path / "m")
    with Tracking(tmp_path / "user.db"):
        uri = register_champion(model_dir, artifact_root=tmp_path / "artifacts")
        yield uri, mlflow.get_tracking_uri()


def test_a_model_uri_is_resolved_in_the_users_tracking_store(registered_model, tmp_path):
    from brainseg.bench.report import copy_given_model
    from brainseg.inference.segmenter import read_settings

    uri, store = registered_model
    dest = copy_given_model(uri, tmp_path / "given")
    assert (dest / "model.h5").is_file()
    assert read_settings(dest / "brainseg.json")[1].threshold == 0.35
    with pytest.raises(FileNotFoundError) as info:
        copy_given_model("models:/no-such-model@champion", tmp_path / "other")
    assert "no-such-model" in str(info.value) and store in str(info.value)


# -------------------------------------------------------------------------------- end to end
def test_tiny_bench_measures_every_section(tmp_path):
    from rich.console import Console

    out = tmp_path / "bench.json"
    console = Console(record=True, width=160)
    returned = run_bench(profile="smoke", arch="plain_unet", size=32, channels="flair", train_batch=4,
                         train_steps=2, rounds=1, batch_sizes=[1, 4], repeats=6, batch_repeats=3, profile_calls=3,
                         load_seconds=2, clients=2, tuning=False, output=out, console=console,
                         server_timeout=600)

    report = json.loads(out.read_text())
    assert report == returned
    assert {"settings", "environment", "training", "inference", "load", "memory", "tuning"} <= set(report)
    tr = report["training"]
    for key in ("pipeline_slices_per_s", "in_memory_slices_per_s", "efficiency"):
        assert positive(tr[key]), (key, tr[key])

    i = report["inference"]
    assert {(r["path"], r["batch"]) for r in i["rows"]} == {(p, b) for p in PATHS for b in (1, 4)}
    for r in i["rows"]:
        assert r["calls"] == (6 if r["batch"] == 1 else 3), r
        assert positive(r["p50_ms"]) and r["p10_ms"] <= r["p50_ms"] <= r["p90_ms"], r
    assert all(isinstance(c["ok"], bool) and c["detail"] for c in i["checks"])
    assert any(c["check"] == REQUESTS_FIRST for c in i["checks"])
    bd = i["breakdown"]
    assert sum(bd["stages_ms"].values()) == pytest.approx(bd["rest_p50_ms"])
    rest = next(r["p50_ms"] for r in i["rows"] if r["path"] == inf.REST and r["batch"] == 1)
    net = next(r["p50_ms"] for r in i["rows"] if r["path"] == inf.NETWORK and r["batch"] == 1)
    ov = i["serving_overhead"]
    assert ov["value"] == pytest.approx(rest / net) if ov["value"] is not None else "inconsistent" in ov["why"]
    assert i["pyfunc_profile"] and all(p["own_ms_per_predict"] >= 0 for p in i["pyfunc_profile"])
    assert i["model"]["train_config"]["size"] == 32 and i["model"]["precision"] in ("float32", "bfloat16")
    assert "keep-alive" in i["client"]

    load = report["load"]
    assert load["errors"] == 0 and load["requests"] > 0 and load["clients"] == 2, load
    assert 50 < report["memory"]["server_worker_peak_rss_mb"] < 16_000
    assert report["tuning"] == {"skipped": True}

    table = console.export_text()
    for words in ("pipeline efficiency", "REST /invocations", "serving overhead", "MLflow scoring server", "cProfile"):
        assert words in table
    assert ("FLAGGED" in table) == any(not c["ok"] for c in i["checks"])


@pytest.mark.parametrize("kwargs, words", [
    ({"arch": "segformer"}, "unknown architecture"),
    ({"batch_sizes": [0]}, "batch sizes"),
    ({"pruner": "random"}, "pruner"),
    ({"repeats": 0}, "repeats"),
    ({"training": False}, "needs --model"),
])
def test_bad_settings_fail_before_anything_runs(tmp_path, kwargs, words):
    with pytest.raises(ValueError, match=words):
        run_bench(output=tmp_path / "bench.json", **kwargs)
    assert not (tmp_path / "bench.json").exists()


def test_the_cli_refuses_no_training_without_a_model(tmp_path):
    from helpers import invoke

    result = invoke("bench", "--no-training", "--out", str(tmp_path / "b.json"))
    assert result.exit_code == 2 and "needs --model" in result.output
