"""Settings: params.yaml (the values DVC records), then --set overrides; profiles in brainseg.settings.profiles.

The merged settings are read as a plain nested dict (what DVC and MLflow log), then checked and
typed once by :func:`validate_settings` into a frozen :class:`Settings` (one pydantic model per
section: types, ranges, defaults, fixed value sets), which is what every function takes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from brainseg.settings.profiles import with_profile
from brainseg.settings.settings_io import (
    PARAMS_FILE,
    PROFILES_FILE,
    ConfigError,
    Flag,
    Float,
    Int,
    Number,
    Section,
    apply_overrides,
    check,
    read_yaml,
)


def load_settings(
    profile: str | None = None,
    overrides: list[str] | None = None,
    params_file: Path = PARAMS_FILE,
    profiles_file: Path = PROFILES_FILE,
) -> dict:
    """params.yaml as written, then ``--set`` overrides: what DVC records is what runs.

    ``profile=None`` (every pipeline stage) reads params.yaml only; its ``profile:`` key just names
    the profile its values were last copied from (``brainseg profile use NAME``). An explicit
    ``profile`` (``--profile NAME`` on a single command) applies that profile in memory first.
    """
    params = read_yaml(Path(params_file))
    if profile:
        params = with_profile(params, profile, Path(profiles_file))
    params.setdefault("profile", "custom")
    return apply_overrides(params, overrides or [])


# ------------------------------------------------------------------ the settings, typed and range-checked
# One model per section of params.yaml (see settings_io.Section: every key optional, none unknown).
# The value sets that code elsewhere checks against are named here (tune.plan, inference, outcome).
Pruner = Literal["hyperband", "sha", "median", "none"]
Precision = Literal["auto", "float32", "bfloat16"]
# How probabilities become masks: declared once, used by the `evaluate` section (params.yaml) and by the
# settings stored with every model (brainseg.inference.segmenter.InferenceSettings)
Threshold = Annotated[Float, Field(gt=0, lt=1)]
MinComponentPx = Annotated[Int, Field(ge=0)]
Confidence = Annotated[Float, Field(ge=0, lt=1)]
BatchSize = Annotated[Int, Field(ge=1)]
Classifier = Literal["logreg", "rf", "gb"]
FeatureSet = Literal["clinical", "imaging", "both"]


class Synth(Section):
    patients: Int = Field(None, ge=1)
    slices: Int = Field(None, ge=4)
    size: Int = Field(None, ge=16)
    seed: Int = None


class Data(Section):
    root: str = None
    manifest: str = None
    split: str = None
    cache_dir: str = None
    synth: Synth = Field(default_factory=Synth)


class Split(Section):
    seed: Int = None
    val_fraction: Float = Field(None, ge=0, lt=1)
    test_fraction: Float = Field(None, ge=0, lt=1)
    folds: Int = Field(None, ge=1)
    burden_bins: Int = Field(None, ge=1)


class Train(Section):
    """The training settings, declared once: each field's type, range and default. A partial mapping
    (a profile, ``--set``, ``survival.oof.train``) is checked for the keys it holds (``check``); what
    the training code takes is the frozen whole (:meth:`from_dict`: defaults for the rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "unet"  # checked against the builders when the network is built (models.factory)
    encoder: str = "resnet34"
    encoder_weights: str | None = None
    freeze_encoder_epochs: Int = Field(0, ge=0)
    deep_supervision: Flag = False
    base_filters: Int = Field(16, ge=1)
    channels: Literal["flair", "all"] = "flair"
    size: Int = Field(128, ge=32, le=1024, multiple_of=32, description="a multiple of 32 in 32..1024")
    normalize: Literal["zscore", "unit"] = "zscore"
    sharpen: Flag = False
    crop: Literal["none", "head"] = "none"  # head: crop each slice to its head's square box before resizing
    loss: dict = Field(default_factory=lambda: {"bce": 0.5, "dice": 1.0}, min_length=1,
                       description="a mapping of loss name to weight")
    tversky_alpha: Float = Field(0.3, ge=0, le=1)
    tversky_beta: Float = Field(0.7, ge=0, le=1)
    lr: Float = Field(1e-3, gt=0, le=1)
    batch_size: Int = Field(16, ge=1, le=4096)  # more would not fit in memory at 128 px; issue 27
    epochs: Int = Field(30, ge=1)
    patience: Int = Field(8, ge=0)
    lr_patience: Int = Field(3, ge=0)
    lr_schedule: Literal["plateau", "cosine", "linear"] = "plateau"  # linear: warm-up, then decay to 0
    warmup_epochs: Int = Field(0, ge=0)
    budget_minutes: Float | None = Field(None, gt=0)  # wall-clock budget of the training (overrides epochs)
    progressive_size: Int | None = None  # train the first steps at this size; checked against size in from_dict
    progressive_share: Float = Field(0.5, gt=0, lt=1)  # share of the training time (or epochs) at progressive_size
    sampling: Literal["balanced", "area"] = "balanced"  # balanced (tumor_fraction) | area (tumor area + uniform_share)
    uniform_share: Float = Field(0.5, ge=0, le=1)
    tumor_fraction: Float = Field(0.5, ge=0, le=1)
    augment: Float = Field(0.5, ge=0, le=1)
    steps_per_epoch: Int | None = Field(None, ge=1)
    threshold: Threshold = 0.5
    seed: Int = 0
    choose_epoch: Literal["best", "last"] = "best"  # best (on the validation patients) | last (nnU-Net's)

    @classmethod
    def from_dict(cls, d: dict) -> "Train":
        """``d`` (train settings, any subset of the keys) checked, defaults for the rest; ConfigError in one line."""
        cfg = cls(**check(cls, d, "train"))
        if cfg.budget_minutes is not None and cfg.freeze_encoder_epochs:
            raise ConfigError("train.budget_minutes: a budgeted run cannot also freeze the encoder for "
                              "freeze_encoder_epochs (set one of them)")
        if cfg.progressive_size is not None and (int(cfg.progressive_size) % 32 or
                                                 not 32 <= int(cfg.progressive_size) < int(cfg.size)):
            raise ConfigError(f"train.progressive_size: {cfg.progressive_size} must be a multiple of 32 "
                              f"below train.size ({cfg.size}), or null")
        return cfg

    @property
    def prep(self) -> "PrepConfig":
        return PrepConfig(self.channels, int(self.size), self.normalize, bool(self.sharpen), self.crop)

    def to_dict(self) -> dict:
        return self.model_dump()

    def replace(self, **changes) -> "Train":
        """A copy with ``changes``, each field checked (not :meth:`from_dict`'s rules across fields)."""
        return type(self)(**{**self.model_dump(), **changes})


class Evaluate(Section):
    subset: str = None  # train, val, test, all or e.g. train+val (data.split.patients_in)
    threshold: Threshold = None
    min_component_px: MinComponentPx = None
    keep_largest: Flag = None
    tta: Flag = None
    batch_size: BatchSize = None
    precision: Precision = None
    select_postprocessing: Flag = True


class Tune(Section):
    study_name: str = None
    storage: str = None
    search_space: str = None
    sampler_seed: Int = 0
    pruner: Pruner = None
    n_trials: Int = Field(None, ge=1)
    timeout: Number = Field(None, gt=0)
    epochs: Int = Field(None, ge=1)
    min_resource: Int = Field(1, ge=1)
    reduction_factor: Int = Field(3, ge=2)
    size: Int | None = None
    steps_per_epoch: Int | None = None
    n_startup_trials: Int = Field(4, ge=0)
    enqueue_recipe: Flag = True
    workers: Int = Field(1, ge=1)
    threads: Int = Field(0, ge=0)
    refit: Flag | Literal["cv"] = False  # true: the best trial retrained once; cv: cross-validated, the ensemble
    register_: Flag = Field(False, alias="register")  # (`register` would shadow BaseModel.register)
    heartbeat: Number = Field(60, gt=0)
    budget_minutes: Number | None = Field(None, gt=0)
    target_trials: Int = Field(12, ge=1)
    rungs: Int = Field(3, ge=1)
    reserve_minutes: Number = Field(0, ge=0)


class Final(Section):
    classifier: Classifier = None
    feature_set: FeatureSet = None
    features_from: str = None  # truth, oof_predicted or model:URI


class Oof(Section):
    train: Train = Field(default_factory=Train)  # the fold segmenters' train settings: .given() on top of `train`


class Survival(Section):
    classifiers: list[Classifier] = None
    feature_sets: list[FeatureSet] = None
    folds: Int = Field(None, ge=2)
    repeats: Int = Field(None, ge=1)
    seed: Int = None
    inner_folds: Int = Field(None, ge=2)
    min_frequency: Int = Field(None, ge=1)
    min_known_fraction: Float = Field(None, ge=0, le=1)
    final: Final = Field(default_factory=Final)
    oof: Oof = Field(default_factory=Oof)


class Cv(Section):
    budget_minutes: Number | None = Field(None, gt=0)  # the whole cross-validation; folds share it evenly
    choose_epoch: Literal["best", "last"] = "last"  # what a fold model keeps (last: chooses nothing on its fold)


class Register(Section):
    segmenter_name: str = None
    survival_name: str = None
    subset: str = "val"  # the promotion gate says which subsets can choose models (promotion.GATE_SUBSETS)
    promote: Flag = False


class Settings(Section):
    """All the settings of a command, typed and frozen: what every function takes. Built once by
    :func:`validate_settings` from params.yaml, a profile and ``--set``; :meth:`as_dict` gives back
    the keys as given (what DVC and MLflow record); :meth:`with_changes` a changed copy, checked."""

    profile: str = "custom"
    data: Data = Field(default_factory=Data)
    split: Split = Field(default_factory=Split)
    train: Train = Field(default_factory=Train)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    tune: Tune = Field(default_factory=Tune)
    survival: Survival = Field(default_factory=Survival)
    cv: Cv = Field(default_factory=Cv)
    register_: Register = Field(default_factory=Register, alias="register")

    def as_dict(self) -> dict:
        """The settings as given, a plain nested dict (``train`` whole: what the training ran with)."""
        return {**self.given(), "train": self.train.model_dump()}

    def with_changes(self, **sections: dict) -> "Settings":
        """A copy with keys of some sections changed (``with_changes(cv={"budget_minutes": 10})``),
        checked as params.yaml is (:func:`validate_settings`)."""
        d = self.as_dict()
        for name, changes in sections.items():
            d[name] = {**d.get(name, {}), **changes}
        return validate_settings(d)


@dataclasses.dataclass(frozen=True)
class PrepConfig:
    """How a slice becomes a network input; shared by training, evaluation, predict and serving."""

    channels: str = "flair"
    size: int = 128
    normalize: str = "zscore"
    sharpen: bool = False
    crop: str = "none"  # none | head (crop each slice to its head's square box before resizing)

    def __post_init__(self):
        check(Train, dataclasses.asdict(self), "train")

    @property
    def n_channels(self) -> int:
        return 1 if self.channels == "flair" else 3

    def key(self) -> str:
        crop = "" if self.crop == "none" else f"-crop{self.crop}"
        return f"{self.channels}-{self.size}-{self.normalize}-{'sharp' if self.sharpen else 'plain'}{crop}"


# train settings of runs sized in epochs, not minutes (tuning trials and their refit, the survival
# fold segmenters): the recipe's time budget and resolution schedule do not apply to them
EPOCH_SIZED = {"budget_minutes": None, "progressive_size": None}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ------------------------------------------------------------------ checking settings before a run
def validate_settings(values: dict) -> Settings:
    """The merged settings (a plain nested dict, as read) checked and typed before any run starts.

    Values are converted to their setting's type (``"1e-3"`` -> 0.001, ``5.0`` -> 5 for an
    integer); a wrong one raises :class:`ConfigError` naming the key, in one line.

    >>> validate_settings({"train": {"lr": "1e-3"}}).train.lr
    0.001
    >>> validate_settings({"train": {"lr": "1e-3"}}).as_dict()["train"]["epochs"]  # the whole train section
    30
    >>> try:
    ...     validate_settings({"train": {"epochs": 0}})
    ... except ConfigError as exc:
    ...     print(exc)
    train.epochs: 0 is not an integer >= 1
    """
    out = check(Settings, values)
    train = Train.from_dict(out.get("train") or {})  # what one key cannot say alone (progressive_size < size, ...)
    return Settings.model_validate({**out, "train": train})
