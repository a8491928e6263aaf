"""The whole pipeline in one command: the stages of dvc.yaml, through DVC or (without it) in order.

There is one definition of the pipeline, ``dvc.yaml``; ``brainseg run`` and ``mlflow run . -e main``
execute it with ``dvc repro`` (only what changed re-runs), or run its stage commands in order where
DVC cannot be used (no Git/DVC repository). Every MLflow run of one execution carries the tag
``brainseg.pipeline_run`` with the same id.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path

import yaml

from brainseg.config import load_settings
from brainseg.data.importer import dvc_available, ensure_dataset
from brainseg.tracking import PIPELINE_ENV, PIPELINE_TAG

DVC_FILE = Path("dvc.yaml")
PARAMS_FILE = Path("params.yaml")


def set_profile(name: str, params_file: Path = PARAMS_FILE) -> bool:
    """Set ``profile:`` in params.yaml (keeping comments) so DVC sees the change; True if it changed."""
    load_settings(name)  # fails on an unknown profile before anything is written
    text = params_file.read_text()
    new, n = re.subn(r"(?m)^profile:\s*\S+", f"profile: {name}", text, count=1)
    if n != 1:
        raise ValueError(f"{params_file}: no top-level `profile:` line to set")
    if new != text:
        params_file.write_text(new)
    return new != text


def stage_commands(params: dict, dvc_file: Path = DVC_FILE) -> list[tuple[str, str]]:
    """(stage name, command) in file order, with ``${a.b}`` filled in from params.yaml."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]

    def fill(match: re.Match) -> str:
        node = params
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return [(name, re.sub(r"\$\{([^}]+)\}", fill, spec["cmd"])) for name, spec in stages.items()]


def run(profile: str | None = None, use_dvc: bool = True, echo=print) -> str:
    """Make sure a dataset is there (synthetic by default), then run the pipeline; returns the run id."""
    if profile:
        if set_profile(profile):
            echo(f"params.yaml: profile set to {profile}")
    settings = load_settings()
    use_dvc = use_dvc and dvc_available()
    echo(ensure_dataset(Path(settings["data"]["root"]), settings["data"]["synth"], use_dvc=use_dvc))
    run_id = uuid.uuid4().hex[:12]
    env = {**os.environ, PIPELINE_ENV: run_id}
    echo(f"pipeline run {run_id} (profile {settings['profile']}; MLflow tag {PIPELINE_TAG}={run_id})")
    if use_dvc:
        subprocess.run(["dvc", "repro"], env=env, check=True)
    else:
        params = yaml.safe_load(PARAMS_FILE.read_text())
        for name, cmd in stage_commands(params):
            echo(f"stage {name}: {cmd}")
            subprocess.run(shlex.split(cmd), env=env, check=True)
    return run_id


FINAL_WORDS = """\
Done. Next:
  mlflow ui --backend-store-uri sqlite:///mlflow.db            # compare runs: http://127.0.0.1:5000
  mlflow models serve -m models:/brainseg-segmenter@champion --env-manager local -h 127.0.0.1 -p 5001
  mlflow models serve -m models:/brainseg-survival@champion --env-manager local -h 127.0.0.1 -p 5002
  brainseg predict data/raw/kaggle_3m --out predictions --survival
  brainseg app                                                  # the web page, http://127.0.0.1:8501
  dvc metrics show                                              # test-set and survival figures
"""
