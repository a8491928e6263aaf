"""`brainseg app` stops its Streamlit child when it is stopped itself (SIGTERM, SIGINT, SIGHUP)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import free_port

PROJECT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, step: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, ... (after the command name)


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` and their descendants (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        todo += kids
    return found


def gone(pid: int) -> bool:
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")  # exited (a zombie has exited too)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


LAUNCHER = textwrap.dedent("""
    import sys
    from brainseg.app import launch
    sys.exit(launch.run_child([sys.executable, "-c", "import time; time.sleep(600)"]))
""")


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130),
                                         (signal.SIGHUP, 128 + signal.SIGHUP)])
def test_signal_to_the_launcher_stops_the_child(sig, status):
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=PROJECT)
    try:
        kids = wait_for(lambda: children(parent.pid), 60)
        assert kids, "the launcher started no child"
        parent.send_signal(sig)
        assert parent.wait(timeout=30) == status
        assert all(wait_for(lambda k=k: gone(k), 10) for k in kids), "the child outlived the launcher"
    finally:
        for k in children(parent.pid):
            kill(k)
        parent.kill()


def test_sigkill_of_the_launcher_still_stops_the_child():
    """PR_SET_PDEATHSIG: even a launcher killed without a chance to clean up takes its child along."""
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHER], cwd=PROJECT)
    kids = wait_for(lambda: children(parent.pid), 60)
    try:
        assert kids
        parent.kill()
        parent.wait(timeout=30)
        assert all(wait_for(lambda k=k: gone(k), 10) for k in kids), "the child outlived the launcher"
    finally:
        for k in kids:
            kill(k)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_brainseg_app_sigterm_stops_streamlit(tmp_path):
    """The real command: `brainseg app` serving on a port; SIGTERM to it closes the port."""
    port = free_port()
    exe = Path(sys.executable).with_name("brainseg")
    argv = [str(exe)] if exe.is_file() else [sys.executable, "-m", "brainseg"]
    app = subprocess.Popen([*argv, "app", "--port", str(port), "--model", str(tmp_path / "no-model")],
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "HOME": str(tmp_path)})
    try:
        assert wait_for(lambda: listening(port), 180, 0.5), "streamlit never listened"
        kids = children(app.pid)
        assert kids
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=60) == 128 + signal.SIGTERM
        assert all(wait_for(lambda k=k: gone(k), 20) for k in kids)
        assert wait_for(lambda: not listening(port), 20), f"port {port} still served after SIGTERM"
    finally:
        for k in children(app.pid):
            kill(k)
        app.kill()
