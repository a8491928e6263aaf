"""Every value a trial reports reaches the pruner: no two reports share a step (issue 34 item 8)."""

from __future__ import annotations

import warnings

import optuna
import pytest

from brainseg.tune.runs import trial_callbacks


@pytest.mark.parametrize("unit, elapsed_min, expected", [
    ("seconds", [0.5, 0.505, 0.51, 1.0], [30, 31, 32, 60]),   # three epochs within one second
    ("seconds", [0.1, 0.2, 0.3], [6, 12, 18]),                # apart: the seconds themselves
    ("epochs", [0.5, 0.505, 0.51], [1, 2, 3]),
])
def test_reports_reach_the_pruner_at_distinct_increasing_steps(monkeypatch, unit, elapsed_min, expected):
    monkeypatch.setattr("brainseg.tune.runs.mlflow_runs.active_run_id", lambda: "run")
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    (report,) = trial_callbacks(trial, unit=unit)
    report.on_train_begin()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns when a value is reported at a step already reported
        for epoch, minutes in enumerate(elapsed_min):
            report.on_epoch_end(epoch, {"val_patient_dice": 0.1 * (epoch + 1), "elapsed_min": minutes})
    steps = sorted(study.get_trials()[0].intermediate_values)
    assert steps == expected
