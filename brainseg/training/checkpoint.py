"""Per-epoch checkpoints of a training run, so that a killed run resumes (``brainseg train --resume``).

One folder per MLflow run, ``<root>/<run_id>/``, beside the working folder's ``mlflow.db`` by
default (``checkpoints/``): ``state.json`` (the epoch, the history, the best epoch, the budget
plan, the schedule, the callbacks' counters, the settings the run started with) and one
``epoch-NNNN/`` folder of NumPy arrays (``weights.npz``, ``optimizer.npz``, ``best.npz``; a run
whose training ended keeps ``trained.npz``, the restored network). A save writes the new folder
under a temporary name, renames it, then replaces ``state.json`` atomically (``os.replace``) and
only then removes the previous folder: a crash at any moment leaves the last complete epoch
readable. A save that fails deletes what it wrote; on a full disk it notes why in ``state.json`` and
raises :class:`DiskFull` (one line: the epoch kept, the resume command). A finished run's folder is
removed; :func:`interrupted` lists the rest.

One process at a time: the process that trains a run holds an exclusive ``flock`` on the folder's
``.lock`` (from its first save, or from :meth:`Checkpoint.reopen` for a resume) for as long as it
lives; the file names the holder (pid, host, since when, the command). A second process is refused
at once (:class:`CheckpointBusy`, naming the holder); the OS releases the lock when the holder dies,
even by SIGKILL, so a killed run never blocks its resume. :meth:`Checkpoint.verify` checks a
checkpoint whole (every array file readable, the network it describes, the epochs it claims)
before a resume touches its MLflow run.

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

from brainseg.settings import locks
from brainseg.training.full_disk import DISK_FULL, DiskFull, disk_full, error_chain, written_path

STATE = "state.json"
LOCK = ".lock"
DEFAULT_ROOT = Path("checkpoints")
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the resume asked for."""


class CheckpointBusy(CheckpointError):
    """Another process is training this run (it holds the checkpoint's lock)."""


