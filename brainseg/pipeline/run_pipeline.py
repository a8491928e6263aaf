"""The whole pipeline in one command: the stages of dvc.yaml, through DVC or (without it) in order,
then the promotion gate for the versions the pipeline registered.

There is one definition of the pipeline, ``dvc.yaml``; ``brainseg run`` and ``mlflow run . -e main``
execute it with ``dvc repro`` (only what changed re-runs), or run its stage commands in order where
DVC cannot be used (no Git/DVC repository). Every MLflow run of one execution carries the tag
``brainseg.pipeline_run`` with the same id. The stages read params.yaml only; ``--profile NAME``
first copies that profile's values into params.yaml (:func:`brainseg.settings.profiles.use_profile`).
The register stage only registers and tags (``register.promote: false``), so ``dvc exp run``
changes nothing deployed; ``brainseg run`` then asks the gate (``brainseg promote``) unless
``--no-promote``.

One ``brainseg run`` at a time in a project folder: it holds the project's lock
(``.dvc/tmp/brainseg-run.lock``, beside DVC's own lock; ``.brainseg-run.lock`` without DVC) from its
first step (a profile written into params.yaml) to its last; a second one is refused at once
(:class:`PipelineBusy`, naming the first: pid, host, since when). The OS lets go of the lock when
its holder dies, however it dies.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import uuid
from pathlib import Path

import yaml

from brainseg.data.importer import dvc_available, ensure_dataset
from brainseg.settings import locks
from brainseg.settings.config import load_settings, validate_settings
from brainseg.settings.profiles import use_profile
from brainseg.settings.settings_io import ConfigError, read_yaml
from brainseg.tracking import mlflow_runs, run_context
from brainseg.tracking.run_context import PIPELINE_ENV, PIPELINE_TAG

DVC_FILE = Path("dvc.yaml")
PARAMS_FILE = Path("params.yaml")
REGISTER_REPORT = Path("reports/register.json")
SURVIVAL_REPORT = Path("reports/survival/cv.json")
PIPELINE_EXPERIMENT = "brainseg"  # where the pipeline's runs go (cli.common.EXPERIMENT)
LOCK_NAME = "brainseg-run.lock"


class PipelineBusy(ConfigError):
    """Another ``brainseg run`` is running in this project folder (a ConfigError: the command
    refuses it as it refuses bad input, one line and exit 2, before anything changed)."""


def project_lock(folder: Path = Path(".")):
    """This project's pipeline lock, held by the returned open file; :class:`PipelineBusy` naming
    the holder when another process has it."""
    dvc_tmp = folder / ".dvc"
    path = dvc_tmp / "tmp" / LOCK_NAME if dvc_tmp.is_dir() else folder / f".{LOCK_NAME}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return locks.acquire(path)
    except locks.Busy as exc:
        raise PipelineBusy(f"another `brainseg run` is running in this project: {locks.holder_line(exc.holder)}; "
                           f"one at a time (lock {path}): wait for it to finish, or stop it") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot take the project's pipeline lock ({exc.strerror or exc})") from None


def stage_commands(params: dict, dvc_file: Path = DVC_FILE) -> list[tuple[str, str]]:
    """(stage name, command) in file order, with ``${a.b}`` filled in from params.yaml."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]

    def fill(match: re.Match) -> str:
        node = params
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return [(name, re.sub(r"\$\{([^}]+)\}", fill, spec["cmd"])) for name, spec in stages.items()]


def run_all_stages(profile: str | None = None, use_dvc: bool = True, promote: bool = True, echo=print) -> str:
    """Make sure a dataset is there (synthetic by default) and under DVC, run the pipeline, then
    (``promote``) the promotion gate for what it registered, all under the project's lock
    (:func:`project_lock`); returns the pipeline run id."""
    held = project_lock()
    try:
        return _run_all_stages(profile, use_dvc, promote, echo)
    finally:
        held.close()


