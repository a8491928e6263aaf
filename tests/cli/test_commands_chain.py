"""Commands chain: settings are checked up front, the manifest and split are built when missing or
stale, `predict` never reads its own --out folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from brainseg.data.context import DataContext, ensure_prepared, manifest_staleness, stamp_manifest
from brainseg.data.importer import import_dataset
from brainseg.data.synth import generate
from brainseg.pipeline.predict import collect_inputs
from brainseg.settings.config import load_settings, validate_settings
from brainseg.settings.settings_io import ConfigError
from helpers import copy_checkout, project_files

PROJECT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ settings checks
@pytest.mark.parametrize("override, expected", [
    ("train.lr=1e-3", ("train", "lr", 0.001)),           # YAML reads 1e-3 as text: taken as the number
    ("train.lr=0.01", ("train", "lr", 0.01)),
    ("train.epochs=3.0", ("train", "epochs", 3)),
    ("train.steps_per_epoch=null", ("train", "steps_per_epoch", None)),
    ("train.steps_per_epoch=5", ("train", "steps_per_epoch", 5)),
    ("evaluate.tta=true", ("evaluate", "tta", True)),
    ("tune.timeout=90.5", ("tune", "timeout", 90.5)),
    ("split.seed=7", ("split", "seed", 7)),
])
def test_good_overrides_pass_with_their_types(monkeypatch, override, expected):
    monkeypatch.chdir(PROJECT)
    settings = validate_settings(load_settings(None, [override]))
    section, key, value = expected
    got = getattr(getattr(settings, section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr: 'abc' (str) is not a number"),
    ("train.lr=0", "train.lr: 0 is not a number in (0, 1]"),
    ("train.batch_size=0", "train.batch_size: 0 is not an integer in [1, 4096]"),
    ("train.batch_size=2.5", "train.batch_size: 2.5 (float) is not an integer"),
    ("train.epochs=0", "train.epochs: 0 is not an integer >= 1"),
    ("train=5", "train: 5 (int) replaces a whole section"),
    ("evaluate=[1]", "evaluate: [1] (list) replaces a whole section"),
    ("train.sharpen=yes please", "train.sharpen: 'yes please' (str) is not true or false"),
    ("train.size=100", "train.size: 100 is not a multiple of 32 in 32..1024"),
    ("train.tumor_fraction=2", "train.tumor_fraction: 2 is not a number in [0, 1]"),
    ("train.encoder=34", "train.encoder: 34 (int) is not text"),
    ("train.loss=dice", "train.loss: 'dice' (str) is not a mapping"),
    ("evaluate.batch_size=-1", "evaluate.batch_size: -1 is not an integer >= 1"),
    ("evaluate.min_component_px=-5", "evaluate.min_component_px: -5 is not an integer >= 0"),
    ("split.val_fraction=1", "split.val_fraction: 1 is not a number in [0, 1)"),
    ("survival.folds=1", "survival.folds: 1 is not an integer >= 2"),
    ("tune.heartbeat=0", "tune.heartbeat: 0 is not a number > 0"),
    ("data.synth.slices=2", "data.synth.slices: 2 is not an integer >= 4"),
    ("data.root=5", "data.root: 5 (int) is not text"),
])
def test_bad_overrides_are_refused_naming_the_key(monkeypatch, override, message):
    monkeypatch.chdir(PROJECT)
    with pytest.raises(ConfigError) as err:
        validate_settings(load_settings(None, [override]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_project_defaults_and_every_profile_pass(monkeypatch):
    monkeypatch.chdir(PROJECT)
    import yaml

    for profile in [None, *yaml.safe_load((PROJECT / "experiments" / "profiles.yaml").read_text())]:
        settings = load_settings(profile, [])
        assert validate_settings(settings).as_dict() == settings


# ---------------------------------------------------------------------- manifest and split on demand
@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(project_files(tmp_path))
    import_dataset(generate(tmp_path / "src" / "kaggle_3m", patients=6, slices=4, size=32, seed=0),
                   Path("data/raw/kaggle_3m"), use_dvc=False)
    return validate_settings(load_settings(None, []))


def test_missing_manifest_and_split_are_built_and_said(project):
    lines = []
    ctx = DataContext.from_settings(project, echo=lines.append)
    assert len(lines) == 2
    assert lines[0].startswith("manifest missing: built data/processed/manifest.csv (6 patients, 24 slices")
    assert lines[1].startswith("split missing: built data/processed/split.csv (train ")
    assert len(ctx.manifest) == 24 and sorted(ctx.split["patient"]) == sorted(ctx.manifest["patient"].unique())
    again = []
    DataContext.from_settings(project, echo=again.append)
    assert again == []  # current: nothing rebuilt


def test_a_new_import_makes_them_stale(project, tmp_path):
    DataContext.from_settings(project, echo=lambda line: None)
    import_dataset(generate(tmp_path / "src2" / "kaggle_3m", patients=4, slices=4, size=32, seed=9),
                   Path("data/raw/kaggle_3m"), use_dvc=False)
    lines = []
    ctx = DataContext.from_settings(project, echo=lines.append)
    assert "manifest is stale (data version" in lines[0]
    assert lines[1].startswith("split does not match the manifest's patients: built")
    assert len(ctx.manifest) == 16 and len(ctx.split) == 4


def test_a_manifest_of_another_folder_is_rebuilt(project, tmp_path):
    other = generate(tmp_path / "other" / "kaggle_3m", patients=3, slices=4, size=32, seed=2)
    DataContext.from_settings(project.with_changes(data={"root": str(other)}), echo=lambda x: None)
    lines = []
    DataContext.from_settings(project, echo=lines.append)
    assert "manifest was built from another dataset folder" in lines[0]


def test_an_unstamped_manifest_naming_missing_files_is_stale(project):
    ensure_prepared(project, echo=lambda x: None)
    m = Path(project.data.manifest)
    m.with_suffix(".version.json").unlink()
    assert manifest_staleness(m, Path(project.data.root), "v") is None  # all its files exist
    df = pd.read_csv(m)
    df.loc[0, "image_path"] = "data/raw/kaggle_3m/gone.tif"
    df.to_csv(m, index=False)
    assert manifest_staleness(m, Path(project.data.root), "v") == "names files that no longer exist"
    stamp_manifest(m, Path(project.data.root), "v")
    assert manifest_staleness(m, Path(project.data.root), "v") is None


def test_no_dataset_and_a_bad_dataset_say_what_to_run(project):
    shutil.rmtree("data/raw/kaggle_3m")
    with pytest.raises(FileNotFoundError, match="dataset not found .*brainseg data import PATH"):
        ensure_prepared(project)
    root = generate(Path("data/raw/kaggle_3m"), patients=2, slices=4, size=32, seed=0)
    next(root.glob("*/*_1_mask.tif")).unlink()
    with pytest.raises(ValueError, match=r"1 problem\(s\), e.g. .*image without mask.*brainseg data validate"):
        ensure_prepared(project)
    assert not Path("data/processed/manifest.csv").exists()


# ------------------------------------------------------------------------------ predict's inputs
def test_collect_inputs_never_reads_the_output_folder(tmp_path):
    patient = generate(tmp_path / "in" / "kaggle_3m", patients=1, slices=4, size=16, seed=0)
    folder = next(p for p in patient.iterdir() if p.is_dir())
    out = folder / "preds"  # --out inside the input folder, as in `predict DIR --out DIR/preds`
    out.mkdir()
    (out / f"{folder.name}_1_overlay.png").write_bytes(b"png")
    (out / f"{folder.name}_1_pred.png").write_bytes(b"png")
    files, problems = collect_inputs([folder], exclude=[out])
    assert [f.name for f in files] == [f"{folder.name}_{n}.tif" for n in (1, 2, 3, 4)] and problems == []
    files, problems = collect_inputs([folder, out / f"{folder.name}_1_pred.png"], exclude=[out])
    assert len(files) == 4 and problems == [f"{out / f'{folder.name}_1_pred.png'}: inside the output folder; not read"]
    files, _ = collect_inputs([folder])  # without exclude, the old behaviour: outputs are read
    assert len(files) == 6


# ------------------------------------------------------- the commands build what they need (CLI)
BUILT = ("manifest missing: built data/processed/manifest.csv (6 patients, 24 slices",
         "split missing: built data/processed/split.csv")


def _said(output: str) -> str:
    return " ".join(output.split())


def test_tune_builds_the_missing_manifest_and_split_and_says_so(project, monkeypatch):
    """`brainseg tune` right after an import: the CLI path up to the study, which is replaced by a
    stub receiving the data context (the study itself is tested in test_tune*)."""
    import brainseg.tune.session
    from helpers import invoke

    seen = {}

    def study(plan, ctx, experiment, **kwargs):
        seen["ctx"] = ctx
        return {"study": plan.study_name, "trials": 0, "states": {}, "parent_run_id": "stub"}

    monkeypatch.setattr(brainseg.tune.session, "run_study", study)
    result = invoke("tune", "--profile", "smoke", "--out", "reports/tune.json")
    assert result.exit_code == 0, result.output
    assert all(line in _said(result.output) for line in BUILT), result.output
    assert len(seen["ctx"].manifest) == 24 and Path("data/processed/split.csv").is_file()
    assert "manifest missing" not in _said(invoke("tune", "--profile", "smoke").output)  # built once


def test_evaluate_builds_the_missing_manifest_and_split_and_says_so(project, tmp_path):
    """`brainseg evaluate --model FOLDER` right after an import, for real (a tiny untrained model)."""
    from brainseg.inference.segmenter import InferenceSettings, save_model
    from brainseg.models.factory import build_model
    from brainseg.settings.config import Train
    from conftest import Tracking
    from helpers import invoke

    cfg = Train.from_dict({"arch": "plain_unet", "base_filters": 4, "size": 32})
    model_dir = save_model(build_model(cfg), cfg, InferenceSettings(), tmp_path / "model")
    with Tracking(tmp_path / "mlflow.db"):
        result = invoke("evaluate", "--model", str(model_dir), "--out", "reports/evaluate")
    assert result.exit_code == 0, result.output
    assert all(line in _said(result.output) for line in BUILT), result.output
    metrics = json.loads(Path("reports/evaluate/metrics.json").read_text())
    split = pd.read_csv("data/processed/split.csv")
    assert metrics["val_n_patients"] == (split["subset"] == "val").sum() >= 1  # on the split it built


@pytest.mark.slow
@pytest.mark.real
def test_import_then_train_on_a_fresh_clone(real_sample, tmp_path):
    """The issue's `brainseg data import SAMPLE && brainseg train --profile smoke` on a fresh clone,
    as a user runs it: two processes in a copy of the checkout (tracked + new files, its own git),
    import with DVC, no manifest or split beforehand; MLflow's default store in the clone."""
    import mlflow

    from conftest import Tracking

    clone = copy_checkout(tmp_path / "clone")
    assert not (clone / "data/raw/kaggle_3m").exists() and not (clone / "data/processed/split.csv").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BRAINSEG_"))}

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "brainseg", *args], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=900, check=False)
        assert done.returncode == 0, f"brainseg {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    imported = run("data", "import", str(real_sample))
    assert (clone / "data/raw/kaggle_3m.dvc").is_file(), imported.stdout  # tracked with DVC
    n_slices = sum(1 for p in real_sample.rglob("*.tif") if not p.stem.endswith("_mask"))
    trained = run("train", "--profile", "smoke", "--progress", "none")
    said = _said(trained.stdout + trained.stderr)
    assert f"manifest missing: built data/processed/manifest.csv (6 patients, {n_slices} slices" in said, said
    assert "split missing: built data/processed/split.csv" in said and "model: " in said, said
    with Tracking(clone / "mlflow.db"):
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'FINISHED'")
        assert len(runs) >= 1 and runs["metrics.val_patient_dice_mean"].notna().any()
        model_uri = said.split("model: ")[1].split()[0]
        assert mlflow.models.get_model_info(model_uri).signature is not None  # the logged model
