"""Patient-level split: train/val/test and k folds, stratified by institution and tumor burden."""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainseg.settings.config import Split

SUBSETS = ("train", "val", "test")


def _systematic(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean picks of about ``fraction * n`` items spread evenly over an ordered list."""
    if fraction <= 0 or n == 0:
        return np.zeros(n, bool)
    start = rng.random()
    pos = np.arange(n + 1) * fraction + start
    return np.floor(pos[1:]) != np.floor(pos[:-1])


def strata(patients: pd.DataFrame, burden_bins: int) -> pd.Series:
    """Stratum label per patient: institution x tumor-burden quantile bin."""
    ranks = patients["tumor_px"].rank(method="first")
    bins = min(burden_bins, len(patients)) or 1
    burden = pd.qcut(ranks, bins, labels=False) if bins > 1 else pd.Series(0, index=patients.index)
    return patients["institution"].astype(str) + "/" + burden.astype(int).astype(str)


def split_patients(patients: pd.DataFrame, *, val_fraction: float, test_fraction: float,
                   folds: int, seed: int, burden_bins: int = 3) -> pd.DataFrame:
    """Assign every patient to exactly one subset and one fold.

    ``patients`` has one row per patient with ``patient``, ``institution`` and ``tumor_px``.
    Patients are ordered by stratum (institution, burden bin), shuffled within it with ``seed``,
    then picked systematically, so each subset gets each stratum in proportion. With 3 or more
    patients val and test get at least one each. Returns columns patient, subset, fold, stratum.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError("split: val_fraction and test_fraction must be in [0, 1) and sum below 1")
    if patients["patient"].duplicated().any():
        raise ValueError("split: a patient appears twice in the patients table")
    rng = np.random.default_rng(seed)
    df = patients[["patient", "institution", "tumor_px"]].copy().reset_index(drop=True)
    df["stratum"] = strata(df, burden_bins)
    df["_u"] = rng.random(len(df))
    df = df.sort_values(["stratum", "_u"]).reset_index(drop=True)
    n = len(df)
    subset = np.array(["train"] * n, dtype=object)
    test = _systematic(n, test_fraction, rng)
    if n >= 3 and test_fraction > 0 and not test.any():
        test[rng.integers(n)] = True
    subset[test] = "test"
    rest = np.flatnonzero(~test)
    val = _systematic(len(rest), val_fraction / (1 - test_fraction), rng)
    if n >= 3 and val_fraction > 0 and not val.any():
        val[rng.integers(len(rest))] = True
    subset[rest[val]] = "val"
    df["subset"] = subset
    offset = int(rng.integers(max(folds, 1)))
    df["fold"] = (np.arange(n) + offset) % max(folds, 1)
    return df[["patient", "subset", "fold", "stratum"]].sort_values("patient").reset_index(drop=True)


def patients_in(split: pd.DataFrame, subset: str) -> list[str]:
    if subset == "all":
        return sorted(split["patient"])
    subsets = subset.split("+")
    unknown = set(subsets) - set(SUBSETS)
    if unknown:
        raise ValueError(f"unknown subset {subset!r}: use train, val, test, all or e.g. train+val")
    return sorted(split.loc[split["subset"].isin(subsets), "patient"])


def split_with(patients: pd.DataFrame, sp: Split) -> pd.DataFrame:
    """:func:`split_patients` of ``patients`` (``manifest.patients_table``) with the ``split`` settings."""
    return split_patients(patients, val_fraction=sp.val_fraction, test_fraction=sp.test_fraction, folds=sp.folds,
                          seed=sp.seed, burden_bins=sp.burden_bins)
