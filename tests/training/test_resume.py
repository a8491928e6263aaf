"""Per-epoch checkpoints and resumed training (issue 27): the Keras loop continues where it was
killed, with the same weights, optimizer, schedule, budget and counters; saves are atomic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_budget import FakeClock, _arrays

from brainseg.training.checkpoint import Checkpoint, CheckpointError, interrupted, resume_command


class Killed(BaseException):
    """Stands for SIGKILL after an epoch's checkpoint (nothing after it runs)."""


def killer(after: int):
    import tf_keras as keras

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == after:
                raise Killed()

    return Kill()


def _interrupted_then_resumed(cfg, tr, va, tmp_path, after: int, clock=None):
    from brainseg.training.train import train

    ckpt = Checkpoint(tmp_path / "ck" / "run1")
    kw = {"clock": clock} if clock else {}
    with pytest.raises(Killed):
        train(cfg, tr, va, verbose=0, checkpoint=ckpt, callbacks=[killer(after)], **kw)
    state = ckpt.state()
    assert state["epoch"] == after and len(state["history"]["loss"]) == after
    return train(cfg, tr, va, verbose=0, checkpoint=ckpt, resume=state, **kw), state


def test_a_run_killed_after_its_second_of_four_epochs_resumes_to_four(make_synth, tmp_path):
    from brainseg.training.train import train

    cfg, tr, va = _arrays(make_synth)
    cfg = dataclasses.replace(cfg, epochs=4, patience=10, lr_schedule="cosine", warmup_epochs=1)
    whole = train(cfg, tr, va, verbose=0)
    resumed, state = _interrupted_then_resumed(cfg, tr, va, tmp_path, after=2)
    assert resumed.epochs_run == whole.epochs_run == 4
    assert [len(v) for v in resumed.history.values()] == [4] * len(resumed.history)
    # the epochs before the kill are the saved ones, not trained again
    assert resumed.history["loss"][:2] == state["history"]["loss"]
    # the optimizer continued: its step counter (the schedule's position) is the whole run's
    assert int(resumed.model.optimizer.iterations) == int(whole.model.optimizer.iterations) == 4 * cfg.steps_per_epoch
    # the best epoch is chosen over all four and its weights are the ones returned
    dice = resumed.history["val_patient_dice"]
    assert resumed.best_epoch == int(np.argmax(dice)) and resumed.best_value == pytest.approx(max(dice))


def test_a_budgeted_run_resumes_with_its_plan_and_the_budget_it_had_spent(make_synth, tmp_path):
    cfg, tr, va = _arrays(make_synth)
    cfg = dataclasses.replace(cfg, budget_minutes=0.5)  # 30 s of fake time, 0.5 s a reading
    resumed, state = _interrupted_then_resumed(cfg, tr, va, tmp_path, after=2, clock=FakeClock(0.5))
    b = resumed.budget
    assert state["plan"]["phases"][0]["epochs_done"] == 2 and state["elapsed_s"] > 0
    assert b["actual_steps"] == b["budget_planned_steps"] > 2 * cfg.steps_per_epoch  # the plan was carried out
    assert resumed.epochs_run == b["budget_planned_epochs"]
    assert resumed.history["elapsed_min"][-1] <= 0.5  # the resumed run's clock started at the saved spend
    assert int(resumed.model.optimizer.iterations) == b["actual_steps"]  # one schedule over both parts


def test_early_stopping_counts_its_patience_across_the_interruption(make_synth, tmp_path, monkeypatch):
    import tf_keras as keras

    import brainseg.training.train

    class Flat(keras.callbacks.Callback):  # validation Dice that never improves after epoch 1
        def __init__(self, *args):
            super().__init__()

        def on_epoch_end(self, epoch, logs=None):
            logs["val_patient_dice"] = 0.5

    monkeypatch.setattr(brainseg.training.train, "PatientDice", Flat)
    cfg, tr, va = _arrays(make_synth)
    cfg = dataclasses.replace(cfg, epochs=8, patience=2, lr_schedule="cosine")
    resumed, state = _interrupted_then_resumed(cfg, tr, va, tmp_path, after=2)
    assert state["counters"]["early"]["wait"] == 1 and state["counters"]["early"]["best"] == 0.5
    # one epoch of patience was spent before the kill: the run stops after epoch 3 (counting from
    # zero again would have run to epoch 5)
    assert resumed.epochs_run == 3 and resumed.best_epoch == 0


def test_a_save_that_dies_half_way_leaves_the_last_complete_epoch(tmp_path, monkeypatch):
    import brainseg.training.checkpoint as checkpoint

    ckpt = Checkpoint(tmp_path / "run2")
    ckpt.save({"epoch": 1, "history": {"loss": [1.0]}}, {"weights": [np.ones(3)], "best": []})
    calls = []

    def dies(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(path, arrays)

    original = checkpoint._save_arrays
    monkeypatch.setattr(checkpoint, "_save_arrays", dies)
    with pytest.raises(OSError):
        ckpt.save({"epoch": 2, "history": {"loss": [1.0, 0.5]}}, {"weights": [np.zeros(3)], "best": [np.zeros(3)]})
    monkeypatch.undo()
    state = ckpt.state()
    assert state["epoch"] == 1 and ckpt.arrays("weights", state)[0].tolist() == [1.0, 1.0, 1.0]
    ckpt.save({"epoch": 2, "history": {"loss": [1.0, 0.5]}}, {"weights": [np.zeros(3)], "best": []})
    assert sorted(p.name for p in ckpt.folder.iterdir()) == ["epoch-0002", "state.json"]  # the debris went


def test_checkpoints_are_listed_newest_first_with_their_resume_command(tmp_path):
    root = tmp_path / "checkpoints"
    for run, epoch in (("a1", 1), ("b2", 3)):
        Checkpoint.of(root, run).save({"epoch": epoch, "history": {}}, {"weights": []})
    (root / "junk").mkdir()
    (root / "junk" / "state.json").write_text("{not json")
    listed = interrupted(root)
    assert [c.run_id for c, _ in listed][:2] == ["b2", "a1"]
    assert "unreadable checkpoint" in listed[2][1]["error"]
    assert resume_command(listed[0][0]) == f"brainseg train --resume --run b2 --checkpoint-dir {root}"
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        Checkpoint.of(root, "zz").state()
    Checkpoint.of(root, "a1").remove()
    assert not (root / "a1").exists() and root.exists()  # others remain


def test_a_state_file_of_another_format_is_refused_by_name(tmp_path):
    ckpt = Checkpoint(tmp_path / "r")
    ckpt.folder.mkdir()
    (ckpt.folder / "state.json").write_text(json.dumps({"epoch": 1}))
    with pytest.raises(CheckpointError, match="state.json: not a brainseg checkpoint"):
        ckpt.state()
