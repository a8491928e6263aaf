"""Registry: versions with lineage tags, challenger/champion aliases, idempotent registration."""

import json
import re

import mlflow
import pytest

from brainseg.registry import decide
from conftest import invoke


@pytest.mark.parametrize("champion_version,champion_score,score,force,promoted,reason", [
    (None, None, 0.1, False, True, "first version"),
    ("1", 0.5, 0.6, False, True, "beats the champion"),
    ("1", 0.5, 0.4, False, False, "does not beat"),
    ("1", 0.5, 0.5, False, False, "does not beat"),  # a tie keeps the champion
    ("1", 0.5, 0.4, True, True, "--force"),
    ("2", 0.5, 0.5, False, True, "already the champion"),
])
def test_promotion_rule(champion_version, champion_score, score, force, promoted, reason):
    d = decide("m", "2", score, champion_version, champion_score, force)
    assert d.promoted is promoted and reason in d.reason
    assert f"{score:.4f}" in d.line()


def test_register_makes_champions_and_is_idempotent(in_project):
    result = invoke("register", "--tune", "reports/tune.json", "--survival", "missing.json",
                    "--out", "reports/register-test.json")
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient()
    summary = json.loads(open("reports/tune.json").read())
    champ = client.get_model_version_by_alias("brainseg-segmenter", "champion")
    assert champ.run_id == summary["best_run_id"] or champ.tags["source_run_id"] == summary["best_run_id"]
    for tag in ("data_version", "git_commit", "study", "trial", "best_val_patient_dice"):
        assert champ.tags.get(tag), tag
    assert "Segmenter of LGG FLAIR abnormality" in champ.description
    assert "challenger scores" in result.output and "-> champion" in result.output
    versions = len(client.search_model_versions("name='brainseg-segmenter'"))
    again = invoke("register", "--tune", "reports/tune.json", "--survival", "missing.json",
                   "--out", "reports/register-test.json")
    assert again.exit_code == 0, again.output
    assert len(client.search_model_versions("name='brainseg-segmenter'")) == versions  # no new version
    assert json.loads(open("reports/register-test.json").read())["segmenter"]["created"] is False
    decisions = mlflow.search_runs(experiment_names=["brainseg"], filter_string="tags.model_name = 'brainseg-segmenter'")
    assert "decision" in decisions.columns[decisions.columns.str.startswith("tags.")].str.replace("tags.", "").tolist()


def test_a_challenger_takes_the_champion_alias_only_if_it_scores_higher(in_project):
    summary = json.loads(open("reports/tune.json").read())
    client = mlflow.MlflowClient()
    first = invoke("register", "--run", summary["best_run_id"], "--survival", "missing.json", "--out", "reports/r1.json")
    assert first.exit_code == 0, first.output
    champion_before = client.get_model_version_by_alias("brainseg-segmenter", "champion").version
    weak = invoke("train", "--profile", "smoke", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=1",
                  "--verbose", "0")
    assert weak.exit_code == 0, weak.output
    weak_run = weak.output.split("run ", 1)[1].split(":", 1)[0].strip()
    second = invoke("register", "--run", weak_run, "--survival", "missing.json", "--out", "reports/r2.json")
    assert second.exit_code == 0, second.output
    decision = json.loads(open("reports/r2.json").read())["segmenter"]
    scores = [float(x) for x in re.findall(r"scores (\d\.\d+)", decision["decision"])]
    challenger, champion = scores[0], scores[1]
    champion_after = client.get_model_version_by_alias("brainseg-segmenter", "champion").version
    assert decision["promoted"] is (challenger > champion)
    if decision["promoted"]:
        assert champion_after == decision["version"]
    else:
        assert champion_after == champion_before
        assert client.get_model_version_by_alias("brainseg-segmenter", "challenger").version == decision["version"]


def test_registering_a_run_without_a_model_is_a_clear_error(in_project):
    runs = mlflow.search_runs(experiment_names=["brainseg"], filter_string="tags.state = 'PRUNED'")
    run_id = runs["run_id"].iloc[0] if len(runs) else mlflow.search_runs(
        experiment_names=["brainseg"], filter_string="tags.mlflow.runName LIKE 'study-%'")["run_id"].iloc[0]
    result = invoke("register", "--run", run_id)
    assert result.exit_code == 2
    assert "has no logged model" in result.output


def test_register_without_a_tuning_summary_is_a_clear_error(in_project, tmp_path):
    result = invoke("register", "--tune", str(tmp_path / "none.json"))
    assert result.exit_code == 2
    assert "no tuning summary" in result.output
