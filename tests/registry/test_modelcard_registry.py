"""Model cards on the real registration path: ``promotion.register_segmenter`` / ``register_survival``
leave the card in the source run, below the short text in the version description, and as
``card.*`` version tags (what the page's provenance line reads)."""

import json
from functools import partial
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from brainseg.data.context import DataContext
from brainseg.outcome import workflow
from brainseg.outcome.cv import permutation_importances
from brainseg.registry import modelcard, promotion
from brainseg.settings.config import load_settings, validate_settings
from helpers import invoke


def _settings() -> dict:
    return validate_settings(load_settings("smoke", ["register.segmenter_name=seg-card",
                                                     "register.survival_name=surv-card"]))


def _card_of(run_id: str) -> str:
    assert modelcard.CARD_FILE in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{modelcard.CARD_FILE}")


def _description_is_short_text_then_card(description: str, short: str, card: str, heading: str) -> None:
    lead = description.split("\n\n" + modelcard.CARD_HEADING, 1)[0]
    assert lead.startswith(short) and card.startswith(heading)
    assert description == modelcard.description(card, lead) == f"{lead}\n\n{card}"


def test_registering_a_segmenter_documents_it(in_project):
    settings = _settings()
    ctx = DataContext.from_settings(settings)
    run_id = json.loads(Path("reports/tune.json").read_text())["best_run_id"]
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    out = promotion.register_segmenter(settings, ctx, run_id, logged[0].model_uri)
    mv = client.get_model_version("seg-card", out["version"])
    card = _card_of(run_id)
    _description_is_short_text_then_card(mv.description, "Segmenter of LGG FLAIR abnormality",
                                         card, f"# Model card: seg-card v{out['version']}")
    split = pd.read_csv("data/processed/split.csv")
    counts = ", ".join(f"{s} {(split.subset == s).sum()}" for s in ("train", "val", "test"))
    assert f"Patients (split by patient, never by slice): {counts}" in card
    assert "**SYNTHETIC**" in card and f"`{ctx.version}`" in card
    assert mv.tags["card.data_kind"] == "synthetic" and mv.tags["card.data_version"] == ctx.version
    assert mv.tags["card.size"] == run.data.params["size"]
    assert float(mv.tags["card.val_patient_dice_mean"]) == pytest.approx(run.data.metrics["val_patient_dice_mean"],
                                                                         abs=1e-4)
    assert mv.tags["card.val_n_patients"] == str((split.subset == "val").sum())
    # registry tags name their split: every Dice figure says val (never a bare or test score)
    dice_tags = [t for t in mv.tags if "dice" in t]
    assert dice_tags and all("val" in t for t in dice_tags), dice_tags
    promotion.register_segmenter(settings, ctx, run_id, logged[0].model_uri)  # again: still one card
    assert client.get_model_version("seg-card", out["version"]).description.count(modelcard.CARD_HEADING) == 1


def test_registering_the_survival_model_documents_it(in_project, monkeypatch):
    # permutation importance is most of a survival run's time and plays no part in the card
    monkeypatch.setattr(workflow, "permutation_importances", partial(permutation_importances, n_repeats=1))
    done = invoke("features", "--truth", "--out", "reports/card-features")
    assert done.exit_code == 0, done.output
    done = invoke("survival", "--features", "reports/card-features/patients.csv", "--out", "reports/card-survival",
                  "--set", "survival.classifiers=[logreg]", "--set", "survival.feature_sets=[both]",
                  "--set", "survival.folds=3", "--set", "survival.repeats=1")
    assert done.exit_code == 0, done.output
    summary = json.loads(Path("reports/card-survival/cv.json").read_text())
    out = promotion.register_survival(_settings(), summary)
    mv = mlflow.MlflowClient().get_model_version("surv-card", out["version"])
    card = _card_of(summary["final_run_id"])
    _description_is_short_text_then_card(mv.description, "death01 classifier (logreg, both features",
                                         card, f"# Model card: surv-card v{out['version']}")
    assert f"Patients: {summary['patients']} ({summary['positives']} with death01 = 1)" in card
    assert "**SYNTHETIC**" in card and "truth masks" in card and "## Failure modes seen" in card
    worst = summary["failures"]["worst_folds"][0]
    assert f"- repeat {worst['repeat']}, fold {worst['fold']}: ROC-AUC" in card
    for miss in summary["failures"]["misses"]:
        assert f"- {miss['patient']}: death01 = {miss['death01']}" in card
    assert mv.tags["card.data_kind"] == "synthetic" and mv.tags["card.data_version"] == summary["data_version"]
    assert float(mv.tags["card.cv_roc_auc_mean"]) == pytest.approx(summary["final"]["roc_auc_mean"], abs=1e-4)
