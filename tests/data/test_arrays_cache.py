"""The decoded-array cache: two workers building the same cache at once both succeed (the
multi-worker tuning race seen in CI: both renamed the same temporary file)."""

from __future__ import annotations

import threading

import numpy as np

from brainseg.data.arrays import load_arrays
from brainseg.data.manifest import scan
from brainseg.data.synth import generate
from brainseg.settings.config import Train


def test_two_workers_build_the_same_cache_at_once(tmp_path):
    root = generate(tmp_path / "kaggle_3m", patients=3, slices=4, size=32, seed=1)
    manifest = scan(root).manifest
    prep = Train.from_dict({"size": 32, "channels": "flair"}).prep
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


def _setup(tmp_path):
    root = generate(tmp_path / "kaggle_3m", patients=2, slices=4, size=32, seed=2)
    return scan(root).manifest, Train.from_dict({"size": 32, "channels": "flair"}).prep, tmp_path / "cache"


def test_a_truncated_cache_is_rebuilt_with_one_line(tmp_path):
    manifest, prep, cache = _setup(tmp_path)
    X, Y = load_arrays(manifest, prep, cache_dir=cache, version="v")
    xf = next(cache.glob("*.x.npy"))
    xf.write_bytes(xf.read_bytes()[: xf.stat().st_size // 2])  # a crash halfway through a copy
    said = []
    X2, Y2 = load_arrays(manifest, prep, cache_dir=cache, version="v", say=said.append)
    assert len(said) == 1 and "unreadable" in said[0] and "rebuilding" in said[0] and xf.name[:-6] in said[0]
    assert np.array_equal(X2, X) and np.array_equal(Y2, Y)
    said.clear()
    X3, _ = load_arrays(manifest, prep, cache_dir=cache, version="v", say=said.append)  # sound again
    assert isinstance(X3, np.memmap) and np.array_equal(X3, X) and said == []


def test_a_cache_of_the_wrong_shape_is_rebuilt(tmp_path):
    manifest, prep, cache = _setup(tmp_path)
    X, _ = load_arrays(manifest, prep, cache_dir=cache, version="v")
    np.save(next(cache.glob("*.y.npy")), np.zeros((1, 32, 32, 1), np.uint8))  # another run's array
    said = []
    _, Y2 = load_arrays(manifest, prep, cache_dir=cache, version="v", say=said.append)
    assert len(said) == 1 and "not (8, 32, 32, 1)" in said[0] and Y2.shape == (8, 32, 32, 1)


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path):
    import os
    import time

    manifest, prep, cache = _setup(tmp_path)
    cache.mkdir()
    stale, fresh = cache / "k.x.0123.tmp.npy", cache / "k.x.4567.tmp.npy"  # a killed run's; a live worker's
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    said = []
    load_arrays(manifest, prep, cache_dir=cache, version="v", say=said.append)
    assert not stale.exists() and fresh.exists()
    assert said == [f"cache {cache}: removed 1 temporary file(s) left by an interrupted run"]
