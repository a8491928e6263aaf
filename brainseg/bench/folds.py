"""Two or more training variants compared on the folds of the training and validation patients.

Issue 24's rule for levers the 13 validation patients cannot separate: compare them on the 5 folds
of the non-test patients at a cheaper fidelity (a shorter budget). Fold ``k`` of the split's
``fold`` column, restricted to the train and val patients, is scored by a model trained on the
other folds; every variant sees the same folds and the same budget, so the comparison is paired.
The score is the best epoch's per-patient Dice at network size on fold ``k`` (the epoch chosen on
that fold too: optimistic for every variant alike, a ranking device, not a figure to quote as a
result). Test patients are never read.

    python -m brainseg.bench.folds --budget 2.5m --profile cpu \\
        --variant C= --variant F=train.base_filters=32

prints one row per fold and variant, each variant's mean over folds and the paired differences.
No MLflow run is made: this is a benchmark that prints figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from brainseg.data.context import DataContext
from brainseg.settings.config import Settings, Train, load_settings, validate_settings
from brainseg.settings.settings_io import apply_overrides
from brainseg.training.budget import parse_budget


def fold_patients(split: pd.DataFrame) -> list[tuple[int, list[str], list[str]]]:
    """[(fold, training patients, scored patients)] over the split's train and val patients only.

    >>> s = pd.DataFrame({"patient": list("abcde"), "subset": ["train", "train", "val", "test", "train"],
    ...                   "fold": [0, 1, 0, 1, 1]})
    >>> fold_patients(s)
    [(0, ['b', 'e'], ['a', 'c']), (1, ['a', 'c'], ['b', 'e'])]
    """
    pool = split[split["subset"].isin(["train", "val"])]
    out = []
    for k in sorted(int(f) for f in pool["fold"].unique()):
        inside = pool["fold"] == k
        patients = pool["patient"].astype(str)
        out.append((k, sorted(patients[~inside]), sorted(patients[inside])))
    return out


def paired_summary(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per variant: mean and sd of the fold scores, and against ``reference`` the mean paired
    difference, its sd and the folds won.

    >>> t = pd.DataFrame({"fold": [0, 0, 1, 1], "variant": ["a", "b", "a", "b"], "dice": [0.8, 0.7, 0.9, 0.85]})
    >>> s = paired_summary(t, "a").set_index("variant")
    >>> s.loc["b", ["mean", "diff_vs_ref", "folds_won"]].round(3).tolist()
    [0.775, -0.075, 0.0]
    """
    wide = table.pivot(index="fold", columns="variant", values="dice")
    rows = []
    for name in wide.columns:
        d = wide[name] - wide[reference]
        rows.append({"variant": name, "mean": wide[name].mean(), "sd": wide[name].std(ddof=1),
                     "diff_vs_ref": d.mean(), "diff_sd": d.std(ddof=1), "folds_won": int((d > 0).sum()),
                     "folds": int(d.notna().sum())})
    return pd.DataFrame(rows)


def compare(settings: Settings, variants: dict[str, list[str]], budget_minutes: float, echo=print) -> pd.DataFrame:
    """Train every variant (``--set`` overrides on ``settings``) on every fold; one row per run."""
    from brainseg.training.train import train

    ctx = DataContext.from_settings(settings, echo=echo)
    rows = []
    for k, train_p, score_p in fold_patients(ctx.split):
        for name, overrides in variants.items():
            s = validate_settings(apply_overrides(settings.as_dict(), overrides))
            cfg = Train.from_dict({**s.train.model_dump(), "budget_minutes": budget_minutes})
            fold_split = ctx.split.assign(subset=np.where(ctx.split["patient"].astype(str).isin(score_p), "val",
                                                          np.where(ctx.split["patient"].astype(str).isin(train_p),
                                                                   "train", "unused")))
            fold_ctx = DataContext(ctx.root, ctx.manifest, fold_split, ctx.version, ctx.cache_dir)
            start = time.monotonic()
            result = train(cfg, fold_ctx.arrays("train", cfg), fold_ctx.arrays("val", cfg), verbose=0)
            b = result.budget
            rows.append({"fold": k, "variant": name, "dice": result.best_value, "best_epoch": result.best_epoch + 1,
                         "slices_seen": b.get("slices_seen"), "minutes": (time.monotonic() - start) / 60,
                         "train_patients": len(train_p), "scored_patients": len(score_p)})
            echo(f"fold {k} {name}: per-patient Dice {result.best_value:.3f} (best epoch {result.best_epoch + 1}, "
                 f"{b.get('slices_seen')} slices, {rows[-1]['minutes']:.1f} min)")
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m brainseg.bench.folds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="2.5m", help="training budget of each run (e.g. 2.5m)")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every variant")
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=KEY=VALUE[,KEY=VALUE...] (NAME= alone: the settings as they are); "
                         "the first is the reference")
    args = ap.parse_args(argv)
    variants = {}
    for v in args.variant:
        name, _, rest = v.partition("=")
        variants[name] = [o for o in rest.split(",") if o]
    settings = validate_settings(load_settings(args.profile, args.sets))
    table = compare(settings, variants, parse_budget(args.budget))
    print(table.round(3).to_string(index=False))
    print(paired_summary(table, next(iter(variants))).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
