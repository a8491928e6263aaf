"""The fold comparison of training variants (issue 24: levers validation cannot separate)."""

from __future__ import annotations

import pandas as pd
import pytest

from brainseg.bench import folds
from conftest import make_project


def test_variants_are_compared_on_the_same_folds_and_never_see_test_patients(tmp_path, monkeypatch):
    import brainseg.training.train
    from brainseg.settings.config import load_settings, validate_settings

    root = make_project(tmp_path / "p", patients=12, slices=4, size=32)
    monkeypatch.chdir(root)
    settings = validate_settings(load_settings("smoke", []))
    seen = []

    def fake_train(cfg, tr, va, verbose=0):  # records what each run trains and scores on
        seen.append((cfg.base_filters, cfg.budget_minutes, set(tr.patients), set(va.patients)))
        score = 0.5 + 0.01 * cfg.base_filters + 0.001 * len(seen)
        return brainseg.training.train.TrainResult(None, {}, 0, score, 1, {"slices_seen": 16})

    monkeypatch.setattr(brainseg.training.train, "train", fake_train)
    table = folds.compare(settings, {"narrow": [], "wide": ["train.base_filters=16"]}, 0.5, echo=lambda *_: None)
    split = pd.read_csv("data/processed/split.csv")
    test = set(split.loc[split.subset == "test", "patient"])
    pool = set(split.loc[split.subset != "test", "patient"])
    assert test and all(not (tr | va) & test for _, _, tr, va in seen)  # test patients never read
    by_fold = {}
    for (filters, budget, tr, va), fold in zip(seen, table["fold"]):
        assert budget == 0.5 and not tr & va and tr | va == pool
        by_fold.setdefault(fold, []).append((filters, frozenset(va)))
    assert all(len({va for _, va in runs}) == 1 and sorted(f for f, _ in runs) == [8, 16]
               for runs in by_fold.values())  # paired: both variants score the same patients
    summary = folds.paired_summary(table, "narrow")
    wide = summary.set_index("variant").loc["wide"]
    assert wide["diff_vs_ref"] == pytest.approx(0.08, abs=0.01) and wide["folds_won"] == wide["folds"] == len(by_fold)
