"""Settings: params.yaml as written <- --set overrides (a profile only when named); errors name the
key, profile or file."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from brainseg.settings.config import PrepConfig, Train, flatten, load_settings, validate_settings
from brainseg.settings.settings_io import ConfigError, apply_overrides, deep_merge, parse_override

PROJECT = Path(__file__).resolve().parents[2]

PARAMS = {
    "profile": "small",
    "data": {"root": "data/raw/kaggle_3m", "synth": {"patients": 16, "size": 64}},
    "train": {"arch": "unet", "lr": 0.001, "epochs": 30, "loss": {"bce": 0.5, "dice": 1.0},
              "encoder_weights": None},
}
PROFILES = {  # every profile sets the same keys
    "small": {"train": {"epochs": 2, "loss": {"dice": 1.0}}, "data": {"synth": {"size": 32}}},
    "big": {"train": {"epochs": 80, "loss": {"focal": 1.0}}, "data": {"synth": {"size": 128}}},
}


@pytest.fixture
def files(tmp_path):
    params, profiles = tmp_path / "params.yaml", tmp_path / "profiles.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    profiles.write_text(yaml.safe_dump(PROFILES))
    return {"params_file": params, "profiles_file": profiles}


@pytest.mark.parametrize("base, override, expected", [
    ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
    ({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}, {"a": {"b": 1, "c": 3}}),
    ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"d": 3}}}, {"a": {"b": {"c": 1, "d": 3}}}),
    ({"a": {"b": 1}}, {"a": 5}, {"a": 5}),                       # a value replaces a section
    ({"a": 5}, {"a": {"b": 1}}, {"a": {"b": 1}}),
    # a loss mapping is replaced whole, never merged
    ({"loss": {"bce": 0.5, "dice": 1.0}}, {"loss": {"focal": 1.0}}, {"loss": {"focal": 1.0}}),
    ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
])
def test_deep_merge(base, override, expected):
    base_copy = yaml.safe_load(yaml.safe_dump(base))
    override_copy = yaml.safe_load(yaml.safe_dump(override))
    assert deep_merge(base, override) == expected
    assert base == base_copy and override == override_copy  # inputs untouched


def test_deep_merge_result_does_not_share_nested_dicts():
    base = {"a": {"b": 1}}
    merged = deep_merge(base, {})
    merged["a"]["b"] = 2
    assert base["a"]["b"] == 1


@pytest.mark.parametrize("text, path, value", [
    ("train.lr=0.01", ["train", "lr"], 0.01),
    ("train.epochs=5", ["train", "epochs"], 5),
    ("train.encoder_weights=null", ["train", "encoder_weights"], None),
    ("train.encoder_weights=", ["train", "encoder_weights"], None),
    ("train.sharpen=true", ["train", "sharpen"], True),
    ("train.arch=unetpp", ["train", "arch"], "unetpp"),
    ("train.loss={dice: 1.0, bce: 0.2}", ["train", "loss"], {"dice": 1.0, "bce": 0.2}),
    ("data.root=a=b", ["data", "root"], "a=b"),
    (" profile =cpu", ["profile"], "cpu"),
])
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text, message", [("train.lr", "expected KEY=VALUE"), ("=3", "empty key")])
def test_parse_override_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_override(text)


def test_load_settings_reads_params_as_written_and_applies_no_profile_silently(files):
    s = load_settings(**files)
    assert s["profile"] == "small"  # a label only: the small profile's epochs=2 is not applied
    assert s["train"] == PARAMS["train"]
    assert s["data"] == PARAMS["data"]


def test_load_settings_named_profile_merges_deeply(files):
    s = load_settings("big", **files)
    assert s["profile"] == "big"
    assert s["train"]["epochs"] == 80
    assert s["train"]["loss"] == {"focal": 1.0}
    assert s["data"]["synth"] == {"patients": 16, "size": 128}
    assert s["data"]["root"] == "data/raw/kaggle_3m"


def test_overrides_apply_after_the_profile(files):
    overrides = ["train.epochs=3", "data.synth.size=32", "train.loss={dice: 1.0}"]
    s = load_settings("big", overrides, **files)
    assert s["train"]["epochs"] == 3
    assert s["data"]["synth"]["size"] == 32
    assert s["train"]["loss"] == {"dice": 1.0}


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "unknown key 'train.lrr'"),
    ("train.loss.focal=1", "unknown key 'train.loss.focal'"),
    ("trian.lr=0.1", "'trian' is not a section"),
    ("train.lr.x=1", "'lr' is not a section"),
    ("nothing=1", "unknown key 'nothing'"),
])
def test_unknown_override_key_is_named(files, override, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(overrides=[override], **files)


def test_unknown_profile(files):
    with pytest.raises(ConfigError, match=r"unknown profile 'huge'.*\['big', 'small'\]"):
        load_settings("huge", **files)


def test_missing_and_bad_files(tmp_path, files):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_settings(params_file=tmp_path / "nope.yaml", profiles_file=files["profiles_file"])
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line 2, column 1: not valid YAML: expected ',' or ']'"):
        load_settings(params_file=tmp_path / "bad.yaml", profiles_file=files["profiles_file"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_settings(params_file=tmp_path / "list.yaml", profiles_file=files["profiles_file"])


def test_apply_overrides_does_not_modify_its_input():
    cfg = {"train": {"lr": 0.1}}
    assert apply_overrides(cfg, ["train.lr=0.2"]) == {"train": {"lr": 0.2}}
    assert cfg == {"train": {"lr": 0.1}}


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_project_profiles_give_valid_train_configs(profile):
    s = load_settings(profile, params_file=PROJECT / "params.yaml",
                      profiles_file=PROJECT / "experiments" / "profiles.yaml")
    cfg = Train.from_dict(s["train"])
    assert cfg.prep.size == s["train"]["size"]
    assert cfg.to_dict() == Train.from_dict(cfg.to_dict()).to_dict()


def test_train_config_errors():
    with pytest.raises(ConfigError, match=r"train.lrr: unknown key; known: arch, encoder, "):
        Train.from_dict({"lrr": 0.1})
    with pytest.raises(ConfigError, match="tumor_fraction"):
        Train.from_dict({"tumor_fraction": 1.5})
    with pytest.raises(ConfigError, match="train.loss"):
        Train.from_dict({"loss": {}})
    with pytest.raises(ConfigError, match="size: 100"):
        Train.from_dict({"size": 100})


@pytest.mark.parametrize("kw, message", [
    (dict(channels="t1"), "channels: 't1'"),
    (dict(normalize="minmax"), "normalize: 'minmax'"),
    (dict(size=48), "multiple of 32"),
    (dict(size=2048), "multiple of 32"),
])
def test_prep_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        PrepConfig(**kw)


@pytest.mark.parametrize("kw, n, key", [
    (dict(), 1, "flair-128-zscore-plain"),
    (dict(channels="all", size=64, normalize="unit", sharpen=True), 3, "all-64-unit-sharp"),
])
def test_prep_config_channels_and_key(kw, n, key):
    prep = PrepConfig(**kw)
    assert prep.n_channels == n and prep.key() == key


def test_flatten():
    nested = {"a": {"b": 1, "c": {"d": 2}}, "e": {}, "f": None}
    assert flatten(nested) == {"a.b": 1, "a.c.d": 2, "e": {}, "f": None}


# ------------------------------------------------------------------ the pydantic models (config.Settings)
def project_settings(*overrides):
    return validate_settings(load_settings(None, list(overrides), params_file=PROJECT / "params.yaml",
                                           profiles_file=PROJECT / "experiments" / "profiles.yaml"))


@pytest.mark.parametrize("override, key, value", [
    ("train.lr=1e-3", "train.lr", 0.001),            # YAML reads 1e-3 as text
    ("train.epochs=4.0", "train.epochs", 4),          # an integral float is an integer
    ("tune.workers=2.0", "tune.workers", 2),
    ("tune.timeout=600", "tune.timeout", 600),        # a number stays as written (int or float)
    ("tune.timeout=90.5", "tune.timeout", 90.5),
    ("tune.size=null", "tune.size", None),            # null: the trial's size is train.size
    ("tune.steps_per_epoch=null", "tune.steps_per_epoch", None),
    ("survival.final.features_from=truth", "survival.final.features_from", "truth"),
    ("evaluate.subset=train+val", "evaluate.subset", "train+val"),
])
def test_settings_models_convert_good_values(override, key, value):
    got = project_settings(override)
    for part in key.split("."):
        got = getattr(got, part)  # typed: attributes, not keys
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, message", [
    ("evaluate.precision=fp16", "evaluate.precision: 'fp16' is not one of 'auto', 'float32' or 'bfloat16'"),
    ("survival.final.classifier=svm", "survival.final.classifier: 'svm' is not one of 'logreg', 'rf' or 'gb'"),
    ("survival.oof.train.size=48", "survival.oof.train.size: 48 is not a multiple of 32 in 32..1024"),
    ("tune.min_resource=2.5", "tune.min_resource: 2.5 (float) is not an integer"),
    ("tune.enqueue_recipe=0", "tune.enqueue_recipe: 0 (int) is not true or false"),
    ("tune.budget_minutes=0", "tune.budget_minutes: 0 is not null or a number > 0"),
    ("data.synth=5", "data.synth: 5 (int) replaces a whole section"),
    ("train.progressive_size=64", "train.progressive_size: 64 must be a multiple of 32 below train.size (64)"),
])
def test_settings_models_refuse_bad_values_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        project_settings(override)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_settings_come_back_as_given_frozen_and_refuse_unknown_keys_anywhere():
    settings = load_settings(params_file=PROJECT / "params.yaml")
    checked = validate_settings(settings)
    assert checked.as_dict() == settings and list(checked.as_dict()["train"]) == list(settings["train"])
    with pytest.raises(ValidationError, match="frozen"):
        checked.train.lr = 0.5
    with pytest.raises(ValidationError, match="frozen"):
        checked.evaluate.threshold = 0.9
    assert checked.with_changes(cv={"budget_minutes": 10}).cv.budget_minutes == 10 and checked.cv.budget_minutes is None
    with pytest.raises(ConfigError, match="cv.budget_minutes: 0 "):
        checked.with_changes(cv={"budget_minutes": 0})
    settings["survival"]["oof"]["train"]["lrr"] = 0.1
    settings["colour"] = "red"
    with pytest.raises(ConfigError) as err:
        validate_settings(settings)
    assert "survival.oof.train.lrr: unknown key; known: arch," in str(err.value)
    assert ("colour: unknown key; known: profile, data, split, train, evaluate, tune, survival, cv, register"
            in str(err.value))
