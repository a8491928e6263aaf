"""A full disk, recognised however a library wrapped it: the error a training raises when its
checkpoint or its logged model could not be written (one line), and what the failed write was writing.

Pure inspection of exceptions: no file is touched here (:mod:`brainseg.training.checkpoint` does).
"""

from __future__ import annotations

import errno
import shutil


class DiskFull(Exception):
    """The disk filled while the run's model was logged or an epoch was saved; the checkpoint keeps the
    training up to its last whole epoch (one line)."""


DISK_FULL = "disk full while logging the model"


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it came from, is a full disk (ENOSPC, EDQUOT), however a library
    wrapped it (shutil.Error, h5py's OSError without an errno, MLflow's exceptions)."""
    return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
               or "No space left on device" in str(e) or "Disk quota exceeded" in str(e) for e in error_chain(exc))


def written_path(exc: BaseException) -> str | None:
    """The file a failed write was writing: a copy's destination (``filename2``; shutil.Error's list)."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        return str(exc.args[0][0][1])
    return (exc.filename2 or exc.filename) if isinstance(exc, OSError) else None


def error_chain(exc: BaseException | None) -> list[BaseException]:
    found: list[BaseException] = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found