def disk_full_stop(ckpt: Checkpoint, exc: BaseException) -> DiskFull:
    """Note in ``ckpt`` that the disk filled while its model was logged; the one-line error to raise."""
    try:
        ckpt.update(stopped_by=DISK_FULL)
        noted = ""
    except (OSError, CheckpointError):
        noted = " (too full even to note why in its state.json)"
    where = next((f" at {path}" for path in map(written_path, error_chain(exc)) if path), "")
    return DiskFull(f"{DISK_FULL}{where}: no model was kept in the store (what was written is deleted); the "
                    f"trained network is kept in {ckpt.folder}/{noted}: free some space, then {resume_command(ckpt)}")


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
    _lock_file = None  # the open lock file while this process holds the lock (not a field)

    @classmethod
    def of(cls, root: Path | str, run_id: str, meta: dict | None = None) -> Checkpoint:
        return cls(Path(root) / run_id, dict(meta or {}))

    @classmethod
    def reopen(cls, root: Path | str, run_id: str) -> tuple[Checkpoint, dict]:
        """The checkpoint of run ``run_id`` under ``root`` and its state, locked for this process
        (:class:`CheckpointError` if none, :class:`CheckpointBusy` naming the process training it)."""
        ckpt = cls(Path(root) / run_id)
        if not ckpt.folder.is_dir():
            ckpt.state()  # the error that names it
        ckpt.lock()
        try:
            state = ckpt.state()  # read under the lock: the holder before may have finished and removed it
        except CheckpointError:
            ckpt.release()
            raise
        ckpt.meta = dict(state.get("meta") or {})
        return ckpt, state

    def lock(self) -> None:
        """Hold the run's lock (an exclusive ``flock`` on ``.lock``) until :meth:`release`, :meth:`remove`
        or the end of this process; :class:`CheckpointBusy` naming the holder when another process has it."""
        if self._lock_file is not None:
            return
        try:
            self._lock_file = locks.acquire(self.folder / LOCK)
        except locks.Busy as exc:
            raise CheckpointBusy(f"{self.folder}: run {self.run_id} is being trained by "
                                 f"{locks.holder_line(exc.holder)}: one process per run; wait for it to end (or "
                                 "stop it) and resume again") from None
        except OSError as exc:
            raise CheckpointError(f"{self.folder / LOCK}: cannot be opened ({exc.strerror or exc})") from None

    def release(self) -> None:
        """Let go of the run's lock (a process that ends lets go of it anyway)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

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
        path = self.folder / str(state["arrays"]) / f"{name}.npz"
        try:
            return _load_arrays(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
        except Exception as exc:  # noqa: BLE001 - a cut file raises EOFError, BadZipFile, OSError, ValueError...
            raise CheckpointError(f"{path}: unreadable checkpoint arrays ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]})") from None

    def verify(self, state: dict, shapes: list[tuple] | None = None, epochs: int | None = None,
               network: str = "the network") -> None:
        """Check the checkpoint whole before a resume touches its MLflow run: the epoch count and the
        history agree, the plan (``epochs``, a run without a budget) is not passed, every array file
        of the saved epoch reads to its end, and the weights fit ``network`` (``shapes``: its weight
        shapes, from the settings ``state.json`` keeps). :class:`CheckpointError` naming the file."""
        path = self.folder / STATE
        epoch, history, best = state.get("epoch"), state.get("history"), state.get("best")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise CheckpointError(f"{path}: epoch {epoch!r} is not a number of epochs done (>= 1)")
        if not isinstance(history, dict) or any(not isinstance(v, list) or len(v) != epoch for v in history.values()):
            raise CheckpointError(f"{path}: its history does not hold {epoch} epochs (edited or damaged)")
        if epochs is not None and epoch > epochs:
            raise CheckpointError(f"{path}: epoch {epoch} is past the run's plan of {epochs} epochs (train.epochs)")
        if not (isinstance(best, dict) and isinstance(best.get("epoch"), int) and -1 <= best["epoch"] < epoch
                and isinstance(best.get("value"), (int, float))):
            raise CheckpointError(f"{path}: its best epoch {best!r} is not one of its {epoch} epochs")
        name = str(state["arrays"])
        if not name or name != Path(name).name or name.startswith("."):
            raise CheckpointError(f"{path}: arrays {name!r} is not a folder of the checkpoint")
        for key in ("trained",) if state.get("trained") else ("weights", "optimizer", "best"):
            arrays = self.arrays(key, state)
            got = [tuple(a.shape) for a in arrays]
            if shapes is None or (key == "best" and not arrays):
                continue
            if key == "optimizer":  # the step counter, then two moments per trainable weight
                misfit = [g for g in got if g and g not in set(shapes)]
                fits = not misfit
            else:
                misfit = [(i, g, w) for i, (g, w) in enumerate(zip(got, shapes)) if g != w][:1]
                fits = not misfit and len(got) == len(shapes)
            if not fits:
                where = f"; first misfit {misfit[0]}" if misfit else ""
                raise CheckpointError(f"{self.folder / name / key}.npz: {len(got)} arrays that do not fit {network} "
                                      f"that {STATE} describes ({len(shapes)} weights{where}): not this run's")

    def save(self, state: dict, arrays: dict[str, list[np.ndarray]]) -> None:
        """Write ``arrays`` and ``state`` as the run's checkpoint, atomically (see the module doc);
        the first save takes the run's lock. A save that fails leaves the checkpoint as it was (what
        it wrote is deleted); on a full disk, :class:`DiskFull` naming the folder and the epoch kept."""
        try:
            self._write(state, arrays)
        except Exception as exc:
            self._discard_partial()
            if not disk_full(exc):
                raise
            saving = "the trained network" if "trained" in arrays else f"epoch {int(state.get('epoch', 0))}"
            raise self._full_while_saving(f"disk full while saving {saving}") from exc

    def _write(self, state: dict, arrays: dict[str, list[np.ndarray]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock()
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
        try:
            tmp.write_text(json.dumps(doc, indent=1, default=float))
            os.replace(tmp, self.folder / STATE)
        except OSError:
            tmp.unlink(missing_ok=True)  # no cut temporary file left on a full disk
            raise

    def _discard_partial(self) -> None:
        """Delete what a failed save wrote: every folder ``state.json`` does not name, its temporary file."""
        current = self._current()
        for entry in self.folder.iterdir() if self.folder.is_dir() else []:
            if entry.is_dir() and entry.name != current:
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(f".{STATE}.tmp-"):
                entry.unlink(missing_ok=True)

    def _full_while_saving(self, doing: str) -> DiskFull:
        """Note ``doing`` (why the run stopped) in ``state.json`` and let go of the lock; the one-line
        error naming what is kept."""
        if not self.exists():  # the first save: nothing to resume from
            self.remove()
            return DiskFull(f"{doing} in {self.folder}/: no epoch had been saved, nothing is kept: free some "
                            "space, then train again")
        kept = self.state()
        try:
            self.update(stopped_by=doing)
            noted = ""
        except (OSError, CheckpointError):
            noted = " (too full even to note why in its state.json)"
        self.release()  # the training stops here: `brainseg checkpoints` must not show it as still running
        whole = f"{'the trained network of ' if kept.get('trained') else ''}epoch {kept['epoch']}"
        return DiskFull(f"{doing} in {self.folder}/: {whole} is kept whole there, nothing of the failed save "
                        f"is left{noted}: free some space, then {resume_command(self)}")

    def _current(self) -> str | None:
        try:
            return json.loads((self.folder / STATE).read_text()).get("arrays")
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """A finished run's checkpoint goes (and the root with it when nothing else is there)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.release()
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
    >>> fold = Checkpoint(Path("checkpoints/abc")); fold.meta = {"cv": {"parent": "p1", "fold": 0}}
    >>> resume_command(fold)
    'brainseg cv --run p1'
    """
    root = ckpt.folder.parent
    where = "" if root == root_default else f" --checkpoint-dir {root}"
    if (getattr(ckpt, "meta", None) or {}).get("cv"):  # a fold of a cross-validation: the CV continues it
        return f"brainseg cv --run {ckpt.meta['cv']['parent']}{where}"
    return f"brainseg train --resume --run {ckpt.run_id}{where}"


def interrupted(root: Path | str = DEFAULT_ROOT) -> list[tuple[Checkpoint, dict]]:
    """The checkpoints under ``root`` (runs that did not finish), newest first; unreadable ones
    are listed with an ``error`` field instead of failing the listing; one another process is
    training now has a ``running`` field (its lock's holder, see :func:`brainseg.settings.locks.holder_line`)."""
    root = Path(root)
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        ckpt = Checkpoint(folder)
        holder = locks.held_by(folder / LOCK)
        try:
            state = ckpt.state()
            ckpt.meta = dict(state.get("meta") or {})
        except CheckpointError as exc:
            state = {"error": str(exc), "written_at": 0.0}
        found.append((ckpt, {**state, "running": holder} if holder is not None else state))
    return sorted(found, key=lambda item: -float(item[1].get("written_at", 0.0)))
