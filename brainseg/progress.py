"""Training progress on the console: a rich bar on a terminal, one compact line per epoch otherwise.

Keras' own bar (``verbose=1``) written to a file (DVC, CI, ``mlflow run``) becomes one line of
1,200-2,100 backspace-separated characters per epoch. ``brainseg train`` therefore runs Keras with
``verbose=0`` and adds :func:`epoch_progress`'s callback:

- output is not a terminal: :func:`epoch_line` per epoch, e.g.
  ``epoch 3/30  loss 0.512  dice 0.408  val_loss 0.611  val_patient_dice 0.532 (best 0.540, epoch 2)  lr 0.001  12.3 s``;
- a terminal: a rich bar over the epochs with the last epoch's figures (the same as its line) and a
  second row with the steps of the current epoch.
"""

from __future__ import annotations

import math
import sys
import time

# Figures shown per epoch, in this order, when Keras logs them (the rest stays in MLflow).
EPOCH_KEYS = ("loss", "dice", "val_loss", "val_dice", "val_patient_dice", "lr")
MODES = ("auto", "bar", "lines", "none")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    v = float(value)
    return f"{v:.3g}" if 0 < abs(v) < 0.001 else f"{v:.3f}"


def epoch_line(epoch: int, epochs: int, logs: dict, best: tuple[float, int] | None = None,
               seconds: float | None = None) -> str:
    """One line for a finished epoch (``epoch`` 1-based; ``best`` = (value, 1-based epoch)).

    >>> epoch_line(3, 30, {"loss": 0.5124, "val_patient_dice": 0.532, "other": 1}, (0.54, 2), 12.34)
    'epoch 3/30  loss 0.512  val_patient_dice 0.532 (best 0.540, epoch 2)  12.3 s'
    """
    parts = [f"epoch {epoch}/{epochs}"]
    for key in EPOCH_KEYS:
        if key in logs:
            text = f"{key} {_fmt(logs[key])}"
            if key == "val_patient_dice" and best is not None:
                text += f" (best {_fmt(best[0])}, epoch {best[1]})"
            parts.append(text)
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


class BestTracker:
    """The best ``val_patient_dice`` so far, as (value, 1-based epoch)."""

    def __init__(self, key: str = "val_patient_dice"):
        self.key, self.best = key, None

    def update(self, epoch: int, logs: dict) -> tuple[float, int] | None:
        value = logs.get(self.key)
        if value is not None and not math.isnan(float(value)) and (self.best is None or value > self.best[0]):
            self.best = (float(value), epoch)
        return self.best


def choose_mode(mode: str, stream=None) -> str:
    """``auto`` -> ``bar`` on a terminal, ``lines`` otherwise."""
    if mode not in MODES:
        raise ValueError(f"progress: {mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    stream = sys.stdout if stream is None else stream
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def epoch_progress(epochs: int, mode: str = "auto", write=None, console=None, label: str = "", bar=None):
    """A Keras callback reporting epochs (``None`` for mode ``none``); use with ``verbose=0``.

    ``write`` (lines mode) takes each line (default: print, flushed), prefixed with ``label`` (e.g.
    ``trial #3``); ``console`` (bar mode) is a rich Console (default: a new one on stdout). ``bar``
    (bar mode): a running rich Progress of the caller to add this training's rows to (a tuning
    study's); the caller stops it and removes the rows, else the callback owns its own.
    """
    import tf_keras as keras  # deferred: building the callback is the first use of Keras here

    mode = choose_mode(mode, getattr(console, "file", None))
    if mode == "none":
        return None
    write = write or (lambda line: print(line, flush=True))
    prefix = f"{label}  " if label else ""

    class EpochLines(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
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
            write(prefix + self.line(epoch, logs))

    if mode == "lines":
        return EpochLines()

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class EpochBar(EpochLines):
        """Rich rows: epochs done of the total with the last epoch's figures (as in its line, lr
        included), and the steps done of the current epoch."""

        def __init__(self):
            super().__init__()
            self.own = bar is None
            self.bar = bar or Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                       TextColumn("{task.fields[last]}"), TimeElapsedColumn(),
                                       console=console or Console(), transient=False)
            self.task = self.steps = None

        def on_train_begin(self, logs=None):  # again after a frozen-encoder phase: same rows
            if self.own:
                self.bar.start()
            if self.task is None:
                self.task = self.bar.add_task(label or "training", total=self.total, last="")
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

    return EpochBar()
