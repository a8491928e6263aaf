"""`brainseg data prepare`: what `mlflow run . -e tune` does first on a fresh checkout."""

import pandas as pd

from helpers import invoke, project_files


def test_prepare_generates_the_synthetic_default_then_manifest_and_split(tmp_path, monkeypatch):
    project_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = invoke("data", "prepare", "--no-dvc", "--set", "data.synth.patients=6", "--set", "data.synth.slices=5")
    assert result.exit_code == 0, result.output
    assert "generated the synthetic default" in result.output
    manifest = pd.read_csv("data/processed/manifest.csv")
    split = pd.read_csv("data/processed/split.csv")
    assert manifest["patient"].nunique() == 6 and len(manifest) == 30
    assert set(split["patient"]) == set(manifest["patient"])
    again = invoke("data", "prepare", "--no-dvc")
    assert again.exit_code == 0 and "using the synthetic dataset already there" in again.output
