"""The survival stage where data.csv cannot support it (imported volumes often come without outcomes):
the reason in words (pure, a table), `brainseg survival --skip-unsupported` writing cv.json and
metrics.json that say so (no score, no model, no stale report left), the same reason as a refusal
without the flag, `brainseg features --oof --skip-unsupported` training no fold segmenter for a model
that cannot be fitted, and `register` naming it instead of registering a survival model. The real sample
through `brainseg run` is in tests/scans/test_import_volumes.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from brainseg.outcome.cv import survival_unsupported
from brainseg.outcome.workflow import write_skipped_survival
from brainseg.pipeline import workflows
from brainseg.settings.config import validate_settings
from conftest import make_project
from helpers import invoke_flat, project_files

PATIENTS = ["P1", "P2", "P3", "P4"]
TOO_FEW = "the cross-validation needs at least 2 patients of each death01 class"


def clinical(death01: dict | None) -> pd.DataFrame:
    """data.csv as read_clinical gives it: indexed by Patient, death01 only where given (None: no column)."""
    table = pd.DataFrame({"Patient": PATIENTS + ["other"], "gender": 1}).set_index("Patient")
    return table if death01 is None else table.assign(death01=pd.Series(death01, dtype=float))


@pytest.mark.parametrize("death01, reason", [
    ("no file", "d.csv not found: no death01 for the 4 patients"),
    (None, "d.csv has no death01 for the 4 patients"),
    ({"other": 1}, "d.csv has no death01 for the 4 patients"),  # only for patients that were not imaged
    ({"P1": 0, "P2": 0, "P3": 0, "P4": 0}, f"d.csv: death01 = 1 for 0 of 4 patients (4 with 0): {TOO_FEW}"),
    ({"P1": 1, "P2": 0, "P3": 0, "P4": 0}, f"d.csv: death01 = 1 for 1 of 4 patients (3 with 0): {TOO_FEW}"),
    ({"P1": 1, "P2": 1, "P3": 0, "P4": np.nan},
     f"d.csv: death01 = 1 for 2 of 3 patients (1 with 0): {TOO_FEW} (1 of the 4 patients have no death01)"),
    ({"P1": 1, "P2": 1, "P3": 0, "P4": 0}, None),  # 2 of each: the CV runs (its folds drop to 2)
    ({"P1": 2, "P2": 0, "P3": 0, "P4": 0}, None),  # not 0/1: refused by the survival workflow, not skipped
])
def test_why_data_csv_cannot_support_the_survival_cv(death01, reason):
    table = None if death01 == "no file" else clinical(death01)
    assert survival_unsupported(table, PATIENTS, "d.csv") == reason


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project whose features name 3 imported patients; data.csv as an import without --clinical writes it."""
    root = project_files(tmp_path / "project")
    monkeypatch.chdir(root)
    data = root / "data/raw/kaggle_3m"
    data.mkdir(parents=True)
    (data / "data.csv").write_text("Patient\nTCGA_IM_0001\nTCGA_IM_0002\nTCGA_IM_0003\n")
    (root / "features").mkdir()
    pd.DataFrame({"patient": ["TCGA_IM_0001", "TCGA_IM_0002", "TCGA_IM_0003"], "tumor_volume_px": [10, 20, 30]}
                 ).to_csv(root / "features/patients.csv", index=False)
    return root


def test_the_survival_stage_without_death01_says_why_and_writes_no_figure(project):
    out = project / "reports/survival"
    out.mkdir(parents=True)
    for stale in ("comparison.csv", "importances.csv", "coefficients.csv"):  # an earlier dataset's reports
        (out / stale).write_text("x\n")
    reason = "data/raw/kaggle_3m/data.csv has no death01 for the 3 patients"
    args = ("survival", "--features", "features/patients.csv", "--out", out)
    code, output = invoke_flat(*args)
    assert code == 2 and output == f"error: {reason}"  # asked for by hand: the same reason, refused
    code, output = invoke_flat(*args, "--skip-unsupported")
    assert code == 0 and output == f"survival: skipped: {reason} -> {out / 'cv.json'}"  # one line
    assert json.loads((out / "cv.json").read_text()) == {"skipped": True, "reason": reason}
    assert json.loads((out / "metrics.json").read_text()) == {"survival_skipped": True}
    assert sorted(p.name for p in out.iterdir()) == ["cv.json", "metrics.json"]


def test_one_death_among_the_patients_is_skipped_with_the_counts(project, tmp_path):
    (tmp_path / "clinical.csv").write_text("Patient,death01\nTCGA_IM_0001,1\nTCGA_IM_0002,0\nTCGA_IM_0003,0\n")
    code, output = invoke_flat("survival", "--features", "features/patients.csv", "--out", "reports/survival",
                               "--clinical", tmp_path / "clinical.csv", "--skip-unsupported")
    assert code == 0 and output == (f"survival: skipped: {tmp_path / 'clinical.csv'}: death01 = 1 for 1 of 3 "
                                    f"patients (2 with 0): {TOO_FEW} -> reports/survival/cv.json")


