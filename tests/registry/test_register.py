"""Registry: every version registered and tagged by split; `@champion` moves only through the gate,
which compares challenger and champion on the validation patients, and only when asked."""

import json
import math

import mlflow
import pytest

from brainseg.registry.model_registry import decide, decide_preregistered
from brainseg.settings.config import Settings
from brainseg.tracking import run_metrics
from helpers import invoke

VAL = "val_patient_dice_mean"


@pytest.mark.parametrize("champion_version,champion_score,score,force,promoted,reason", [
    (None, None, 0.1, False, True, "first version"),
    ("1", 0.5, 0.6, False, True, "higher val_patient_dice_mean than the champion"),
    ("1", 0.5, 0.4, False, False, "not higher"),
    ("1", 0.5, 0.5, False, False, "not higher"),  # a tie keeps the champion
    ("1", 0.5, None, False, False, "no val_patient_dice_mean for the challenger"),
    ("1", 0.5, float("nan"), False, False, "no val_patient_dice_mean"),
    ("1", 0.5, 0.4, True, True, "--force"),
    ("2", 0.5, 0.5, False, True, "already the champion"),
])
def test_promotion_rule(champion_version, champion_score, score, force, promoted, reason):
    d = decide("m", "2", VAL, score, champion_version, champion_score, force)
    assert d.promoted is promoted and reason in d.reason
    assert VAL in d.line() and "score" not in " ".join(d.tags())
    assert d.tags()["gate_decision"] == ("promoted" if promoted else "not promoted")


@pytest.mark.parametrize("is_final,champion_version,force,promoted,reason", [
    (True, None, False, True, "pre-registered"),
    (True, "1", False, True, "not compared across versions"),  # a lower CV AUC does not block it
    (False, "1", False, False, "not the pre-registered"),
    (False, "1", True, True, "--force"),
    (False, "2", False, True, "already the champion"),
])
def test_survival_rule_never_compares_scores(is_final, champion_version, force, promoted, reason):
    d = decide_preregistered("s", "2", "cv_roc_auc_mean", 0.51, is_final, "(logreg, both)", champion_version, force)
    assert d.promoted is promoted and reason in d.reason and d.champion_score is None


def _score(name: str, version: str) -> float:
    return float(mlflow.MlflowClient().get_model_version(name, version).tags[VAL])


def _champion(name: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


def constant_run(settings: Settings) -> str:
    """A training-like run whose logged segmenter predicts no tumor anywhere (val Dice 0)."""
    import tempfile
    from pathlib import Path

    import tf_keras as keras

    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.tracking import mlflow_runs

    cfg = settings.train
    model = keras.Sequential([keras.layers.Input((cfg.size, cfg.size, cfg.prep.n_channels)),
                              keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="zeros",
                                                  bias_initializer=keras.initializers.Constant(-10.0))])
    mlflow.set_experiment("brainseg")
    with mlflow.start_run(run_name="constant-empty") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow_runs.log_params(run_metrics.train_config_params(cfg))
        save_model(model, cfg, InferenceSettings(threshold=cfg.threshold), Path(tmp))
        mlflow_runs.log_segmenter_model(Path(tmp))
    return run.info.run_id


def _register(name: str, *args: str):
    result = invoke("register", "--survival", "missing.json", "--out", f"reports/{name}.json",
                    "--set", f"register.segmenter_name={name}", *args)
    assert result.exit_code == 0, result.output
    return json.loads(open(f"reports/{name}.json").read())["segmenter"], result.output


def test_register_tags_the_version_by_split_and_moves_no_alias(in_project):
    name = "seg-tags"
    seg, output = _register(name, "--tune", "reports/tune.json")
    assert "not put through the gate" in output and seg["promoted"] is None
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, seg["version"])
    summary = json.loads(open("reports/tune.json").read())
    assert mv.tags["source_run_id"] == summary["best_run_id"]  # the trial that trained the network
    chosen = summary["postprocessing"]  # no refit: the trial's TTA and post-processing chosen on val
    assert mv.tags["inference_run_id"] == chosen["run_id"] and mv.tags["inference_chosen_on"] == "val"
    assert seg["inference"] == chosen["inference"] and seg["inference_chosen_on"] == "val"
    assert {k: mv.tags[f"inference.{k}"] for k in chosen["inference"]} == {
        k: str(v) for k, v in chosen["inference"].items()}
    assert 0.0 <= float(mv.tags[VAL]) <= 1.0 and math.isclose(float(mv.tags[VAL]), seg[VAL], abs_tol=1e-6)
    assert mv.tags["val_data_version"] == mv.tags["data_version"]
    for tag in ("git_commit", "study", "trial", "best_val_patient_dice", "best_epoch", "val_n_patients"):
        assert mv.tags.get(tag), tag
    assert not any("score" in t or t.startswith("test_") for t in mv.tags)
    assert client.get_registered_model(name).aliases == {}  # registering moves nothing
    evaluation = client.get_run(mv.tags["val_evaluation_run_id"])
    assert VAL in evaluation.data.metrics and not any(k.startswith("test_") for k in evaluation.data.metrics)
    again, _ = _register(name, "--tune", "reports/tune.json")
    assert again["created"] is False and again["version"] == seg["version"]
    assert len(client.search_model_versions(f"name='{name}'")) == 1


