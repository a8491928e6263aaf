"""Per-epoch checkpoints and resumed training (issue 27): the Keras loop continues where it was
killed, with the same weights, optimizer, schedule, budget and counters; saves are atomic."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_budget import FakeClock, _arrays

from brainseg.training.checkpoint import Checkpoint, CheckpointError, interrupted, resume_command
from brainseg.training.full_disk import DiskFull


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
    cfg = cfg.replace(epochs=4, patience=10, lr_schedule="cosine", warmup_epochs=1)
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
    cfg = cfg.replace(budget_minutes=0.5)  # 30 s of fake time, 0.5 s a reading
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
    cfg = cfg.replace(epochs=8, patience=2, lr_schedule="cosine")
    resumed, state = _interrupted_then_resumed(cfg, tr, va, tmp_path, after=2)
    assert state["counters"]["early"]["wait"] == 1 and state["counters"]["early"]["best"] == 0.5
    # one epoch of patience was spent before the kill: the run stops after epoch 3 (counting from
    # zero again would have run to epoch 5)
    assert resumed.epochs_run == 3 and resumed.best_epoch == 0


@pytest.mark.parametrize("error, raised", [(errno.EIO, OSError), (errno.ENOSPC, DiskFull)])
def test_a_save_that_dies_half_way_leaves_the_last_complete_epoch(tmp_path, monkeypatch, error, raised):
    import brainseg.training.checkpoint as checkpoint

    ckpt = Checkpoint(tmp_path / "run2")
    ckpt.save({"epoch": 1, "history": {"loss": [1.0]}}, {"weights": [np.ones(3)], "best": []})
    calls = []

    def dies(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(error, os.strerror(error))
        return original(path, arrays)

    original = checkpoint._save_arrays
    monkeypatch.setattr(checkpoint, "_save_arrays", dies)
    with pytest.raises(raised):
        ckpt.save({"epoch": 2, "history": {"loss": [1.0, 0.5]}}, {"weights": [np.zeros(3)], "best": [np.zeros(3)]})
    monkeypatch.undo()
    state = ckpt.state()
    assert state["epoch"] == 1 and ckpt.arrays("weights", state)[0].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in ckpt.folder.iterdir()) == [".lock", "epoch-0001", "state.json"]  # nothing half
    ckpt.save({"epoch": 2, "history": {"loss": [1.0, 0.5]}}, {"weights": [np.zeros(3)], "best": []})
    assert sorted(p.name for p in ckpt.folder.iterdir()) == [".lock", "epoch-0002", "state.json"]  # the debris went


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


# ------------------------------------------------------------------ one process per run (issue 37)
def _saved(root, run="r1", epoch=2, shapes=((3, 3, 1, 4), (4,))):
    """A checkpoint of ``epoch`` epochs of a tiny network with weights of ``shapes``."""
    weights = [np.zeros(s, np.float32) for s in shapes]
    ckpt = Checkpoint.of(root, run)
    ckpt.save({"epoch": epoch, "history": {"loss": [1.0] * epoch, "val_patient_dice": [0.1] * epoch},
               "best": {"value": 0.1, "epoch": 0}},
              {"weights": weights, "optimizer": [np.int64(3), *weights, *weights], "best": weights})
    ckpt.release()
    return ckpt


def test_a_second_holder_of_a_run_is_refused_naming_the_first(tmp_path):
    from brainseg.training.checkpoint import CheckpointBusy, interrupted

    _saved(tmp_path)
    first, _ = Checkpoint.reopen(tmp_path, "r1")  # holds the lock (as `brainseg train --resume` does)
    with pytest.raises(CheckpointBusy, match=rf"r1: run r1 is being trained by pid {os.getpid()} on "
                                             rf"{socket.gethostname()} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d"):
        Checkpoint.reopen(tmp_path, "r1")
    [(_, state)] = interrupted(tmp_path)
    assert state["running"]["pid"] == os.getpid()
    first.release()
    second, state = Checkpoint.reopen(tmp_path, "r1")  # free again
    assert state["epoch"] == 2 and interrupted(tmp_path)[0][1].get("running") is not None
    second.remove()  # a finished run: the folder and its lock go
    assert not (tmp_path / "r1").exists()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    """The holder dies by SIGKILL (no clean-up of any kind): the OS lets go of its flock."""
    _saved(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from brainseg.training.checkpoint import Checkpoint; "
        f"held = Checkpoint.reopen({str(tmp_path)!r}, 'r1'); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"being trained by pid {holder.pid} "):
            Checkpoint.reopen(tmp_path, "r1")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    ckpt, state = Checkpoint.reopen(tmp_path, "r1")  # at once: no waiting for a timeout
    assert state["epoch"] == 2 and json.loads((ckpt.folder / ".lock").read_text())["pid"] == os.getpid()


def test_a_run_that_finished_while_the_resume_waited_is_not_recreated(tmp_path):
    ckpt = _saved(tmp_path)
    ckpt.remove()
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        Checkpoint.reopen(tmp_path, "r1")
    assert not (tmp_path / "r1").exists()  # the lock did not bring the folder back


SHAPES = [(3, 3, 1, 4), (4,)]


def _damage(kind):
    def cut(folder, name):
        path = folder / "epoch-0002" / f"{name}.npz"
        path.write_bytes(path.read_bytes()[:-40])

    def state_edit(**fields):
        def edit(folder):
            state = json.loads((folder / "state.json").read_text())
            state.update(fields)
            (folder / "state.json").write_text(json.dumps(state))
        return edit

    return {
        "a truncated weights.npz": (lambda f: cut(f, "weights"), r"epoch-0002/weights.npz: unreadable checkpoint"),
        "a truncated optimizer.npz": (lambda f: cut(f, "optimizer"), r"optimizer.npz: unreadable checkpoint"),
        "a missing best.npz": (lambda f: (f / "epoch-0002" / "best.npz").unlink(),
                               r"epoch-0002/best.npz: missing \(the checkpoint is incomplete\)"),
        "an epoch beyond the plan": (state_edit(epoch=9, history={"loss": [1.0] * 9}),
                                     r"state.json: epoch 9 is past the run's plan of 4 epochs"),
        "a history shorter than the epochs": (state_edit(epoch=3), r"state.json: its history does not hold 3 epochs"),
        "another network": (None, r"weights.npz: 2 arrays that do not fit plain_unet that state.json describes"),
        "arrays outside the folder": (state_edit(arrays="../../elsewhere"), r"is not a folder of the checkpoint"),
        "a best epoch it never had": (state_edit(best={"value": 0.5, "epoch": 7}), r"best epoch .* is not one of"),
    }[kind]


@pytest.mark.parametrize("kind", ["a truncated weights.npz", "a truncated optimizer.npz", "a missing best.npz",
                                  "an epoch beyond the plan", "a history shorter than the epochs", "another network",
                                  "arrays outside the folder", "a best epoch it never had"])
def test_a_damaged_or_tampered_checkpoint_is_refused_whole_naming_the_file(tmp_path, kind):
    ckpt = _saved(tmp_path)
    _saved(tmp_path, "good")
    damage, message = _damage(kind)
    if damage is not None:
        damage(ckpt.folder)
    shapes = [(3, 3, 1, 8), (8,)] if kind == "another network" else SHAPES
    ckpt, state = Checkpoint.reopen(tmp_path, "r1")
    with pytest.raises(CheckpointError, match=message):
        ckpt.verify(state, shapes, epochs=4, network="plain_unet")
    good, state = Checkpoint.reopen(tmp_path, "good")
    good.verify(state, SHAPES, epochs=4, network="plain_unet")  # an intact one passes
