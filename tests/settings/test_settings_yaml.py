"""Malformed YAML in ``--set`` and params.yaml (issue 37): a tag such as ``!!python/object``, an
unclosed bracket, an anchor that contains itself, a key given twice: one line naming the key (or the
file and line), exit 2, nothing constructed, nothing written."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from brainseg.cli import app
from brainseg.settings.settings_io import ConfigError, parse_override, parse_yaml, read_yaml
from conftest import PROJECT_ROOT


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(PROJECT_ROOT / "experiments", tmp_path / "experiments")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def refused(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)  # a traceback fails the test
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize("override, message", [
    ("train.lr=!!python/object/apply:os.system [touch pwned]",
     "--set train.lr: the YAML tag !!python/object/apply:os.system is not allowed (plain values only)"),
    ("train.lr=!!python/name:os.system", "--set train.lr: the YAML tag !!python/name:os.system is not allowed"),
    ("train.lr=!!binary AAAA", "--set train.lr: the YAML tag !!binary is not allowed"),
    ("train.lr=[1, 2", "--set train.lr: column 6: not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ("train.lr={a: 1", "--set train.lr: column 6: not valid YAML: expected ',' or '}'"),
    ("train.lr='0.1", "--set train.lr: column 5: not valid YAML: found unexpected end of stream"),
    ("train.lr=&x [*x]", "--set train.lr: an anchor that contains itself (a recursive alias)"),
    ("train.lr=&x {a: *x}", "--set train.lr.a: an anchor that contains itself"),
    ("train.lr={a: 1, a: 2}", "--set train.lr.a: duplicate key (one mapping names it twice); keep one"),
    pytest.param("train.lr=" + "[" * 5000 + "]" * 5000, "--set train.lr: nested too deeply to be a setting",
                 id="5000 levels"),
])
def test_a_malformed_override_is_one_line_naming_the_key(project, override, message):
    before = sorted(p.name for p in project.iterdir())
    assert refused("train", "--set", override).startswith(message)
    assert sorted(p.name for p in project.iterdir()) == before  # no run, no store, nothing executed
    assert not (project / "pwned").exists()


PARAMS_CASES = {
    "a duplicate key": ("  lr: 0.5\n", "params.yaml: train.lr (lines {line} and {lr}): duplicate key (one mapping "
                                       "names it twice); keep one"),
    "a python tag": ("  extra: !!python/object/apply:os.system [touch pwned]\n",
                     "params.yaml: train.extra (line {line}): the YAML tag !!python/object/apply:os.system is not "
                     "allowed"),
    "a recursive anchor": ("  extra: &x [*x]\n", "params.yaml: train.extra (line {line}): an anchor that contains "
                                                 "itself"),
    "an unclosed bracket": ("  extra: [1, 2\n",
                            "params.yaml: line {next}, column 7: not valid YAML: expected ',' or ']'"),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_a_malformed_params_yaml_is_one_line_naming_the_file_and_key(project, case):
    inserted, message = PARAMS_CASES[case]
    text = (project / "params.yaml").read_text()
    head, tail = text.split("\ntrain:\n", 1)
    line = head.count("\n") + 3  # the line after "train:"
    (project / "params.yaml").write_text(f"{head}\ntrain:\n{inserted}{tail}")
    lr = 1 + next(i for i, text in enumerate(tail.splitlines()) if text.startswith("  lr:")) + line
    expected = message.format(line=line, next=line + 1, lr=lr)
    assert refused("train").startswith(expected)
    assert refused("data", "split").startswith(expected)  # every command reads it the same way
    assert not (project / "pwned").exists()


def test_a_duplicate_key_is_refused_as_dvc_refuses_it(project):
    """DVC calls such a params.yaml corrupted (its ruamel loader); brainseg no longer reads the last one."""
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\ntrain:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: train \(lines \d+ and \d+\): duplicate key"):
        read_yaml(project / "params.yaml")


@pytest.mark.parametrize("text, value", [
    ("{a: 1, b: [2, 3]}", {"a": 1, "b": [2, 3]}),
    ("base: &b {x: 1, y: 2}\nmore: {<<: *b, y: 3}", {"base": {"x": 1, "y": 2}, "more": {"x": 1, "y": 3}}),
    ("a: &v 0.5\nb: *v", {"a": 0.5, "b": 0.5}),  # an alias that is not recursive stays legal
    ("", None),
    ("1e-3", "1e-3"),  # YAML 1.1 reads it as text; pydantic's Float converts it
])
def test_plain_yaml_still_parses(text, value):
    assert parse_yaml(text, "f.yaml", in_file=True) == value


def test_aliases_that_expand_into_millions_of_values_are_refused():
    laughs = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6))
    with pytest.raises(ConfigError, match="more than 100000 values once its aliases are expanded"):
        parse_yaml(laughs, "f.yaml", in_file=True)


def test_an_override_without_a_value_is_null_and_a_good_one_parses():
    assert parse_override("train.steps_per_epoch=") == (["train", "steps_per_epoch"], None)
    assert parse_override("train.lr=0.01") == (["train", "lr"], 0.01)
