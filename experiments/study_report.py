"""Print a finished study as the docs show it: one row per trial (state, value, seconds of training
reached, wall minutes, parameters), the best value by trial number, the plan, and the refit.

    python experiments/study_report.py reports/tune.json [sqlite:///optuna.db]

Reads the summary `brainseg tune` wrote, the Optuna storage and the MLflow tracking store
(`MLFLOW_TRACKING_URI`); changes nothing.
"""

from __future__ import annotations

import json
import sys

import mlflow
import optuna


def main(summary_path: str, storage: str = "sqlite:///optuna.db") -> None:
    summary = json.load(open(summary_path))
    study = optuna.load_study(study_name=summary["study"], storage=storage)
    plan = study.user_attrs.get("trial_plan", {})
    if plan:
        print(f"plan: trials of {plan['trial_s'] / 60:.1f} min of training, rungs at "
              + ", ".join(f"{r / 60:.1f}" for r in plan["rungs_s"]) + f" min; a trial epoch ~{plan['epoch_s']:.0f} s")
    print("| trial | state | val per-patient Dice | s of training reached | wall min | params |")
    print("| --- | --- | --- | --- | --- | --- |")
    best, by_number = None, []
    for t in study.trials:
        reached = max(t.intermediate_values, default=0)
        value = t.value if t.value is not None else t.intermediate_values.get(reached)
        wall = ((t.datetime_complete - t.datetime_start).total_seconds() / 60
                if t.datetime_complete and t.datetime_start else float("nan"))
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
        tag = " (hand-set)" if t.user_attrs.get("recipe") else ""
        print(f"| {t.number}{tag} | {t.state.name} | {value:.4f} | {reached} | {wall:.1f} | {params} |"
              if value is not None else f"| {t.number}{tag} | {t.state.name} | - | {reached} | {wall:.1f} | {params} |")
        if t.state == optuna.trial.TrialState.COMPLETE and (best is None or t.value > best):
            best = t.value
        by_number.append(f"{t.number}: {best:.4f}" if best is not None else f"{t.number}: -")
    print("best value by trial number (complete trials): " + "; ".join(by_number))
    refit = summary.get("refit")
    if refit:
        run = mlflow.MlflowClient().get_run(refit["run_id"])
        m = run.data.metrics
        print(f"refit of trial {refit['trial']} ({refit.get('budget_minutes')} min budget): "
              f"val {m.get('val_patient_dice_mean', float('nan')):.3f} / "
              f"{m.get('val_patient_dice_median', float('nan')):.3f}, "
              f"FP {m.get('val_empty_slice_fp_rate', float('nan')):.3f}; "
              f"test {m.get('test_patient_dice_mean', float('nan')):.3f} / "
              f"{m.get('test_patient_dice_median', float('nan')):.3f}, "
              f"FP {m.get('test_empty_slice_fp_rate', float('nan')):.3f} "
              f"(report only); {m.get('slices_seen', 0):.0f} slices at {m.get('slices_per_s', 0):.1f}/s; "
              f"version {(refit.get('registered') or {}).get('version')}")
    if "minutes" in summary:
        print(f"study time: {summary['minutes']:.1f} min")


if __name__ == "__main__":
    main(*sys.argv[1:])