def test_features_oof_trains_no_fold_segmenter_for_data_without_death01(tmp_path, monkeypatch):
    """The pipeline's features stage on data without outcomes: one line, no training (the fold
    segmenters serve only the death01 model), the stage's four outputs naming the patients without
    features; the survival stage then skips on the same reason, and survival asked for by hand on
    these tables names them. Without --oof the flag is refused."""
    import brainseg.outcome.workflow as workflow

    project = make_project(tmp_path / "p", patients=6, slices=4, size=32)
    monkeypatch.chdir(project)
    data_csv = project / "data/raw/kaggle_3m/data.csv"
    patients = pd.read_csv(data_csv)["Patient"].tolist()
    pd.DataFrame({"Patient": patients}).to_csv(data_csv, index=False)  # an import without --clinical
    for args in (("data", "manifest"), ("data", "split", "--set", "split.folds=3")):
        assert invoke_flat(*args)[0] == 0

    def no_training(*args, **kwargs):
        raise AssertionError("a fold segmenter was trained")

    monkeypatch.setattr(workflow, "oof_masks", no_training)
    reason = f"data/raw/kaggle_3m/data.csv has no death01 for the {len(patients)} patients"
    code, output = invoke_flat("features", "--oof", "--skip-unsupported", "--out", "reports/features",
                               "--set", "split.folds=3")
    assert code == 0 and output == (f"features --oof: skipped: {reason}; no fold segmenter trained (they serve only "
                                    f"the death01 model); reports/features/ names the {len(patients)} patients "
                                    "without features (`brainseg features --truth` or `--model URI` gives features)")
    out = project / "reports/features"
    assert sorted(p.name for p in out.iterdir()) == ["folds.csv", "patients.csv", "slices.csv", "source.json"]
    assert sorted(pd.read_csv(out / "patients.csv")["patient"]) == sorted(patients)
    assert list(pd.read_csv(out / "slices.csv").columns) == ["patient", "slice"]
    assert len(pd.read_csv(out / "slices.csv")) == 4 * len(patients) and pd.read_csv(out / "folds.csv").empty
    source = json.loads((out / "source.json").read_text())
    assert source["skipped"] is True and source["reason"] == reason and source["features_from"] == "skipped"
    code, output = invoke_flat("survival", "--features", out / "patients.csv", "--out", "reports/survival",
                               "--skip-unsupported")
    assert code == 0 and output.startswith(f"survival: skipped: {reason} -> ")
    code, output = invoke_flat("survival", "--features", out / "patients.csv", "--out", "reports/by-hand")
    assert code == 2 and output == f"error: {reason}"
    outcomes = tmp_path / "clinical.csv"  # outcomes that arrive later: the skipped tables are stale, and say so
    pd.DataFrame({"Patient": patients, "death01": [0, 1] * (len(patients) // 2)}).to_csv(outcomes, index=False)
    code, output = invoke_flat("survival", "--features", out / "patients.csv", "--out", "reports/by-hand",
                               "--clinical", outcomes)
    assert code == 2 and output == (f"error: {out / 'patients.csv'}: holds no features: `brainseg features --oof "
                                    f"--skip-unsupported` skipped them ({reason}); run `brainseg features --oof` again")
    code, output = invoke_flat("features", "--truth", "--skip-unsupported", "--out", "reports/t")
    assert code == 2 and output == "error: --skip-unsupported goes with --oof (the features made for the death01 model)"


@pytest.mark.parametrize("champion_data", [None, "v-this-data", "v-other-data-0123456789"])
def test_register_registers_no_survival_model_and_says_why(tmp_path, monkeypatch, champion_data):
    """No survival model for this data; a survival champion of other data stays, and is named as such."""
    from types import SimpleNamespace

    from brainseg.registry import promotion

    monkeypatch.setattr(workflows, "register_segmenter", lambda *a, **k: {"name": "seg", "version": "1",
                                                                          "promoted": None, "decision": "seg v1"})
    monkeypatch.setattr(workflows.DataContext, "from_settings",
                        staticmethod(lambda settings: SimpleNamespace(version="v-this-data")))
    champion = None if champion_data is None else SimpleNamespace(version="4", tags={"data_version": champion_data})
    monkeypatch.setattr(promotion.model_registry, "champion", lambda name: champion)
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"best_run_id": "r1", "best_model_uri": "models:/m-1"}))
    write_skipped_survival(tmp_path / "survival", "data.csv has no death01 for the 3 patients")
    lines = []
    settings = validate_settings({"register": {"promote": False, "survival_name": "brainseg-survival"}})
    results = workflows.register_models(settings, tune_summary=tune,
                                        survival_summary=tmp_path / "survival/cv.json", echo=lines.append)
    expected = ["seg v1", "survival: not registered: data.csv has no death01 for the 3 patients"]
    if champion_data == "v-other-data-0123456789":
        expected.append("survival: brainseg-survival@champion (version 4) stays, fitted on other data (v-other-data; "
                        "this data is v-this-data): it was not made from these patients")
    assert lines == expected
    assert list(results) == ["segmenter"]  # nothing for the promotion gate to put through


def test_the_next_steps_offer_no_survival_model_when_its_stage_was_skipped(tmp_path):
    from brainseg.pipeline.run_pipeline import FINAL_WORDS, final_words

    report = tmp_path / "survival/cv.json"
    assert final_words(report) == FINAL_WORDS and "brainseg-survival@champion" in FINAL_WORDS  # no report: all
    write_skipped_survival(report.parent, "data.csv has no death01 for the 3 patients")
    words = final_words(report)
    assert "survival" not in words.replace("(no survival model: ", "")
    assert words.endswith("(no survival model: data.csv has no death01 for the 3 patients)\n")
    assert "models:/brainseg-segmenter@champion" in words and "brainseg app" in words
