"""Epoch progress as Keras callbacks: one line per epoch, or rich rows (:func:`epoch_progress`).

Kept apart from :mod:`brainseg.training.progress` (the pure formatting) so that the CLI starts without
loading Keras: callers import this module when they train.
"""

from __future__ import annotations

import time

import tf_keras as keras
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from brainseg.training.progress import BestTracker, choose_mode, epoch_line


class EpochLines(keras.callbacks.Callback):
    """``write`` one line per finished epoch, prefixed with ``label``."""

    def __init__(self, epochs: int, write, label: str = ""):
        super().__init__()
        self.write, self.label, self.prefix = write, label, f"{label}  " if label else ""
        self.best, self.start, self.total = BestTracker(), 0.0, epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.monotonic()

    def line(self, epoch, logs) -> str:
        """The finished epoch's line (0-based ``epoch``), with the learning rate if Keras omits it."""
        logs = dict(logs or {})
        if "lr" not in logs and getattr(self.model, "optimizer", None) is not None:
            logs["lr"] = float(keras.backend.get_value(self.model.optimizer.learning_rate))
        best = self.best.update(epoch + 1, logs)
        self.total = int(logs.get("plan_epochs", self.total))  # a budget re-plans the epochs
        return epoch_line(epoch + 1, self.total, logs, best, time.monotonic() - self.start)

    def on_epoch_end(self, epoch, logs=None):
        self.write(self.prefix + self.line(epoch, logs))


class EpochBar(EpochLines):
    """Rich rows: epochs done of the total with the last epoch's figures (as in its line, lr
    included), and the steps done of the current epoch. ``bar``: a running rich Progress of the
    caller to add the rows to (the caller stops it); else the callback owns one on ``console``."""

    def __init__(self, epochs: int, write, label: str = "", bar=None, console=None):
        super().__init__(epochs, write, label)
        self.own = bar is None
        self.bar = bar or Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TextColumn("{task.fields[last]}"), TimeElapsedColumn(),
                                   console=console or Console(), transient=False)
        self.task = self.steps = None

    def on_train_begin(self, logs=None):  # again after a frozen-encoder phase: same rows
        if self.own:
            self.bar.start()
        if self.task is None:
            self.task = self.bar.add_task(self.label or "training", total=self.total, last="")
            self.steps = self.bar.add_task("  steps", total=None, last="")

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self.bar.reset(self.steps, total=(getattr(self, "params", None) or {}).get("steps"), last=f"epoch {epoch + 1}")

    def on_train_batch_end(self, batch, logs=None):
        self.bar.update(self.steps, completed=batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        line = self.line(epoch, logs)
        self.bar.update(self.task, completed=epoch + 1, total=self.total, last=line.split("  ", 1)[-1])

    def on_train_end(self, logs=None):
        if self.own:
            self.bar.stop()


def epoch_progress(epochs: int, mode: str = "auto", write=None, console=None, label: str = "", bar=None):
    """A Keras callback reporting epochs (``None`` for mode ``none``); use with ``verbose=0``.

    ``write`` (lines mode) takes each line (default: print, flushed), prefixed with ``label`` (e.g.
    ``trial #3``); ``console`` (bar mode) is a rich Console (default: a new one on stdout). ``bar``
    (bar mode): a running rich Progress of the caller to add this training's rows to (a tuning
    study's); the caller stops it and removes the rows, else the callback owns its own.
    """
    mode = choose_mode(mode, getattr(console, "file", None))
    if mode == "none":
        return None
    write = write or (lambda line: print(line, flush=True))
    if mode == "lines":
        return EpochLines(epochs, write, label)
    return EpochBar(epochs, write, label, bar=bar, console=console)
