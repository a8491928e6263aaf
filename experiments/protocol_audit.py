"""What the seed article's 0.95 Dice measures: one recipe, two protocols, each model scored both ways.

    python experiments/protocol_audit.py --budget 6m [--data PATH] [--profile cpu] [--seed 0] [--out audit.json]
    python experiments/protocol_audit.py --profile smoke --epochs 1 --steps 2      # a smoke run, no budget

(a) the seed's protocol: slices drawn at random into train/val/test (a patient's slices on every side),
    as many slices per subset as the patient split gives; the epoch chosen on (a)'s own validation slices.
(b) the platform's protocol: the patient split (`data.split`, as `brainseg data split` builds it; with
    --data, built in memory by the same function from that folder).
Both train the profile's recipe (`train` settings, `--budget` minutes of wall clock each) and predict
at the original size with the network's threshold alone (no TTA, no post-processing: the same path
for both). Each model is scored on its own test slices by both metrics: the smoothed per-slice Dice
over all slices (empty prediction on an empty slice = 1) and the per-patient volume Dice (patients
with tumor only). The slices in both test sets ((a)'s test slices of (b)'s test patients) are scored
for both models: the same slices, seen-patient against unseen-patient, is the leak alone.
Prints a Markdown table (docs/numbers.md, "What the seed's 0.95 measures"); --out writes the figures.
"""

from __future__ import annotations

import brainseg.settings.keras_env  # noqa: F401  (Keras variables before TensorFlow)

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg.data.arrays import Arrays, load_arrays, load_full_images, load_full_masks
from brainseg.data.context import DataContext, build_split
from brainseg.data.manifest import scan
from brainseg.data.split import SUBSETS
from brainseg.evaluation.evaluate import score
from brainseg.inference.segmenter import InferenceSettings, Segmenter
from brainseg.settings.config import Settings, Train, load_settings, validate_settings
from brainseg.settings.settings_io import ConfigError
from brainseg.training.budget import BudgetError, parse_budget
from brainseg.training.train import train

FIGURES = ("smoothed_slice_dice_all", "baseline_empty_smoothed_slice_dice_all", "patient_dice_mean",
           "patient_dice_median", "patient_dice_ci_low", "patient_dice_ci_high", "n_patients",
           "n_patients_empty_truth", "tumor_slice_dice_mean", "n_tumor_slices", "empty_slice_fp_rate",
           "n_empty_slices", "n_slices")


def patient_level_split(manifest: pd.DataFrame, patient_split: pd.DataFrame) -> np.ndarray:
    """The subset of each manifest row under the patient split (columns patient, subset)."""
    subset = dict(zip(patient_split["patient"], patient_split["subset"]))
    missing = sorted(set(manifest["patient"]) - set(subset))
    if missing:
        raise ValueError(f"split: patient {missing[0]} of the manifest is not in the split ({len(missing)} missing)")
    return manifest["patient"].map(subset).to_numpy(object)


