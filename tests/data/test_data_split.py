"""Patient-level split: disjoint, complete, proportional, stratified, seed-deterministic."""

import numpy as np
import pandas as pd
import pytest

from brainseg.data.split import patients_in, split_patients, strata

# 40 patients in about the real data's proportions (DU, HT, CS, FG, one EZ), burden spread out
COUNTS = {"DU": 16, "HT": 12, "CS": 6, "FG": 5, "EZ": 1}


def patients_frame() -> pd.DataFrame:
    rows = []
    for inst, n in COUNTS.items():
        for i in range(n):
            rows.append({"patient": f"TCGA_{inst}_{i:04d}", "institution": inst,
                         "tumor_px": (i * 7919 + len(rows) * 104729) % 50000})
    return pd.DataFrame(rows)


PATIENTS = patients_frame()
N = len(PATIENTS)
KW = dict(val_fraction=0.15, test_fraction=0.15, folds=5, burden_bins=3)


def split(seed: int = 0, **kw) -> pd.DataFrame:
    return split_patients(PATIENTS, seed=seed, **(KW | kw))


@pytest.mark.parametrize("seed", range(5))
def test_every_patient_in_exactly_one_subset_and_one_fold(seed):
    s = split(seed)
    assert sorted(s["patient"]) == sorted(PATIENTS["patient"])
    assert not s["patient"].duplicated().any()
    assert set(s["subset"]) == {"train", "val", "test"}
    assert s["fold"].between(0, 4).all()
    sides = [set(patients_in(s, name)) for name in ("train", "val", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert set().union(*sides) == set(PATIENTS["patient"])


@pytest.mark.parametrize("seed", range(5))
def test_fractions_roughly_respected(seed):
    counts = split(seed)["subset"].value_counts()
    assert abs(counts["test"] - 0.15 * N) <= 1
    assert abs(counts["val"] - 0.15 * N) <= 1
    assert counts["train"] == N - counts["test"] - counts["val"]


@pytest.mark.parametrize("seed", range(5))
def test_folds_balanced(seed):
    sizes = split(seed)["fold"].value_counts()
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1


def test_seed_deterministic():
    pd.testing.assert_frame_equal(split(7), split(7))


def test_different_seeds_differ():
    a, b = split(1), split(2)
    assert not (a["subset"].equals(b["subset"]) and a["fold"].equals(b["fold"]))


@pytest.mark.parametrize("seed", range(10))
def test_stratified_by_institution(seed):
    s = split(seed).merge(PATIENTS, on="patient")
    for inst, n in COUNTS.items():
        subsets = s.loc[s["institution"] == inst, "subset"]
        if n >= 4:
            assert (subsets == "train").any(), inst
        # each subset gets each institution about in proportion (systematic picks over the strata)
        for name, fraction in (("test", 0.15), ("val", 0.15)):
            assert (subsets == name).sum() <= np.ceil(fraction * n) + 1, (inst, name)


def test_small_sets_still_get_val_and_test():
    s = split_patients(PATIENTS.head(3), seed=0, **KW)
    assert sorted(s["subset"]) == ["test", "train", "val"]


def test_strata_combine_institution_and_burden_bin():
    df = pd.DataFrame({"institution": ["DU"] * 3 + ["HT"] * 3,
                       "tumor_px": [10, 20, 30, 30, 20, 10]})
    assert strata(df, 3).tolist() == ["DU/0", "DU/1", "DU/2", "HT/2", "HT/1", "HT/0"]
    assert strata(df, 1).tolist() == ["DU/0"] * 3 + ["HT/0"] * 3


@pytest.mark.parametrize("kw, message", [
    (dict(val_fraction=0.5, test_fraction=0.5), "sum below 1"),
    (dict(val_fraction=-0.1), r"\[0, 1\)"),
    (dict(test_fraction=1.0), r"\[0, 1\)"),
])
def test_bad_fractions_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        split(0, **kw)


def test_duplicate_patient_refused():
    with pytest.raises(ValueError, match="appears twice"):
        split_patients(pd.concat([PATIENTS, PATIENTS.head(1)]), seed=0, **KW)


def test_patients_in_subsets():
    s = split(0)
    assert patients_in(s, "all") == sorted(PATIENTS["patient"])
    assert patients_in(s, "train+val") == sorted(patients_in(s, "train") + patients_in(s, "val"))
    with pytest.raises(ValueError, match="unknown subset 'dev'"):
        patients_in(s, "dev")
