"""Finding runs by their tags (an MLflow door, beside :mod:`brainseg.tracking.mlflow_runs`).

A cross-validation's parent and fold runs find each other through tags, so that a resumed run, or
folds trained on other machines against one tracking server, are picked up where they are.
"""

from __future__ import annotations

import dataclasses

import mlflow


@dataclasses.dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    status: str
    start_time: int
    tags: dict
    params: dict
    metrics: dict


def _record(run) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or "", run.info.status, int(run.info.start_time or 0),
                     dict(run.data.tags), dict(run.data.params), dict(run.data.metrics))


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"a tag value with a quote cannot be searched: {value!r}")
    return f"'{value}'"


def runs_tagged(experiment_name: str, tags: dict[str, str], newest_first: bool = True) -> list[RunRecord]:
    """Runs of ``experiment_name`` carrying every tag of ``tags`` (all statuses, deleted ones excluded)."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    where = " and ".join(f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items())
    runs = mlflow.MlflowClient().search_runs([experiment.experiment_id], filter_string=where, max_results=1000,
                                             order_by=["attributes.start_time DESC" if newest_first
                                                       else "attributes.start_time ASC"])
    return [_record(r) for r in runs]


def run_record(run_id: str) -> RunRecord:
    """One run by id (MlflowException -> LookupError naming it)."""
    try:
        return _record(mlflow.MlflowClient().get_run(run_id))
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"run {run_id!r}: not found in the tracking store {mlflow.get_tracking_uri()}") from exc
