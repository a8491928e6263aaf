"""Start the page: ``streamlit run page.py`` bound to one address, settings in the environment."""

from __future__ import annotations

import os
import subprocess
import sys
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


def launch(host: str = "127.0.0.1", port: int = 8501, endpoint: str | None = None,
           model_uri: str = DEFAULT_MODEL, survival_uri: str | None = DEFAULT_SURVIVAL,
           headless: bool = True) -> int:
    """Run the page until Ctrl-C; returns Streamlit's exit status (130 after Ctrl-C)."""
    argv, env = command(host, port, endpoint, model_uri, survival_uri, headless)
    process = subprocess.Popen(argv, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=15)
        return 130
