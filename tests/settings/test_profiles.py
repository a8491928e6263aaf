"""Budget profiles are written INTO params.yaml (`brainseg profile use`); nothing overrides it silently."""

from pathlib import Path

import pytest
import yaml

from brainseg.settings.config import load_settings
from brainseg.settings.profiles import read_profiles, use_profile
from brainseg.settings.settings_io import ConfigError
from helpers import PROJECT_ROOT, invoke, project_files


@pytest.fixture
def project(tmp_path, monkeypatch):
    project_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_shipped_params_hold_the_values_of_the_profile_they_name():
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    diff = use_profile(params["profile"], PROJECT_ROOT / "params.yaml",
                       PROJECT_ROOT / "experiments" / "profiles.yaml", dry_run=True)
    assert diff == []


def test_use_profile_writes_the_values_keeps_comments_and_switching_back_restores_the_file(project):
    smoke = Path("params.yaml").read_text()
    diff = use_profile("cpu")
    cpu = read_profiles()["cpu"]
    changed = {key for key, _, _ in diff}
    assert "profile" in changed and "train.channels" in changed and "survival.repeats" in changed
    s = load_settings()
    assert s["profile"] == "cpu"
    for key, value in cpu.items():  # nested keys too (survival.oof.train.epochs)
        node = s
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    text = Path("params.yaml").read_text()
    assert "# unet | unetpp | linknet" in text and "encoder_weights: null" in text  # comments, nulls kept
    assert use_profile("cpu") == []  # idempotent
    use_profile("smoke")
    assert Path("params.yaml").read_text() == smoke  # nothing of cpu left behind, byte for byte


def test_dry_run_writes_nothing(project):
    before = Path("params.yaml").read_text()
    assert use_profile("gpu", dry_run=True)
    assert Path("params.yaml").read_text() == before


def test_profiles_must_set_the_same_keys(tmp_path):
    f = tmp_path / "profiles.yaml"
    f.write_text("a: {train: {epochs: 2, lr: 0.1}}\nb: {train: {epochs: 9}}\n")
    with pytest.raises(ConfigError, match=r"profile 'b' does not set \['train.lr'\]"):
        read_profiles(f)


def test_a_profile_key_missing_from_params_is_named(project):
    Path("experiments/profiles.yaml").write_text("x: {train: {epochz: 2}}\n")
    with pytest.raises(ConfigError, match="profile 'x' sets 'train.epochz', which is not a key of params.yaml"):
        use_profile("x")
    with pytest.raises(ConfigError, match="unknown profile 'y'"):
        use_profile("y")


def test_explicit_profile_on_a_command_applies_in_memory_only(project):
    before = Path("params.yaml").read_text()
    s = load_settings("cpu")
    assert s["profile"] == "cpu" and s["train"]["channels"] == "all"
    assert Path("params.yaml").read_text() == before


def test_cli_profile_use(project):
    dry = invoke("profile", "use", "cpu", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "train.size: 64 -> 128" in dry.output and "would change" in dry.output
    assert load_settings()["train"]["size"] == 64
    done = invoke("profile", "use", "cpu")
    assert done.exit_code == 0 and load_settings()["train"]["size"] == 128
    again = invoke("profile", "use", "cpu")
    assert "already has profile cpu's values" in again.output
    bad = invoke("profile", "use", "tpu")
    assert bad.exit_code == 2 and "unknown profile 'tpu'" in bad.output
