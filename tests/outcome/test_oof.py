"""Out-of-fold predicted masks: every patient is segmented by a model that never saw it, and
`brainseg features --oof` writes features marked ``oof_predicted`` (tiny synthetic data, 1-step models)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainseg.data import manifest
from brainseg.outcome.oof import fold_plan, oof_masks
from brainseg.settings.config import Train
from conftest import make_project
from helpers import invoke

pytestmark = pytest.mark.timeout(1200)  # TensorFlow on a shared 2-core machine

TINY = {"arch": "plain_unet", "base_filters": 4, "size": 32, "epochs": 1, "steps_per_epoch": 1, "batch_size": 4}


def test_fold_plan_tests_every_patient_once_and_never_trains_on_it():
    split = pd.DataFrame({"patient": [f"p{i}" for i in range(10)], "fold": [i % 5 for i in range(10)]})
    plan = fold_plan(split)
    assert [k for k, *_ in plan] == [0, 1, 2, 3, 4]
    assert sorted(p for *_, test in plan for p in test) == sorted(split["patient"])
    for k, train, val, test in plan:
        assert not set(train) & set(test) and not set(val) & set(test) and not set(train) & set(val)
        assert val == [f"p{(k + 1) % 5}", f"p{(k + 1) % 5 + 5}"]
        assert len(train) == 6


@pytest.mark.parametrize("split, message", [
    (pd.DataFrame({"patient": ["a", "b"]}), "no 'fold' column"),
    (pd.DataFrame({"patient": ["a", "b"], "fold": [0, 1]}), "at least 3 folds, the split has 2"),
])
def test_fold_plan_refuses(split, message):
    with pytest.raises(ValueError, match=message):
        fold_plan(split)


def test_each_patient_is_predicted_by_a_model_that_never_saw_it(make_synth, monkeypatch):
    import brainseg.training.train as train_module

    root = make_synth(patients=6, slices=4, size=32)
    m = manifest.scan(root).manifest
    split = pd.DataFrame({"patient": sorted(m["patient"].unique()), "fold": [0, 1, 2, 0, 1, 2]})
    seen = []
    real_train = train_module.train

    def spy(cfg, tr, va, **kwargs):
        seen.append(set(tr.patients) | set(va.patients))
        return real_train(cfg, tr, va, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    masks, reports = oof_masks(m, split, Train.from_dict(TINY))
    assert len(masks) == len(m) and all(mk.shape == (32, 32) and mk.dtype == bool for mk in masks)
    assert [r.test_patients for r in reports] == [2, 2, 2]
    for fitted_on, (_, _, _, test) in zip(seen, fold_plan(split)):
        assert fitted_on and not fitted_on & set(test)
    with pytest.raises(ValueError, match="not in the split"):
        oof_masks(m, split.iloc[1:], Train.from_dict(TINY))


def test_features_oof_command(tmp_path, monkeypatch):
    """The fold segmenters are trained (--skip-unsupported changes nothing where data.csv holds death01)."""
    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    monkeypatch.chdir(project)
    for args in (("data", "manifest"), ("data", "split", "--set", "split.folds=3")):
        assert invoke(*args).exit_code == 0
    tiny = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    done = invoke("features", "--oof", "--skip-unsupported", "--out", "reports/oof", "--set", "split.folds=3",
                  "--set", f"survival.oof.train={tiny}")
    assert done.exit_code == 0, done.output
    source = json.loads((project / "reports/oof/source.json").read_text())
    assert source["features_from"] == "oof_predicted" and source["synthetic"] is True
    assert [f["fold"] for f in source["folds"]] == [0, 1, 2]
    patients = pd.read_csv(project / "reports/oof/patients.csv")
    assert len(patients) == 6 and np.isfinite(patients["tumor_volume_px"]).all()
    refused = invoke("features", "elsewhere", "--oof", "--out", "x")
    assert refused.exit_code == 2 and "set data.root" in refused.output
