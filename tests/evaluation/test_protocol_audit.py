"""experiments/protocol_audit.py: the seed's slice-level split leaks patients, the platform's does not;
the smoothed per-slice Dice scores an empty/empty slice 1, the per-patient Dice leaves it out."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from helpers import PROJECT_ROOT, project_files

_spec = importlib.util.spec_from_file_location("protocol_audit", PROJECT_ROOT / "experiments" / "protocol_audit.py")
audit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(audit)

# 10 patients x 10 slices; 6 patients train, 2 val, 2 test
MANIFEST = pd.DataFrame({"patient": np.repeat([f"p{i}" for i in range(10)], 10),
                         "slice": np.tile(np.arange(1, 11), 10)})
PATIENT_SPLIT = pd.DataFrame({"patient": [f"p{i}" for i in range(10)],
                              "subset": ["train"] * 6 + ["val"] * 2 + ["test"] * 2})


def sides(subsets: np.ndarray) -> dict[str, set]:
    return {p: set(subsets[MANIFEST["patient"] == p]) for p in MANIFEST["patient"].unique()}


def test_the_slice_split_puts_a_patients_slices_on_both_sides_and_the_patient_split_does_not():
    by_patient = audit.patient_level_split(MANIFEST, PATIENT_SPLIT)
    by_slice = audit.slice_level_split(MANIFEST, PATIENT_SPLIT, np.random.default_rng(0))
    assert all(len(s) == 1 for s in sides(by_patient).values())
    assert audit.patients_on_both_sides(MANIFEST, by_patient) == 0
    assert audit.patients_on_both_sides(MANIFEST, by_slice) >= 5  # 20 test slices over 10 patients
    assert sum(len(s) > 1 for s in sides(by_slice).values()) >= 8
    for s in ("train", "val", "test"):  # the same proportions: as many slices per subset
        assert (by_slice == s).sum() == (by_patient == s).sum() == {"train": 60, "val": 20, "test": 20}[s]


def test_the_slice_split_is_the_seeds_generators():
    split = [audit.slice_level_split(MANIFEST, PATIENT_SPLIT, np.random.default_rng(seed)) for seed in (3, 3, 4)]
    assert (split[0] == split[1]).all() and not (split[0] == split[2]).all()


def test_a_patient_missing_from_the_split_is_named():
    with pytest.raises(ValueError, match="patient p9"):
        audit.patient_level_split(MANIFEST, PATIENT_SPLIT.iloc[:9])


def test_the_smoothed_slice_dice_counts_empty_empty_as_one_and_the_per_patient_dice_leaves_it_out():
    # patient a: a 4-px tumor half found (Dice 2*2/(2+4) = 2/3), then an empty slice left empty;
    # patient b: two empty slices left empty (no tumor: out of the per-patient mean, counted)
    manifest = pd.DataFrame({"patient": ["a", "a", "b", "b"], "patient_dir": ["a", "a", "b", "b"],
                             "slice": [1, 2, 1, 2], "image_path": ["x"] * 4})
    truth, pred, empty = np.zeros((4, 4), bool), np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    truth[0, :4], pred[0, :2] = True, True
    f = audit.figures(manifest, np.arange(4), dict(enumerate([pred, empty, empty, empty])),
                      dict(enumerate([truth, empty, empty, empty])))
    assert f["smoothed_slice_dice_all"] == pytest.approx((5 / 7 + 3) / 4)  # (2*2+1)/(2*2+2+2+1), then 1, 1, 1
    assert f["baseline_empty_smoothed_slice_dice_all"] == pytest.approx((1 / 5 + 3) / 4)
    assert f["patient_dice_mean"] == pytest.approx(2 / 3) and f["n_patients"] == 1
    assert f["n_patients_empty_truth"] == 1
    assert f["tumor_slice_dice_mean"] == pytest.approx(2 / 3) and f["n_tumor_slices"] == 1
    assert f["empty_slice_fp_rate"] == 0 and f["n_empty_slices"] == 3


@pytest.mark.parametrize("text, expected", [("6m", 6.0), ("0.3m", 0.3), ("90s", 1.5), ("6", 6.0), ("1h", 60.0)])
def test_budgets_read_in_minutes(text, expected):
    assert audit.minutes(text) == pytest.approx(expected)


def test_a_missing_dataset_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project_files(tmp_path))
    assert audit.main(["--data", str(tmp_path / "nowhere"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("protocol_audit: ") and "nowhere" in err and "\n" not in err


def test_a_tiny_audit_trains_both_protocols_and_scores_each_both_ways(tmp_path, monkeypatch, make_synth, capsys):
    data = make_synth(patients=10, slices=8, size=64, seed=2)
    monkeypatch.chdir(project_files(tmp_path / "project"))
    out = tmp_path / "audit.json"
    assert audit.main(["--profile", "smoke", "--epochs", "1", "--steps", "2", "--data", str(data),
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (a, ra), (b, rb) = doc["runs"].items()
    assert ra["patients_in_train_and_test"] > 0 and rb["patients_in_train_and_test"] == 0
    assert all(ra[k] == rb[k] for k in ("train_slices", "val_slices", "test_slices"))
    assert [(r["model"], r["scored_on"]) for r in doc["table"]] == [
        (a, "its test slices"), (b, "its test patients"), (a, "the shared slices"), (b, "the shared slices")]
    assert doc["table"][0]["n_slices"] == doc["table"][1]["n_slices"] == ra["test_slices"]
    assert doc["table"][2]["n_slices"] == doc["table"][3]["n_slices"] > 0
    assert "| (a) slice-level split | its test slices |" in capsys.readouterr().out
