"""Per-epoch checkpoints of a training run, so that a killed run resumes (``brainseg train --resume``).

One folder per MLflow run, ``<root>/<run_id>/``, beside the working folder's ``mlflow.db`` by
default (``checkpoints/``): ``state.json`` (the epoch, the history, the best epoch, the budget
plan, the schedule, the callbacks' counters, the settings the run started with) and one
``epoch-NNNN/`` folder of NumPy arrays (``weights.npz``, ``optimizer.npz``, ``best.npz``; a run
whose training ended keeps ``trained.npz``, the restored network). A save writes the new folder
under a temporary name, renames it, then replaces ``state.json`` atomically (``os.replace``) and
only then removes the previous folder: a crash at any moment leaves the last complete epoch
readable. A finished run's folder is removed; :func:`interrupted` lists the rest.

Pure I/O of NumPy arrays and JSON: no TensorFlow, no MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

STATE = "state.json"
DEFAULT_ROOT = Path("checkpoints")
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the resume asked for."""


def _save_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, *arrays)
        fh.flush()
        os.fsync(fh.fileno())


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


@dataclasses.dataclass
class Checkpoint:
    """The checkpoint folder of one run (``root / run_id``); ``meta`` (what the run was started
    with: settings, options) goes into every save."""

    folder: Path
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, root: Path | str, run_id: str, meta: dict | None = None) -> Checkpoint:
        return cls(Path(root) / run_id, dict(meta or {}))

    @classmethod
    def reopen(cls, root: Path | str, run_id: str) -> tuple[Checkpoint, dict]:
        """The checkpoint of run ``run_id`` under ``root`` and its state (:class:`CheckpointError` if none)."""
        ckpt = cls(Path(root) / run_id)
        state = ckpt.state()
        ckpt.meta = dict(state.get("meta") or {})
        return ckpt, state

    @property
    def run_id(self) -> str:
        return self.folder.name

    def exists(self) -> bool:
        return (self.folder / STATE).is_file()

    def state(self) -> dict:
        """``state.json``; :class:`CheckpointError` naming the file when it is missing or unreadable."""
        path = self.folder / STATE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no checkpoint here (see `brainseg checkpoints`)") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or "arrays" not in state:
            raise CheckpointError(f"{path}: not a brainseg checkpoint of format {FORMAT}")
        return state

    def arrays(self, name: str, state: dict | None = None) -> list[np.ndarray]:
        """The arrays ``name`` (``weights``, ``optimizer``, ``best``, ``trained``) of the saved epoch."""
        state = self.state() if state is None else state
        path = self.folder / state["arrays"] / f"{name}.npz"
        try:
            return _load_arrays(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint arrays ({exc})") from None

    def save(self, state: dict, arrays: dict[str, list[np.ndarray]]) -> None:
        """Write ``arrays`` and ``state`` as the run's checkpoint, atomically (see the module doc)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{int(state.get('epoch', 0)):04d}{'-trained' if 'trained' in arrays else ''}"
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for key, values in arrays.items():
            _save_arrays(tmp / f"{key}.npz", values)
        previous = self._current()
        final = self.folder / name
        if final.exists() and final.name != previous:
            shutil.rmtree(final)
        if final.name == previous:  # the same epoch again (the trained copy of a last epoch): keep both
            final = self.folder / f"{name}-{int(time.time())}"
        os.replace(tmp, final)
        doc = {**state, "meta": self.meta, "format": FORMAT, "arrays": final.name, "run_id": self.run_id,
               "written_at": time.time()}
        tmp_state = self.folder / f".{STATE}.tmp-{os.getpid()}"
        with open(tmp_state, "w") as fh:
            json.dump(doc, fh, indent=1, default=float)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_state, self.folder / STATE)
        for old in self.folder.iterdir():  # earlier epochs and temporary folders of a crashed save
            if old.is_dir() and old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)

    def update(self, **fields) -> None:
        """Change fields of ``state.json`` (atomically), e.g. why the run stopped."""
        doc = {**self.state(), **fields}
        tmp = self.folder / f".{STATE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(doc, indent=1, default=float))
        os.replace(tmp, self.folder / STATE)

    def _current(self) -> str | None:
        try:
            return json.loads((self.folder / STATE).read_text()).get("arrays")
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """A finished run's checkpoint goes (and the root with it when nothing else is there)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:
            pass


def resume_command(ckpt: Checkpoint, root_default: Path = DEFAULT_ROOT) -> str:
    """The command that continues ``ckpt``'s run.

    >>> resume_command(Checkpoint(Path("checkpoints/abc")))
    'brainseg train --resume --run abc'
    >>> resume_command(Checkpoint(Path("/scratch/ck/abc")))
    'brainseg train --resume --run abc --checkpoint-dir /scratch/ck'
    """
    root = ckpt.folder.parent
    where = "" if root == root_default else f" --checkpoint-dir {root}"
    return f"brainseg train --resume --run {ckpt.run_id}{where}"


def interrupted(root: Path | str = DEFAULT_ROOT) -> list[tuple[Checkpoint, dict]]:
    """The checkpoints under ``root`` (runs that did not finish), newest first; unreadable ones
    are listed with an ``error`` field instead of failing the listing."""
    root = Path(root)
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        ckpt = Checkpoint(folder)
        try:
            state = ckpt.state()
            ckpt.meta = dict(state.get("meta") or {})
            found.append((ckpt, state))
        except CheckpointError as exc:
            found.append((ckpt, {"error": str(exc), "written_at": 0.0}))
    return sorted(found, key=lambda item: -float(item[1].get("written_at", 0.0)))
