"""Training progress on the console: a rich bar on a terminal, one compact line per epoch otherwise.

Keras' own bar (``verbose=1``) written to a file (DVC, CI, ``mlflow run``) becomes one line of
1,200-2,100 backspace-separated characters per epoch. ``brainseg train`` therefore runs Keras with
``verbose=0`` and adds :func:`epoch_progress`'s callback:

- output is not a terminal: :func:`epoch_line` per epoch, e.g. ``epoch 3/30  loss 0.512  dice 0.408  val_loss 0.611
  val_patient_dice 0.532 (best 0.540, epoch 2)  lr 0.001  12.3 s``;
- a terminal: a rich bar over the epochs with the last epoch's figures (the same as its line) and a
  second row with the steps of the current epoch.
"""

from __future__ import annotations

import math
import sys

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
