"""Commands chain: settings are checked up front, the manifest and split are built when missing or
stale, `predict` never reads its own --out folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from brainseg.config import ConfigError, load_settings, validate_settings
from brainseg.data.context import DataContext, ensure_prepared, manifest_staleness, stamp_manifest
from brainseg.data.importer import import_dataset
from brainseg.data.synth import generate
from brainseg.predict import collect_inputs

PROJECT = Path(__file__).resolve().parents[1]


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
    settings = validate_settings(load_settings(None, [override]), load_settings(None, []))
    section, key, value = expected
    assert settings[section][key] == value and type(settings[section][key]) is type(value)


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "train.lr: 'abc' (str) is not a number"),
    ("train.lr=0", "train.lr: 0.0 is not a number in (0, 1]"),
    ("train.batch_size=0", "train.batch_size: 0 is not an integer >= 1"),
    ("train.batch_size=2.5", "train.batch_size: 2.5 (float) is not an integer"),
    ("train.epochs=0", "train.epochs: 0 is not an integer >= 1"),
    ("train=5", "train: 5 (int) replaces a whole section"),
    ("evaluate=[1]", "evaluate: [1] (list) replaces a whole section"),
    ("train.sharpen=yes please", "train.sharpen: 'yes please' (str) is not true or false"),
    ("train.size=100", "size: 100 must be a multiple of 32"),
    ("train.tumor_fraction=2", "train.tumor_fraction: 2.0 is not a number in [0, 1]"),
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
        validate_settings(load_settings(None, [override]), load_settings(None, []))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_project_defaults_and_every_profile_pass(monkeypatch):
    monkeypatch.chdir(PROJECT)
    import yaml

    for profile in [None, *yaml.safe_load((PROJECT / "experiments" / "profiles.yaml").read_text())]:
        settings = load_settings(profile, [])
        assert validate_settings(settings, settings) == settings


# ---------------------------------------------------------------------- manifest and split on demand
@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(PROJECT / "experiments", tmp_path / "experiments")
    import_dataset(generate(tmp_path / "src" / "kaggle_3m", patients=6, slices=4, size=32, seed=0),
                   Path("data/raw/kaggle_3m"), use_dvc=False)
    return load_settings(None, [])


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
    DataContext.from_settings({**project, "data": {**project["data"], "root": str(other)}}, echo=lambda x: None)
    lines = []
    DataContext.from_settings(project, echo=lines.append)
    assert "manifest was built from another dataset folder" in lines[0]


def test_an_unstamped_manifest_naming_missing_files_is_stale(project):
    ensure_prepared(project, echo=lambda x: None)
    m = Path(project["data"]["manifest"])
    m.with_suffix(".version.json").unlink()
    assert manifest_staleness(m, Path(project["data"]["root"]), "v") is None  # all its files exist
    df = pd.read_csv(m)
    df.loc[0, "image_path"] = "data/raw/kaggle_3m/gone.tif"
    df.to_csv(m, index=False)
    assert manifest_staleness(m, Path(project["data"]["root"]), "v") == "names files that no longer exist"
    stamp_manifest(m, Path(project["data"]["root"]), "v")
    assert manifest_staleness(m, Path(project["data"]["root"]), "v") is None


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


@pytest.mark.slow
def test_import_then_train_on_a_fresh_project(tmp_path, monkeypatch):
    """`brainseg data import SRC && brainseg train` with no manifest or split: train builds them."""
    from typer.testing import CliRunner

    from brainseg.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(PROJECT / "experiments", tmp_path / "experiments")
    src = generate(tmp_path / "download" / "kaggle_3m", patients=6, slices=6, size=32, seed=0)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "import", str(src.parent), "--no-dvc"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--verbose", "0", "--set", "train.epochs=1", "--set", "train.size=32",
                                 "--set", "train.steps_per_epoch=2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "manifest missing: built data/processed/manifest.csv (6 patients, 36 slices" in text
    assert "split missing: built data/processed/split.csv" in text and "model:" in text
