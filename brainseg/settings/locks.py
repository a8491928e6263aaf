"""One process at a time on one thing (a run's checkpoint, a project's pipeline): an exclusive
``flock`` on a lock file, which names its holder (pid, host, since when, the command).

The OS releases a ``flock`` when the process that holds it ends, however it ends (SIGKILL included),
so a lock never outlives its holder and nothing has to guess whether a pid is still alive; the
file's text is only read to name the holder when the lock is refused. The lock lives as long as the
open file object :func:`acquire` returns (closing it, or its garbage collection, lets go). Standard
library only.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO

TRIES, PAUSE_S = 5, 0.1  # a look at a lock (held_by) takes it for microseconds: try again before refusing


class Busy(Exception):
    """The lock is held by another process; ``holder`` is what its file says (maybe empty)."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(f"{path}: held by {holder_line(holder)}")
        self.path, self.holder = path, holder


def holder_line(holder: dict) -> str:
    """Who holds a lock, from what its file says.

    >>> holder_line({"pid": 42, "host": "gpu1", "since": 0, "command": "brainseg run"})[:22]
    'pid 42 on gpu1 since 1'
    >>> holder_line({})
    'another process (it has not said which yet)'
    """
    if not holder.get("pid"):
        return "another process (it has not said which yet)"
    since = datetime.datetime.fromtimestamp(float(holder.get("since") or 0)).strftime("%Y-%m-%d %H:%M:%S")
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {since}{command}"


def read_holder(path: Path) -> dict:
    try:
        found = json.loads(Path(path).read_text() or "{}")
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(path: Path) -> IO:
    """Take the lock of ``path`` (created if missing; its folder must exist) and write this process
    into it; the open file holds the lock. :class:`Busy` when another process holds it; OSError
    when the file cannot be opened."""
    fh = open(path, "a+")
    for attempt in range(TRIES):
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == TRIES - 1:
                fh.close()
                raise Busy(Path(path), read_holder(path)) from None
            time.sleep(PAUSE_S)
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                         "command": " ".join(["brainseg", *sys.argv[1:]])[:300]}))
    fh.flush()
    return fh


def held_by(path: Path) -> dict | None:
    """What the lock file ``path`` says about its holder when another process holds it, else None."""
    try:
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return read_holder(path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError:
        return None
    return None
