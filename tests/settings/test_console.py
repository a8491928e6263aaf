"""The console a user sees: no library noise by default, one compact line per epoch in a log file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brainseg.settings import quiet
from brainseg.training import progress, progress_callbacks
from conftest import MAX_LINE, make_project, noise


def clean_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (quiet.VERBOSE_ENV, "MLFLOW_RUN_ID")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    return env


# ------------------------------------------------------------------------------------ epoch lines
@pytest.mark.parametrize("logs, best, seconds, expected", [
    ({"loss": 0.5124, "val_patient_dice": 0.532}, (0.54, 2), 12.34,
     "epoch 3/30  loss 0.512  val_patient_dice 0.532 (best 0.540, epoch 2)  12.3 s"),
    ({"val_patient_dice": float("nan"), "lr": 0.0001}, None, None,
     "epoch 3/30  val_patient_dice n/a  lr 0.0001"),
    ({"dice": 0.25, "unknown_metric": 7.0, "loss": 1.0}, None, 0.04,
     "epoch 3/30  loss 1.000  dice 0.250  0.0 s"),
])
def test_epoch_line_shows_the_known_figures_in_a_fixed_order(logs, best, seconds, expected):
    assert progress.epoch_line(3, 30, logs, best, seconds) == expected


def test_best_tracker_keeps_the_highest_validation_dice_and_its_epoch():
    best = progress.BestTracker()
    seen = [best.update(e, {"val_patient_dice": v}) for e, v in ((1, 0.2), (2, 0.5), (3, float("nan")), (4, 0.4))]
    assert seen == [(0.2, 1), (0.5, 2), (0.5, 2), (0.5, 2)]


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("mode, tty, expected", [("auto", True, "bar"), ("auto", False, "lines"),
                                                 ("lines", True, "lines"), ("none", False, "none")])
def test_progress_mode_follows_the_terminal(mode, tty, expected):
    assert progress.choose_mode(mode, Stream(tty)) == expected


def test_an_unknown_progress_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="'fancy'"):
        progress.choose_mode("fancy")


@pytest.mark.parametrize("label, prefix", [("", ""), ("trial #3", "trial #3  ")])
def test_line_mode_callback_writes_one_line_per_epoch(label, prefix):
    lines = []
    cb = progress_callbacks.epoch_progress(2, "lines", write=lines.append, label=label)
    for epoch, value in enumerate((0.3, 0.1)):
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch, {"loss": 1.0 - epoch, "val_patient_dice": value})
    assert [line[:len(prefix) + 9] for line in lines] == [f"{prefix}epoch 1/2", f"{prefix}epoch 2/2"]
    assert "(best 0.300, epoch 1)" in lines[1]
    assert progress_callbacks.epoch_progress(2, "none") is None


def test_bar_mode_shows_epochs_steps_and_the_epoch_figures_with_lr_on_a_terminal():
    from rich.console import Console

    screen = Console(file=io.StringIO(), force_terminal=True, width=240)
    cb = progress_callbacks.epoch_progress(2, "bar", console=screen)
    cb.set_params({"epochs": 2, "steps": 3})
    cb.on_train_begin()
    for epoch, value in enumerate((0.3, 0.1)):
        cb.on_epoch_begin(epoch)
        for step in range(3 - epoch):  # the last epoch stops after 2 steps: the row shows 2 of 3
            cb.on_train_batch_end(step)
        cb.on_epoch_end(epoch, {"loss": 1.0 - epoch, "val_patient_dice": value, "lr": 0.001 / (epoch + 1)})
    epochs, steps = cb.bar.tasks
    assert (epochs.completed, epochs.total) == (2, 2) and (steps.completed, steps.total) == (2, 3)
    last = epochs.fields["last"]  # the epoch's line without "epoch 2/2"; ends with its seconds
    assert last.startswith("loss 0.000  val_patient_dice 0.100 (best 0.300, epoch 1)  lr 0.0005  ")
    assert last.endswith(" s")
    cb.on_train_end()
    shown = screen.file.getvalue()
    assert "2/2" in shown and "lr 0.0005" in shown and "\x08" not in shown


# ------------------------------------------------------------------------------------ muting
def test_muted_stderr_fd_swallows_c_level_writes(capfd):
    with quiet.muted_stderr_fd():
        os.write(2, b"I0000 absl noise\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_muted_stderr_fd_replays_what_was_written_when_the_block_fails(capfd):
    with pytest.raises(ImportError), quiet.muted_stderr_fd():
        os.write(2, b"why the import failed\n")
        raise ImportError("boom")
    assert "why the import failed" in capfd.readouterr().err


def import_tensorflow(env: dict) -> subprocess.CompletedProcess:
    code = "import brainseg, tensorflow as tf; tf.config.list_physical_devices(); print(tf.constant(2).numpy())"
    return subprocess.run(["nice", "-n", "19", sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)


def test_tensorflow_imports_silently_and_verbose_shows_the_libraries(tmp_path):
    env = clean_env(tmp_path)
    quiet_run = import_tensorflow(env)
    assert quiet_run.returncode == 0, quiet_run.stderr
    assert quiet_run.stdout.strip() == "2" and quiet_run.stderr == ""
    loud = import_tensorflow({**env, quiet.VERBOSE_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert loud.returncode == 0
    assert noise(loud.stderr.splitlines()), "expected TensorFlow's start-up lines with BRAINSEG_VERBOSE=1"


# ------------------------------------------------------------------------------------ whole commands
def run_command(argv: list[str], cwd: Path, env: dict, timeout: float = 1800) -> list[str]:
    done = subprocess.run(["nice", "-n", "19", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(lines[-40:])
    return lines


@pytest.mark.timeout(1800)
def test_smoke_training_prints_only_the_projects_own_lines(tmp_path):
    project = make_project(tmp_path / "project", patients=8, slices=6, size=64)
    env = clean_env(project)
    brainseg = [sys.executable, "-m", "brainseg"]
    lines = run_command([*brainseg, "data", "prepare", "--profile", "smoke", "--no-dvc"], project, env)
    lines += run_command([*brainseg, "train", "--profile", "smoke"], project, env)
    assert noise(lines) == []
    assert max(len(line) for line in lines) <= MAX_LINE
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert 1 <= len(epochs) <= 4  # the smoke profile's epochs, one line each (early stopping may end it sooner)
    assert len(lines) - len(epochs) <= 3 + 5  # prepare's 3 lines, train's summary (run, val, test, model)
    assert any(line.startswith("model: ") for line in lines)


# `mlflow run . -e tune` is checked for noise by test_tune_refit.py's mlflow-run test (one run, both checks).


def test_verbose_global_option_turns_the_libraries_back_on(tmp_path, monkeypatch):
    from helpers import invoke

    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    try:
        result = invoke("--verbose", "data", "synth", str(tmp_path / "out"), "--patients", "1", "--slices", "4",
                        "--size", "32")
        assert result.exit_code == 0, result.output
        assert os.environ[quiet.VERBOSE_ENV] == "1" and quiet._FINDER not in sys.meta_path
    finally:
        os.environ.pop(quiet.VERBOSE_ENV, None)
        quiet.install()
    assert quiet._FINDER in sys.meta_path
    result = invoke("data", "synth", str(tmp_path / "out2"), "--patients", "1", "--slices", "4", "--size", "32")
    assert result.exit_code == 0 and quiet.VERBOSE_ENV not in os.environ
