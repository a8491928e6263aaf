"""Start the page: ``streamlit run page.py`` bound to one address, settings in the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from brainseg.app.logic import DEFAULT_MODEL, DEFAULT_SURVIVAL, AppSettings

PAGE = Path(__file__).resolve().with_name("page.py")


def command(host: str = "127.0.0.1", port: int = 8501, endpoint: str | None = None,
            model_uri: str = DEFAULT_MODEL, survival_uri: str | None = DEFAULT_SURVIVAL,
            headless: bool = True) -> tuple[list[str], dict[str, str]]:
    """The ``streamlit run`` argv and the environment that carries the page's settings.

    >>> argv, env = command(port=9000, endpoint="http://127.0.0.1:5001")
    >>> argv[argv.index("--server.port") + 1], env["BRAINSEG_APP_ENDPOINT"]
    ('9000', 'http://127.0.0.1:5001')
    """
    argv = [sys.executable, "-m", "streamlit", "run", str(PAGE),
            "--server.address", host, "--server.port", str(int(port)),
            "--server.headless", "true" if headless else "false",
            "--server.fileWatcherType", "none", "--server.runOnSave", "false",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    settings = AppSettings(model_uri=model_uri, survival_uri=survival_uri, endpoint=endpoint)
    return argv, {**os.environ, **settings.to_env()}


def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    """Linux: the child gets SIGTERM if the launcher dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stop_child(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the child, then SIGKILL it if it has not exited after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def run_child(argv: list[str], env: dict[str, str] | None = None, stop_timeout: float = 15.0) -> int:
    """Run ``argv`` until it exits; on SIGTERM, SIGINT or SIGHUP to this process, stop it first.

    Returns the child's exit status, or 128 + the signal number when a signal stopped it.
    """
    preexec = _die_with_parent if sys.platform.startswith("linux") else None

    stopping: list[int] = []

    def on_signal(signum, frame):
        if not stopping:  # the first signal stops the child; repeats while it stops are ignored
            stopping.append(signum)
            raise _Stop(signum)

    handled = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    if threading.current_thread() is threading.main_thread():  # before the child exists: no gap
        previous = {s: signal.signal(s, on_signal) for s in handled}
    process = None
    try:
        process = subprocess.Popen(argv, env=env, preexec_fn=preexec)
        return process.wait()
    except _Stop as stop:
        return 128 + stop.signum
    except KeyboardInterrupt:
        return 130
    finally:
        if process is not None:  # whatever happened above, never leave the child running
            stop_child(process, stop_timeout)
        for s, handler in previous.items():
            signal.signal(s, handler)


def launch(host: str = "127.0.0.1", port: int = 8501, endpoint: str | None = None,
           model_uri: str = DEFAULT_MODEL, survival_uri: str | None = DEFAULT_SURVIVAL,
           headless: bool = True) -> int:
    """Run the page until Ctrl-C or SIGTERM; returns Streamlit's exit status (130 after Ctrl-C,
    143 after SIGTERM). The Streamlit child is always stopped with it."""
    argv, env = command(host, port, endpoint, model_uri, survival_uri, headless)
    return run_child(argv, env)