def slice_level_split(manifest: pd.DataFrame, patient_split: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """The seed's split: each manifest row's subset drawn at random over slices, with exactly as many
    slices per subset as the patient split gives (so both protocols train on as many slices)."""
    by_patient = patient_level_split(manifest, patient_split)
    counts = [int((by_patient == s).sum()) for s in SUBSETS]
    out = np.empty(len(manifest), object)
    out[rng.permutation(len(manifest))] = np.repeat(np.array(SUBSETS, object), counts)
    return out


def patients_on_both_sides(manifest: pd.DataFrame, subsets: np.ndarray) -> int:
    """How many patients have slices both in train and in test."""
    patients = manifest["patient"].to_numpy()
    return len(set(patients[subsets == "train"]) & set(patients[subsets == "test"]))


def figures(manifest: pd.DataFrame, rows: np.ndarray, masks: dict, truths: dict) -> dict:
    """Both metrics (and the all-empty predictor's smoothed Dice) of ``masks`` on manifest ``rows``:
    ``masks`` and ``truths`` map a row to its (H, W) bool mask at the original size."""
    ev = score(manifest.iloc[rows].reset_index(drop=True), [masks[i] for i in rows], [truths[i] for i in rows],
               boundary=False).metrics()
    return {k: ev[k] for k in FIGURES}


def train_and_segment(cfg: Train, inference: InferenceSettings, data: tuple, subsets: np.ndarray,
                      images: dict, verbose: int = 2) -> tuple[dict, dict]:
    """Train on ``subsets == "train"`` (epoch chosen on ``"val"``), segment the ``"test"`` rows.
    ``data`` = (manifest, X, Y). Returns ({row: final mask}, the run's facts)."""
    manifest, X, Y = data

    def arrays(name: str) -> Arrays:
        idx = np.flatnonzero(subsets == name)
        return Arrays(np.asarray(X[idx]), np.asarray(Y[idx]), manifest["patient"].iloc[idx].tolist())

    result = train(cfg, arrays("train"), arrays("val"), verbose=verbose)
    test = np.flatnonzero(subsets == "test")
    masks = Segmenter(result.model, cfg, inference).segment(
        [images[i] for i in test], groups=manifest["patient"].iloc[test].tolist()).masks
    facts = {**{f"{s}_slices": int((subsets == s).sum()) for s in SUBSETS},
             "patients_in_train_and_test": patients_on_both_sides(manifest, subsets),
             "epochs_run": result.epochs_run, "best_epoch": result.best_epoch + 1,
             "val_patient_dice": result.best_value,
             **{k: result.budget.get(k) for k in ("slices_seen", "slices_per_s", "train_minutes")}}
    return dict(zip(test.tolist(), masks)), facts


def markdown(table: list[dict]) -> str:
    def f(x):
        return "-" if x is None or x != x else f"{x:.3f}"
    lines = ["| model | scored on | slices (tumor / empty) | smoothed per-slice Dice, empty = 1 (all-empty "
             "predictor) | per-patient Dice mean / median [95% CI] (patients) | Dice on tumor slices | "
             "FP rate on empty slices |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        lines.append(f"| {r['model']} | {r['scored_on']} | {r['n_slices']} ({r['n_tumor_slices']} / "
                     f"{r['n_empty_slices']}) | {f(r['smoothed_slice_dice_all'])} "
                     f"({f(r['baseline_empty_smoothed_slice_dice_all'])}) | {f(r['patient_dice_mean'])} / "
                     f"{f(r['patient_dice_median'])} [{f(r['patient_dice_ci_low'])}, {f(r['patient_dice_ci_high'])}]"
                     f" ({r['n_patients']}) | {f(r['tumor_slice_dice_mean'])} | {f(r['empty_slice_fp_rate'])} |")
    return "\n".join(lines)


def gaps(table: list[dict]) -> dict:
    """The seed's figure against the platform's, and the two parts of the difference (rows as run_audit's)."""
    own_a, own_b, shared_a, shared_b = table
    smooth, patient = "smoothed_slice_dice_all", "patient_dice_mean"
    return {"seed_minus_platform": own_a[smooth] - own_b[patient],
            "metric_on_platform_model": own_b[smooth] - own_b[patient],
            "leak_smoothed_on_shared_slices": shared_a[smooth] - shared_b[smooth],
            "leak_per_patient_on_shared_slices": shared_a[patient] - shared_b[patient]}


def cpu_model() -> str:
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown CPU'} ({os.cpu_count()} cores)"


def minutes(text: str) -> float:
    """``6m``, ``0.3m``, ``90s``, ``1h`` or ``6`` (minutes) -> minutes, for argparse."""
    try:
        return parse_budget(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_data(args, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, patient split): of --data (split built in memory as `brainseg data split` builds it), or
    of the project's `data` settings (manifest and split built first when missing, as every command does)."""
    if args.data is None:
        ctx = DataContext.from_settings(settings)
        return ctx.manifest, ctx.split
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    found = scan(Path(args.data))
    if not found.ok:
        raise ValueError(f"{args.data}: {len(found.problems)} problem(s), e.g. {found.problems[0]}")
    return found.manifest, build_split(found.manifest, settings.split)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=minutes, default=6.0, help="wall-clock training budget of each run (6m)")
    p.add_argument("--data", help="a dataset folder (kaggle_3m layout); default: the project's data settings")
    p.add_argument("--profile", default="cpu", help="the profile whose train settings both runs use (cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the slice-level split and of both trainings")
    p.add_argument("--epochs", type=int, help="train this many epochs instead of a budget (smoke runs)")
    p.add_argument("--steps", type=int, help="steps per epoch with --epochs")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    return p.parse_args(argv)


def run_audit(cfg: Train, inference: InferenceSettings, manifest: pd.DataFrame, patient_split: pd.DataFrame,
              rng: np.random.Generator, cache_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """Train both protocols and score each model both ways. Returns (each run's facts, the table's rows)."""
    protocols = {"(a) slice-level split": slice_level_split(manifest, patient_split, rng),
                 "(b) patient-level split": patient_level_split(manifest, patient_split)}
    tested = sorted(set().union(*(np.flatnonzero(s == "test").tolist() for s in protocols.values())))
    images = dict(zip(tested, load_full_images(manifest.iloc[tested])))
    truths = dict(zip(tested, load_full_masks(manifest.iloc[tested])))
    X, Y = load_arrays(manifest, cfg.prep, cache_dir=cache_dir)
    masks, runs = {}, {}
    for name, subsets in protocols.items():
        length = f"{cfg.budget_minutes:g} min" if cfg.budget_minutes else f"{cfg.epochs} epoch(s)"
        print(f"training {name}: {length}", file=sys.stderr)
        masks[name], runs[name] = train_and_segment(cfg, inference, (manifest, X, Y), subsets, images)
    (a, sa), (b, sb) = protocols.items()
    own_a, own_b = np.flatnonzero(sa == "test"), np.flatnonzero(sb == "test")
    shared = np.flatnonzero((sa == "test") & (sb == "test"))  # (a)'s test slices of (b)'s test patients
    scored = [(a, "its test slices", own_a), (b, "its test patients", own_b),
              (a, "the shared slices", shared), (b, "the shared slices", shared)]
    return runs, [{"model": m, "scored_on": on, **figures(manifest, rows, masks[m], truths)} for m, on, rows in scored]


def report(runs: dict, table: list[dict], header: str) -> str:
    """What the audit prints: the header (CPU, data, time), each run's facts, the table, the two gaps."""
    lines = [header]
    for name, r in runs.items():
        lines.append(f"{name}: train / val / test slices {r['train_slices']} / {r['val_slices']} / {r['test_slices']}, "
                     f"{r['patients_in_train_and_test']} patient(s) in train and test; {r['epochs_run']} epoch(s) "
                     f"(kept {r['best_epoch']}, val per-patient Dice {r['val_patient_dice']:.3f}); "
                     f"{r['slices_seen']} slices seen at {r['slices_per_s'] or 0:.1f}/s "
                     f"in {r['train_minutes'] or 0:.1f} min")
    g = gaps(table)
    return "\n".join([*lines, "", markdown(table), "",
                      f"the seed's figure ((a) smoothed per-slice) - the platform's ((b) per-patient mean): "
                      f"{g['seed_minus_platform']:+.3f}",
                      f"  the metric alone (model (b) on its test patients, smoothed - per-patient): "
                      f"{g['metric_on_platform_model']:+.3f}",
                      f"  the leak alone (the same {table[2]['n_slices']} shared slices, model (a) - model (b)): "
                      f"smoothed {g['leak_smoothed_on_shared_slices']:+.3f}, per-patient "
                      f"{g['leak_per_patient_on_shared_slices']:+.3f}"])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sized = ({"budget_minutes": None, "epochs": args.epochs, "steps_per_epoch": args.steps} if args.epochs
                 else {"budget_minutes": args.budget})
        settings = validate_settings(load_settings(profile=args.profile)).with_changes(
            train={**sized, "seed": args.seed})
        cfg, ev = settings.train, settings.evaluate
        inference = InferenceSettings(threshold=cfg.threshold, batch_size=ev.batch_size or 32,
                                      precision=ev.precision or "float32")
        manifest, patient_split = load_data(args, settings)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"protocol_audit: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    cache = settings.data.cache_dir
    started, load = time.time(), os.getloadavg()
    try:
        runs, table = run_audit(cfg, inference, manifest, patient_split, np.random.default_rng(args.seed),
                                Path(cache) if cache else None)
    except BudgetError as exc:  # a budget that cannot hold one epoch on this machine
        print(f"protocol_audit: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print("\n" + report(runs, table, f"CPU: {cpu_model()}; load average {load[0]:.1f} at the start, "
                        f"{os.getloadavg()[0]:.1f} at the end; {len(manifest)} slices of "
                        f"{manifest['patient'].nunique()} patients; profile {args.profile}, seed {args.seed}; "
                        f"{(time.time() - started) / 60:.1f} min in all"))
    if args.out:  # written whole, then renamed: never a half-written file
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cpu": cpu_model(), "profile": args.profile, "seed": args.seed,
                                   "budget_minutes": cfg.budget_minutes, "runs": runs, "table": table,
                                   "gaps": gaps(table)}, indent=2))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