def _run_all_stages(profile: str | None, use_dvc: bool, promote: bool, echo) -> str:
    if profile:
        for key, old, new in use_profile(profile, PARAMS_FILE):
            echo(f"params.yaml: {key}: {old!r} -> {new!r} (profile {profile})")
    settings = validate_settings(load_settings())  # a bad params.yaml: one line before any stage
    use_dvc = use_dvc and dvc_available()
    try:
        echo(ensure_dataset(Path(settings.data.root), settings.data.synth.given(), use_dvc=use_dvc))
    except RuntimeError as exc:  # `dvc add` refused (DVC's own lock held by a dvc command run by hand)
        raise ConfigError(f"{' '.join(str(exc).split())[:400]}; nothing ran") from None
    run_id = uuid.uuid4().hex[:12]
    launcher, moved = claim_launcher(run_id, settings.profile)
    env = {**os.environ, PIPELINE_ENV: run_id}  # after the claim: the stages' runs nest under the launcher
    echo(f"pipeline run {run_id} (profile {settings.profile}; MLflow tag {PIPELINE_TAG}={run_id})")
    status = "FAILED"
    try:
        if use_dvc:
            subprocess.run(["dvc", "repro"], env=env, check=True)
        else:
            params = read_yaml(PARAMS_FILE)
            for name, cmd in stage_commands(params):
                echo(f"stage {name}: {cmd}")
                subprocess.run(shlex.split(cmd), env=env, check=True)
        if promote:
            for name, version in pending_promotions(REGISTER_REPORT):
                echo(f"promotion gate: brainseg promote {name} {version}")
                subprocess.run(["brainseg", "promote", name, str(version)], env=env, check=True)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if moved:  # `mlflow run` ends its own run in Default; the moved one is this command's to end
            mlflow_runs.terminate(launcher, status)
    return run_id


def claim_launcher(run_id: str, profile: str) -> tuple[str | None, bool]:
    """Under ``mlflow run . -e main``: the project run becomes the pipeline's run in ``brainseg``
    (moved there when ``mlflow run`` put it in Default, as ``-e tune`` does), so every stage's run
    is its child in one tree. Returns (its id or None, moved)."""
    project = os.environ.get(run_context.PROJECT_ENV)
    if not project or os.environ.get(PIPELINE_ENV):
        return None, False
    tags = {**run_context.lineage_tags("pipeline", profile), PIPELINE_TAG: run_id, "brainseg.role": "pipeline"}
    tags.pop("data_version", None)  # the stages record theirs; the pipeline may import new data
    return mlflow_runs.claim_project_run(project, PIPELINE_EXPERIMENT, f"pipeline-{run_id}", tags,
                                      {"profile": profile})


def pending_promotions(report: Path) -> list[tuple[str, str]]:
    """(model name, version) of each version the register stage registered but did not gate."""
    if not report.is_file():
        return []
    results = json.loads(report.read_text())
    return [(r["name"], str(r["version"])) for r in results.values() if r.get("promoted") is None]


FINAL_WORDS = """\
Done. Next:
  mlflow ui --backend-store-uri sqlite:///mlflow.db            # compare runs: http://127.0.0.1:5000
  mlflow models serve -m models:/brainseg-segmenter@champion --env-manager local -h 127.0.0.1 -p 5001
  mlflow models serve -m models:/brainseg-survival@champion --env-manager local -h 127.0.0.1 -p 5002
  brainseg predict data/raw/kaggle_3m --out predictions --survival
  brainseg app                                                  # the web page, http://127.0.0.1:8501
  dvc metrics show                                              # test report (test_*), survival CV figures
  dvc exp run -S survival.repeats=3                             # an experiment: registers, never moves @champion
"""


def final_words(survival_report: Path = SURVIVAL_REPORT) -> str:
    """:data:`FINAL_WORDS`, without the survival model's lines when the survival stage did not run (data
    with no usable death01: ``brainseg survival --skip-unsupported``), saying why instead."""
    try:
        skipped = json.loads(survival_report.read_text()) if survival_report.is_file() else {}
    except ValueError:
        skipped = {}
    if not skipped.get("skipped"):
        return FINAL_WORDS
    lines = [line.replace(", survival CV figures", "") for line in FINAL_WORDS.splitlines()
             if not any(word in line for word in ("brainseg-survival", "--survival", "survival."))]
    return "\n".join(lines) + f"\n(no survival model: {skipped.get('reason', 'the survival stage did not run')})\n"
