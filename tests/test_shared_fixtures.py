"""conftest's ``built_once``: a session's expensive fixture (the fresh `brainseg run`) is built by one
pytest-xdist process and read by the others, and a failure is reported to all of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

WORKER = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
os.environ["PYTEST_XDIST_WORKER"] = {worker!r}
import conftest

class Factory:  # what pytest-xdist gives a worker: a temporary folder inside the session's shared one
    def getbasetemp(self):
        return Path({base!r}) / {worker!r}

def build(folder):
    with open(Path({base!r}) / "builds.txt", "a") as f:
        f.write({worker!r} + "\\n")
    time.sleep(1.0)  # long enough for the other process to arrive and wait
    if {fail!r}:
        raise RuntimeError("the build broke")
    folder.mkdir(parents=True)
    return {{"built_by": {worker!r}, "folder": str(folder)}}

try:
    print(json.dumps(conftest.built_once(Factory(), "thing", build)))
except BaseException as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
"""


def run_workers(base: Path, fail: bool = False) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(tests=str(TESTS), worker=w, base=str(base),
                                                                   fail=fail)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in ("gw0", "gw1")]
    outs = [p.communicate(timeout=120) for p in procs]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_two_processes_get_one_build(tmp_path):
    first, second = run_workers(tmp_path)
    assert first == second and first["built_by"] in ("gw0", "gw1")
    assert (tmp_path / "builds.txt").read_text().split() == [first["built_by"]]  # built once
    assert Path(first["folder"]).is_dir() and Path(first["folder"]).parent == tmp_path / "thing"


def test_a_failed_build_fails_the_other_process_without_building_again(tmp_path):
    results = run_workers(tmp_path, fail=True)
    assert sorted(r["error"] for r in results) == ["Failed", "RuntimeError"]
    assert any("built by another test process, failed: RuntimeError: the build broke" in r["message"]
               for r in results)
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
