"""Settings checked by the pydantic models, through the CLI: a bad value is one line naming the key
(exit 2, no traceback, no run started); a good one reaches the training converted to its type."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from brainseg.cli import app
from helpers import project_files


@pytest.fixture
def project(tmp_path, monkeypatch):
    project_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def refused(*args: str) -> str:
    """The one line a refused command prints (exit 2, no traceback, nothing written)."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)  # a traceback fails the test
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and "validation error" not in result.output  # no pydantic dump
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("override, message", [
    # a wrong type
    ("train.lr=abc", "train.lr: 'abc' (str) is not a number in (0, 1]"),
    ("train.epochs=2.5", "train.epochs: 2.5 (float) is not an integer >= 1"),
    ("train.epochs=true", "train.epochs: True (bool) is not an integer >= 1"),
    ("train.sharpen=1", "train.sharpen: 1 (int) is not true or false"),
    ("survival.classifiers=logreg", "survival.classifiers: 'logreg' (str) is not a list"),
    ("evaluate=3", "evaluate: 3 (int) replaces a whole section of settings; set one key instead, "
                   "e.g. evaluate.KEY=VALUE"),
    # out of range
    ("train.tumor_fraction=1.5", "train.tumor_fraction: 1.5 is not a number in [0, 1]"),
    ("train.steps_per_epoch=0", "train.steps_per_epoch: 0 is not null or an integer >= 1"),
    ("train.size=100", "train.size: 100 is not a multiple of 32 in 32..1024"),
    # issue 27: no longer trained and recorded
    ("train.batch_size=100000", "train.batch_size: 100000 is not an integer in [1, 4096]"),
    ("tune.budget_minutes=0", "tune.budget_minutes: 0 is not null or a number > 0"),
    ("tune.heartbeat=0", "tune.heartbeat: 0 is not a number > 0"),
    ("survival.oof.train.epochs=0", "survival.oof.train.epochs: 0 is not an integer >= 1"),
    # a value outside a fixed set
    ("train.lr_schedule=step", "train.lr_schedule: 'step' is not one of 'plateau', 'cosine' or 'linear'"),
    ("tune.pruner=asha", "tune.pruner: 'asha' is not one of 'hyperband', 'sha', 'median' or 'none'"),
    ("survival.classifiers=[logreg, svm]", "survival.classifiers: 'svm' is not one of 'logreg', 'rf' or 'gb'"),
    # an unknown key (refused before any check: only keys of params.yaml can be set)
    ("train.learning_rate=0.1", "override 'train.learning_rate=0.1': unknown key 'train.learning_rate'"),
])
def test_a_bad_setting_exits_2_with_one_line_naming_the_key(project, override, message):
    before = sorted(p.name for p in project.iterdir())
    assert refused("train", "--set", override) == message
    assert sorted(p.name for p in project.iterdir()) == before  # no run, no store, no file


def test_an_unknown_key_in_params_yaml_is_refused_naming_it(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["treshold"] = 0.4
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    message = refused("train")
    assert message.startswith("evaluate.treshold: unknown key; known: subset, threshold, ")


def test_a_good_override_reaches_the_training_as_a_number(project, monkeypatch):
    import brainseg.data.context
    import brainseg.training.training_run

    seen = {}

    class Started(Exception):
        pass

    def record(settings, cfg, ctx, **kwargs):
        seen.update(settings=settings, cfg=cfg)
        raise Started

    monkeypatch.setattr(brainseg.data.context.DataContext, "from_settings", classmethod(lambda cls, s: None))
    monkeypatch.setattr(brainseg.training.training_run, "tracked_training", record)
    result = CliRunner().invoke(app, ["train", "--set", "train.lr=1e-3", "--set", "train.epochs=2.0"])
    assert isinstance(result.exception, Started), result.output  # YAML reads 1e-3 as text: still a number
    assert seen["settings"].train.lr == 0.001 and seen["cfg"].lr == 0.001
    assert seen["settings"].train.epochs == 2 and type(seen["cfg"].epochs) is int
