"""Tuning: the smoke study run twice on tiny synthetic data, with and without pruning."""

from __future__ import annotations

import time
from pathlib import Path

from brainseg.bench.server import experiment_in
from brainseg.data.context import DataContext
from brainseg.data.manifest import patients_table, scan
from brainseg.data.split import split_patients
from brainseg.data.synth import generate
from brainseg.settings.config import load_settings, validate_settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_file(relative: str) -> Path:
    """``relative`` in the working folder when it is there (a project), else in this checkout."""
    here = Path(relative)
    return here if here.is_file() else PROJECT_ROOT / relative


def tuning_comparison(workdir: Path, trials: int, epochs: int, pruner: str, seed: int = 0) -> dict:
    """The smoke study run twice on the same tiny synthetic data: with ``pruner`` and without."""
    import optuna

    from brainseg.tune.plan import plan_from_settings
    from brainseg.tune.session import run_study

    root = generate(workdir / "tune-data" / "kaggle_3m", patients=12, slices=12, size=64, seed=seed)
    manifest = scan(root).manifest
    split = split_patients(patients_table(manifest), val_fraction=0.25, test_fraction=0.15, folds=1, seed=seed)
    ctx = DataContext(root, manifest, split, "bench-synthetic", workdir / "tune-cache")
    out = {"trials": trials, "epochs_per_trial": epochs, "search_space": "experiments/search_space_smoke.yaml"}
    experiment_in("brainseg-bench-tune", workdir / "artifacts")  # run_study finds it by name
    for label, name in (("pruned", pruner), ("unpruned", "none")):
        storage = f"sqlite:///{workdir / f'optuna-{label}.db'}"
        settings = validate_settings(load_settings("smoke", [
            f"tune.search_space={project_file('experiments/search_space_smoke.yaml').resolve()}",
            f"tune.pruner={name}", f"tune.n_trials={trials}", f"tune.epochs={epochs}", f"tune.storage={storage}",
            f"tune.sampler_seed={seed}", f"train.patience={epochs}"],
            params_file=project_file("params.yaml"), profiles_file=project_file("experiments/profiles.yaml")))
        plan = plan_from_settings(settings, f"bench-{label}", storage, trials, 3600)
        t0 = time.monotonic()
        summary = run_study(plan, ctx, "brainseg-bench-tune")
        study = optuna.load_study(study_name=plan.study_name, storage=storage)
        states = [t.state.name for t in study.trials]
        out[label] = {"pruner": name, "best_val_dice": summary.get("best_value"),
                      "epochs_spent": sum(len(t.intermediate_values) for t in study.trials),
                      "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
                      "failed": states.count("FAIL"), "seconds": time.monotonic() - t0}
    full = out["unpruned"]["epochs_spent"] or 1
    out["epochs_saved_pct"] = 100 * (1 - out["pruned"]["epochs_spent"] / full)
    return out

