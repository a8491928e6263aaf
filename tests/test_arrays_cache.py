"""The decoded-array cache: two workers building the same cache at once both succeed (the
multi-worker tuning race seen in CI: both renamed the same temporary file)."""

from __future__ import annotations

import threading

import numpy as np

from brainseg.config import TrainConfig
from brainseg.data.arrays import load_arrays
from brainseg.data.manifest import scan
from brainseg.data.synth import generate


def test_two_workers_build_the_same_cache_at_once(tmp_path):
    root = generate(tmp_path / "kaggle_3m", patients=3, slices=4, size=32, seed=1)
    manifest = scan(root).manifest
    prep = TrainConfig.from_dict({"size": 32, "channels": "flair"}).prep
    cache = tmp_path / "cache"
    results, errors = [], []
    start = threading.Barrier(4)

    def build():
        try:
            start.wait()
            results.append(load_arrays(manifest, prep, cache_dir=cache, version="v"))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4 and all(np.array_equal(results[0][0], x) for x, _ in results)
    assert sorted(p.name.split(".")[-2] for p in cache.iterdir()) == ["x", "y"]  # no temporary file left
    again_x, _ = load_arrays(manifest, prep, cache_dir=cache, version="v")  # now memory-mapped
    assert isinstance(again_x, np.memmap) and np.array_equal(again_x, results[0][0])
