"""Where a run comes from and how the process ends it, without MLflow: the lineage tags, the
``mlflow run`` run a command executes under, SIGTERM, and MLflow's HTTP settings for a last call
to a server that stopped answering. :mod:`brainseg.tracking.mlflow_runs` uses these.
"""

from __future__ import annotations

import contextlib
import os

from brainseg.data.version import git_commit

PIPELINE_TAG = "brainseg.pipeline_run"  # shared by every run of one pipeline execution
PIPELINE_ENV = "BRAINSEG_PIPELINE_RUN"
PROJECT_ENV = "BRAINSEG_PROJECT_RUN"  # the `mlflow run` run this command executes under, if any
CHOSEN_ON_TAG = "inference_chosen_on"  # "val" when TTA and post-processing were chosen on val patients


def adopt_project_run() -> None:
    """Under ``mlflow run``, MLflow hands the command its run through ``MLFLOW_RUN_ID``; every
    ``start_run`` would then resume that one run. Take it out of the environment (subprocesses
    included) and nest this command's runs under it instead."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        os.environ[PROJECT_ENV] = run_id


def lineage_tags(version: str, profile: str | None = None) -> dict[str, str]:
    tags = {"data_version": version, "git_commit": git_commit(), "profile": profile or ""}
    if os.environ.get(PIPELINE_ENV):
        tags[PIPELINE_TAG] = os.environ[PIPELINE_ENV]
    if os.environ.get(PROJECT_ENV):
        tags["brainseg.project_run"] = os.environ[PROJECT_ENV]
    return tags


class Terminated(BaseException):
    """The process got SIGTERM (``brainseg.cli.main`` raises it where the process is): like Ctrl-C,
    open runs end KILLED, and the command exits 143."""


@contextlib.contextmanager
def quick_http():
    """MLflow's HTTP calls without retries and with a short timeout, for a last call to a lost server."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