def test_the_gate_promotes_a_better_challenger_and_refuses_a_worse_one(in_project):
    from brainseg.settings.config import load_settings, validate_settings

    name = "seg-gate"
    settings = validate_settings(load_settings("smoke"))
    summary = json.loads(open("reports/tune.json").read())
    client = mlflow.MlflowClient()

    empty1, _ = _register(name, "--run", constant_run(settings), "--promote")
    assert empty1["promoted"] is True and "first version" in empty1["decision"]
    assert _champion(name) == empty1["version"] and _score(name, empty1["version"]) == 0.0

    better, _ = _register(name, "--run", summary["best_run_id"], "--promote")
    assert _score(name, better["version"]) > 0.0, "the tuned smoke model should find some tumor"
    assert better["promoted"] is True and _champion(name) == better["version"]

    worse, output = _register(name, "--run", constant_run(settings), "--promote")
    assert worse["promoted"] is False and "-> not promoted" in output
    assert _champion(name) == better["version"]  # the champion did not move
    assert str(client.get_model_version_by_alias(name, "challenger").version) == worse["version"]
    tags = client.get_model_version(name, worse["version"]).tags
    assert tags["gate_decision"] == "not promoted" and tags["gate_champion_version"] == better["version"]
    assert float(tags[f"gate_champion_{VAL}"]) == pytest.approx(_score(name, better["version"]), abs=1e-6)


def test_the_register_stage_alone_never_moves_an_existing_champion(in_project):
    """What `dvc repro` / `dvc exp run` run (dvc.yaml's register command, register.promote false):
    a better version is registered and tagged, the champion stays where it was."""
    import yaml

    from brainseg.settings.config import load_settings, validate_settings
    from helpers import PROJECT_ROOT

    stage = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["register"]["cmd"]
    assert "--promote" not in stage and "--force" not in stage
    name = "seg-exp-run"
    first, _ = _register(name, "--run", constant_run(validate_settings(load_settings("smoke"))), "--promote")
    assert _champion(name) == first["version"]
    args = stage.split()[2:]  # brainseg register --tune ... --survival ... --out ...
    args[args.index("--survival") + 1] = "missing.json"
    result = invoke("register", *args[:-2], "--out", f"reports/{name}.json", "--set", f"register.segmenter_name={name}")
    assert result.exit_code == 0, result.output
    seg = json.loads(open(f"reports/{name}.json").read())["segmenter"]
    assert seg["version"] != first["version"] and seg["promoted"] is None
    assert _score(name, seg["version"]) > _score(name, first["version"])  # better, yet not promoted
    assert _champion(name) == first["version"]
    assert set(mlflow.MlflowClient().get_registered_model(name).aliases) == {"champion"}


def test_promote_command_is_the_explicit_way_to_move_the_champion(in_project):
    name = "seg-cli"
    seg, _ = _register(name, "--tune", "reports/tune.json")
    assert mlflow.MlflowClient().get_registered_model(name).aliases == {}
    result = invoke("promote", name, seg["version"], "--set", f"register.segmenter_name={name}")
    assert result.exit_code == 0, result.output
    assert "-> champion" in result.output and _champion(name) == seg["version"]
    missing = invoke("promote", name, "99", "--set", f"register.segmenter_name={name}")
    assert missing.exit_code == 2 and "has no version '99'" in missing.output
    unknown = invoke("promote", "nope", "1")
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.output


def test_the_test_split_cannot_be_the_gate(in_project):
    result = invoke("register", "--tune", "reports/tune.json", "--survival", "missing.json", "--set",
                    "register.subset=test", "--set", "register.segmenter_name=seg-test-gate")
    assert result.exit_code == 2
    assert "register.subset: 'test' cannot choose models" in result.output


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
