"""Model cards (pure markdown from dicts), run descriptions, and the glue that logs them to MLflow."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from brainseg.registry import model_registry, modelcard
from brainseg.tracking import mlflow_runs, run_notes
from conftest import Tracking

VAL = {"patient_dice_mean": 0.8123, "patient_dice_median": 0.85, "n_patients": 12,
       "tumor_slice_dice_mean": 0.7, "n_tumor_slices": 140, "empty_slice_fp_rate": 0.05, "n_empty_slices": 300}
TEST = {"patient_dice_mean": 0.79, "patient_dice_median": 0.81, "n_patients": 13,
        "tumor_slice_dice_mean": 0.66, "n_tumor_slices": 150, "empty_slice_fp_rate": 0.07, "n_empty_slices": 310}

BOUNDARY = {"hd95_median": 4.2, "n_patients_hd95": 11, "nsd_mean": 0.71, "nsd_tolerance": 2.0, "distances_in_mm": 0.0,
            "lesion_detection_rate": 0.8, "lesions_true": 15, "false_lesions_per_patient": 0.5, "n_patient_volumes": 13}


def segmenter_info(**changes) -> dict:
    info = {"name": "brainseg-segmenter", "version": "4", "run_id": "r" * 32,
            "data": {"version": "0123456789abcdef", "synthetic": False,
                     "patients": {"train": 62, "val": 13, "test": 13}},
            "recipe": {"arch": "unet", "encoder": "resnet18", "size": 128, "channels": "all", "loss": "1 x dice",
                       "epochs": 40, "best_epoch": 31, "epochs_run": 40, "inference": {"threshold": 0.5}},
            "val": VAL, "test": TEST,
            "misses": [{"patient": "TCGA_A", "volume_dice": 0.12, "tumor_slices": 4},
                       {"patient": "TCGA_B", "volume_dice": 0.4, "tumor_slices": 9}]}
    return {**info, **changes}


def test_segmenter_card_states_data_recipe_figures_misses_and_limits():
    card = modelcard.segmenter_card(segmenter_info())
    assert card.startswith("# Model card: brainseg-segmenter v4")
    for text in ("## Intended use", "`0123456789abcdef`", "real (TCGA-LGG", "train 62, val 13, test 13",
                 "unet / encoder resnet18, all channels at 128 px", "Loss: 1 x dice", "best 31 of 40",
                 "| Per-patient volume Dice, mean | 0.812 (n=12) | 0.790 (n=13) |",
                 "| Empty-slice false-positive rate | 0.050 (n=300) | 0.070 (n=310) |",
                 "used in no decision", "- TCGA_A: volume Dice 0.120, 4 tumor slices",
                 "areas and volumes are in pixels", "Research use only"):
        assert text in card, text
    assert card.index("TCGA_A") < card.index("TCGA_B")


@pytest.mark.parametrize("changes, present, absent", [
    ({"data": {"version": "abc", "synthetic": True}}, ["**SYNTHETIC**", "Patients (split by patient, never by "
                                                        "slice): not recorded"], ["real (TCGA"]),
    ({"data": {"version": "abc", "synthetic": None}}, ["unknown whether real or synthetic"], ["**SYNTHETIC**"]),
    ({"test": {}}, ["| Per-patient volume Dice, mean | 0.812 (n=12) | not reported |", "no test report"],
     ["used in no decision"]),
    ({"misses": []}, ["No per-patient validation results were recorded."], ["Largest misses"]),
    ({"recipe": {"arch": "plain_unet", "size": 64}}, ["64 px (a smoke-test size)"], []),
    # an encoder the architecture does not have is not named (the cpu recipe carries one for unet)
    ({"recipe": {"arch": "plain_unet", "encoder": "resnet18", "size": 128, "channels": "all"}},
     ["- Architecture: plain_unet, all channels at 128 px"], ["encoder", "resnet18"]),
    ({"val": {"patient_dice_mean": float("nan"), "n_patients": 0}},
     ["| Per-patient volume Dice, mean | n/a (n=0)"], []),
    ({"recipe": {"arch": "plain_unet", "compute": {"budget_minutes": "45.0", "budget_planned_steps": 5000.0,
                                                   "actual_steps": 4980.0, "slices_seen": 79680.0,
                                                   "slices_per_s": 30.1, "train_minutes": 44.1}}},
     ["- Compute: budget 45 min, 4980 of 5000 planned steps, 79680 slices seen at 30.1 slices/s (44.1 min"], []),
    ({"recipe": {"arch": "unet", "compute": {"budget_minutes": "None", "actual_steps": 600.0, "slices_seen": 9600.0,
                                             "slices_per_s": 20.0, "train_minutes": 8.0}}},
     ["- Compute: no budget (epochs), 600 steps, 9600 slices seen"], ["planned steps"]),
    ({"recipe": {"arch": "unet"}}, [], ["- Compute:"]),
    ({}, [], ["HD95", "Surface Dice", "Lesions found"]),  # a run without boundary figures: no rows for them
    ({"val": {**VAL, **BOUNDARY}}, ["| HD95 (voxels), median | 4.200 (n=11) | n/a",
                                    "| Surface Dice at 2 voxels, mean | 0.710 (n=12) |",
                                    "| Lesions found | 0.800 (n=15) |", "| False lesions per patient | 0.500 (n=13) |"],
     []),
    ({"val": {**VAL, **BOUNDARY, "distances_in_mm": 1.0, "nsd_tolerance": 1.5}},
     ["| HD95 (mm), median |", "| Surface Dice at 1.5 mm, mean |"], ["voxels"]),
])
def test_segmenter_card_variants(changes, present, absent):
    card = modelcard.segmenter_card(segmenter_info(**changes))
    for text in present:
        assert text in card, text
    for text in absent:
        assert text not in card, text


SURVIVAL_FAILURES = {"threshold": 0.35, "worst_folds": [{"repeat": 1, "fold": 2, "roc_auc": 0.31}],
                     "misses": [{"patient": "TCGA_X", "death01": 0, "probability": 0.93},
                                {"patient": "TCGA_Y", "death01": 1, "probability": 0.08}]}


def test_survival_card_shows_cv_figures_and_says_when_fitted_on_synthetic_data():
    info = {"name": "brainseg-survival", "version": "2", "run_id": "s" * 32, "classifier": "logreg",
            "feature_set": "both", "features_from": "oof_predicted", "data_version": "fedcba9876543210",
            "fitted_on": "synthetic", "patients": 20, "positives": 7,
            "cv": {"roc_auc_mean": 0.61, "roc_auc_low": 0.4, "roc_auc_high": 0.8, "balanced_accuracy_mean": 0.55,
                   "brier_mean": 0.24, "baseline_brier": 0.23, "folds": 3, "repeats": 2}}
    card = modelcard.survival_card(info)
    for text in ("v2", "**SYNTHETIC**", "20 (7 with death01 = 1)", "oof_predicted masks", "logreg on both",
                 "2 x 3-fold", "| ROC-AUC | 0.610 (0.40-0.80)", "(prevalence-only: 0.230)", "never for clinical"):
        assert text in card, text
    assert "real (TCGA" in modelcard.survival_card({**info, "fitted_on": "real"})


@pytest.mark.parametrize("failures, present, absent", [
    (SURVIVAL_FAILURES, ["- repeat 1, fold 2: ROC-AUC 0.310", "threshold 0.350",
                         "- TCGA_X: death01 = 0, predicted probability 0.930"], ["No out-of-fold"]),
    ({**SURVIVAL_FAILURES, "misses": []}, ["ROC-AUC 0.310", "No patient was misclassified"], ["TCGA_X"]),
    ({}, ["No out-of-fold results were recorded."], ["Weakest", "Misclassified"]),
])
def test_survival_card_lists_failure_modes_seen(failures, present, absent):
    card = modelcard.survival_card({"name": "s", "version": "1", "failures": failures})
    section = card.split("## Failure modes seen", 1)[1].split("## Limits", 1)[0]
    for text in present:
        assert text in section, text
    for text in absent:
        assert text not in section, text
    if failures.get("misses"):
        assert section.index("TCGA_X") < section.index("TCGA_Y")  # largest error first


def test_survival_failures_are_the_lowest_auc_folds_and_the_most_confident_misses():
    folds = pd.DataFrame({"repeat": [0, 0, 0, 1, 1, 1], "roc_auc": [0.8, 0.3, 0.9, 0.6, float("nan"), 0.3]})
    prob = pd.Series({"a": 0.9, "b": 0.5, "c": 0.1, "d": 0.39, "e": 0.7})
    truth = pd.Series({"e": 1, "d": 1, "c": 1, "b": 0, "a": 0})  # another order than prob
    f = modelcard.survival_failures(folds, prob, truth, threshold=0.4, n=3, n_folds=2)
    assert f["worst_folds"] == [{"repeat": 0, "fold": 1, "roc_auc": 0.3}, {"repeat": 1, "fold": 2, "roc_auc": 0.3}]
    # misclassified at 0.4, error |probability - death01|: a 0.9, c 0.9, d 0.61, b 0.5; e is right
    assert [(m["patient"], m["death01"]) for m in f["misses"]] == [("a", 0), ("c", 1), ("d", 1)]
    assert f["threshold"] == 0.4 and json.loads(json.dumps(f)) == f


def test_lowest_dice_patients_skips_patients_without_tumor_and_sorts_lowest_first():
    table = pd.DataFrame({"patient": ["a", "b", "c", "d"], "volume_dice": [0.9, float("nan"), 0.2, 0.5],
                          "tumor_slices": [3, 0, 5, 2], "fp": [0, 1, 2, 3]})
    assert modelcard.lowest_dice_patients(table, 2) == [{"patient": "c", "volume_dice": 0.2, "tumor_slices": 5},
                                                        {"patient": "d", "volume_dice": 0.5, "tumor_slices": 2}]
    assert modelcard.lowest_dice_patients(None) == []


@pytest.mark.parametrize("facts, expected", [
    ({"data": {"version": "v1", "synthetic": True}, "val": {"patient_dice_mean": 0.5, "n_patients": 3},
      "recipe": {"size": 64}},
     {"card.data_version": "v1", "card.data_kind": "synthetic", "card.val_patient_dice_mean": "0.5000",
      "card.val_n_patients": "3", "card.size": "64"}),
    ({"data_version": "v2", "fitted_on": "real", "cv": {"roc_auc_mean": 0.6}},
     {"card.data_version": "v2", "card.data_kind": "real", "card.cv_roc_auc_mean": "0.6000"}),
    ({"data": {"version": "v3", "synthetic": None}}, {"card.data_version": "v3", "card.data_kind": ""}),
])
def test_card_tags(facts, expected):
    assert modelcard.card_tags(facts) == expected


def test_a_long_card_is_cut_to_mlflows_description_limit_with_a_pointer():
    long = "\n".join(f"line {i} " + "x" * 80 for i in range(200))
    cut = modelcard.description(long)
    assert len(cut) <= modelcard.DESCRIPTION_LIMIT and cut.endswith(f"the full card is {modelcard.CARD_FILE})\n")
    assert modelcard.description("short") == "short"
    with_lead = modelcard.description(long, "Registered text.")
    assert len(with_lead) <= modelcard.DESCRIPTION_LIMIT and with_lead.startswith("Registered text.\n\nline 0 ")


@pytest.mark.parametrize("lead, expected", [
    ("", "# Model card: m v2\nbody"),
    ("Segmenter of X.", "Segmenter of X.\n\n# Model card: m v2\nbody"),
    ("Segmenter of X.\n\n# Model card: m v1\nold body", "Segmenter of X.\n\n# Model card: m v2\nbody"),
])
def test_description_is_the_short_text_then_the_card_never_two_cards(lead, expected):
    assert modelcard.description("# Model card: m v2\nbody", lead) == expected


@pytest.mark.parametrize("name, tags, expected", [
    ("train-unet-resnet18", {"data_version": "0123456789abcdef", "profile": "cpu"},
     ["Training of one segmenter (unet-resnet18)", "Data version `0123456789ab`; profile `cpu`."]),
    ("trial-007", {"data_version": "x"}, ["Optuna tuning trial 007", "`best_val_patient_dice`", "Data version `x`."]),
    ("refit-trial-003", {}, ["refit of the best tuning trial (003)", "Data version `unknown`."]),
    ("logreg/both", {"features_from": "truth", "fitted_on": "synthetic", "data_version": "d"},
     ["death01 survival model run logreg/both (imaging features from truth masks)", "Data version `d` (synthetic)"]),
    ("survival-final", {"features_from": "oof_predicted", "fitted_on": "real", "data_version": "d"},
     ["Final death01 survival model", "`survival.final`", "oof_predicted masks", "Data version `d` (real)"]),
    ("something", {}, ["Run something."]),
])
def test_run_note_says_what_the_run_is_its_data_and_profile(name, tags, expected):
    note = run_notes.run_note(name, tags)
    for text in expected:
        assert text in note, text


# ------------------------------------------------------------------------------- MLflow glue
def test_training_runs_get_a_description_and_cards_reach_the_version(tmp_path):
    with Tracking(tmp_path / "mlflow.db"):
        mlflow.set_experiment("cards")
        with mlflow_runs.run("train-unet-resnet18", {"data_version": "0123456789abcdef", "profile": "smoke"}) as r:
            mlflow.log_metrics({"best_val_patient_dice": 0.7, "val_patient_dice_mean": 0.75, "val_n_patients": 3,
                                "best_epoch": 2, "epochs_run": 4, "test_patient_dice_mean": 0.6})
            mlflow.log_params({"arch": "unet", "encoder": "resnet18", "size": 64, "channels": "flair",
                               "epochs": 4, "loss_weights": json.dumps({"bce": 0.5, "dice": 1.0}),
                               "inference.tta": True})
            mlflow_runs.log_table(pd.DataFrame({"patient": ["p1", "p2"], "volume_dice": [0.9, 0.3],
                                             "tumor_slices": [4, 2]}), "val_per_patient_metrics.csv")
            mlflow.log_text("weights", "model/weights.txt")
        run_id = r.info.run_id
        client = mlflow.MlflowClient()
        assert "Training of one segmenter" in client.get_run(run_id).data.tags[run_notes.NOTE_TAG]
        client.create_registered_model("seg")
        mv = client.create_model_version("seg", f"runs:/{run_id}/model", run_id=run_id, description="Short text.")
        card = model_registry.document_segmenter("seg", mv.version, run_id)
        assert "0.5 x bce + 1 x dice" in card and "- p2: volume Dice 0.300, 2 tumor slices" in card
        assert "| Per-patient volume Dice, mean | 0.750 (n=3) | 0.600" in card
        stored = client.get_model_version("seg", mv.version)
        assert stored.description == f"Short text.\n\n{card}"
        assert model_registry.document_segmenter("seg", mv.version, run_id) == card  # documented again: one card
        assert client.get_model_version("seg", mv.version).description == f"Short text.\n\n{card}"
        assert stored.tags["card.val_patient_dice_mean"] == "0.7500" and stored.tags["card.size"] == "64"
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=modelcard.CARD_FILE)
        assert open(local).read() == card
        facts = mlflow.artifacts.load_dict(f"runs:/{run_id}/{modelcard.FACTS_FILE}")
        assert facts["misses"][0]["patient"] == "p2" and facts["recipe"]["inference"] == {"tta": "True"}
