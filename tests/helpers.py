"""Helpers the tests share, written once: ``from helpers import free_port, invoke, ...``.

pytest puts ``tests/`` on ``sys.path`` (it holds conftest.py and no ``__init__.py``), so this module
imports as ``helpers`` from every test file, in ``tests/<package>/`` too and under pytest-xdist.
Fixtures stay in conftest.py; plain functions live here.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (as JavaScript, Go and Java do)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    """``arr`` written as a TIFF file, in memory (``kwargs`` go to ``tifffile.imwrite``)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def invoke(*args):
    """Run a brainseg command in-process; returns typer's Result (exit_code, output). Arguments may
    be paths or numbers; an exception that escapes the command (a traceback) fails the test."""
    from typer.testing import CliRunner

    from brainseg.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def invoke_flat(*args) -> tuple[int, str]:
    """:func:`invoke` as (exit code, output on one line): rich may wrap a long message anywhere."""
    result = invoke(*args)
    return result.exit_code, " ".join(result.output.split())


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def project_files(path: Path) -> Path:
    """The project's settings in ``path``: params.yaml and experiments/ (profiles, search spaces).
    ``conftest.make_project`` adds synthetic data to them."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / "params.yaml", path / "params.yaml")
    shutil.copytree(PROJECT_ROOT / "experiments", path / "experiments", dirs_exist_ok=True)
    return path


def copy_checkout(dest: Path) -> Path:
    """The project's files as a fresh clone would have them (tracked + new, not ignored), committed
    in a new git repository at ``dest``."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = PROJECT_ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", "clone"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def threshold_net(size: int = 16):
    """A Keras model (S, S, 1) z-scored FLAIR -> sigmoid(8 x - 4): bright pixels are tumor. No randomness."""
    import tf_keras as keras

    inp = keras.Input((size, size, 1))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inp, conv(inp))
    conv.set_weights([np.full((1, 1, 1, 1), 8.0, np.float32), np.array([-4.0], np.float32)])
    return model


def threshold_model(folder: Path, size: int = 32) -> Path:
    """:func:`threshold_net` saved as a FLAIR-only model folder (float32): a known segmenter for
    predict, the served model and the page. Returns ``folder``."""
    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.settings.config import Train

    return save_model(threshold_net(size), Train(arch="plain_unet", size=size, channels="flair"),
                      InferenceSettings(precision="float32"), folder)


def json_reply(handler, code: int, payload: dict) -> None:
    """Answer a request of an ``http.server`` handler with ``payload`` as JSON (a fake server in a test)."""
    data = json.dumps(payload).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


# ------------------------------------------------------------------ `brainseg run` on a fresh clone
def pipeline_env() -> dict:
    """The environment of a `brainseg run` in a test: no MLflow variables of this process, and
    deterministic kernels, so that two runs on the same data can be compared exactly."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"TF_DETERMINISTIC_OPS": "1"}


def run_reports(clone: Path, stdout: str) -> dict:
    """What a finished `brainseg run` in ``clone`` reported (JSON-able): tune, register and test
    summaries, its console output and the split it used."""
    read = lambda name: json.loads((clone / name).read_text())  # noqa: E731
    return {"tune": read("reports/tune.json"), "register": read("reports/register.json"),
            "test": read("reports/test/metrics.json"), "stdout": stdout,
            "split": (clone / "data/processed/split.csv").read_text()}


def brainseg_run_on_a_fresh_clone(folder: Path) -> dict:
    """`brainseg run` once on a fresh clone in ``folder``/clone (the Quickstart's main job): its
    reports (:func:`run_reports`) and the clone's path."""
    clone = copy_checkout(folder / "clone")
    first = subprocess.run([sys.executable, "-m", "brainseg", "run"], cwd=clone, env=pipeline_env(),
                           capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return {"clone": str(clone), **run_reports(clone, first.stdout)}
