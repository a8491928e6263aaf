"""A quiet console: library start-up noise off by default, shown with ``--verbose``.

What is silenced (every entry point imports :mod:`brainseg.settings.keras_env`, which calls
:func:`install` before anything loads TensorFlow; ``brainseg --verbose`` or
``BRAINSEG_VERBOSE=1`` calls :func:`uninstall` / skips it):

- TensorFlow's C++ logs (``TF_CPP_MIN_LOG_LEVEL=3``: the cuInit error of every CPU machine) and
  the absl lines printed before absl is initialised ("All log messages before
  absl::InitializeLog()", oneDNN, "Could not find cuda drivers"), which no variable controls:
  the process's stderr (file descriptor 2) is muted while ``tensorflow`` imports, and replayed
  if the import fails;
- segmentation-models' banner ("Segmentation Models: using `tf.keras` framework."), printed on
  import: stdout is redirected while it imports;
- MLflow's INFO lines (database creation, new experiment) and artifact progress bars, and the
  known harmless Python warnings in :data:`HARMLESS_WARNINGS` (all name no action a user can take).

Nothing here imports TensorFlow or MLflow.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import io
import logging
import os
import re
import sys
import tempfile
import warnings

VERBOSE_ENV = "BRAINSEG_VERBOSE"

# Set only when absent, so a user's own setting wins; restored by uninstall().
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",                      # C++ INFO/WARNING/ERROR (cuInit) lines
    "GRPC_VERBOSITY": "ERROR",
    "MLFLOW_LOGGING_LEVEL": "WARNING",                # "Creating initial MLflow database tables..."
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # tqdm bars: 2,000-character lines in a log file
    "TQDM_DISABLE": "1",
}

# (message regex, category): each is harmless and names nothing the user can act on.
HARMLESS_WARNINGS = (
    ("The specified dataset source can be interpreted in multiple ways", UserWarning),
    ("You are saving your model as an HDF5 file", UserWarning),
    ("Hint: Inferred schema contains integer", UserWarning),
    (".*is experimental", Warning),
    (".*is an experimental feature", Warning),  # optuna: heartbeat_interval, JournalStorage, ...
    ("Attempting to set identical", UserWarning),  # matplotlib, optuna plots of one-point studies
    ("Some regimes for parameter", Warning),
    (".*Passing a Python object as", Warning),
    (".*`input_example` ", Warning),
    (".*Encountered an unexpected error while inferring pip requirements", Warning),
    (".*Distutils was imported before Setuptools", Warning),
    (".*np\\.find_common_type is deprecated", DeprecationWarning),
    (".*pkg_resources is deprecated", Warning),
    ("The number of trials is too small to compute importances", UserWarning),  # optuna, tiny studies
)
QUIET_LOGGERS = {"tensorflow": logging.ERROR, "absl": logging.ERROR, "h5py": logging.ERROR,
                 "mlflow": logging.WARNING, "alembic": logging.WARNING, "optuna": logging.WARNING,
                 "matplotlib": logging.WARNING, "PIL": logging.WARNING}

# logger -> regexes of harmless log records it emits (a logging.Filter drops just those)
HARMLESS_LOG_RECORDS = {
    "mlflow.pyfunc": ("Passing a Python object as `python_model`",),
    "mlflow.models.model": ("Model logged without a signature", "Input example should be provided"),
    "mlflow.data.dataset_source_registry": ("The specified dataset source can be interpreted",),
}

_state: dict = {"installed": False, "env": {}, "filters": None, "levels": {}}


class HarmlessRecords(logging.Filter):
    """Drops log records whose message matches one of ``patterns`` (re.search)."""

    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


_LOG_FILTERS = {name: HarmlessRecords(patterns) for name, patterns in HARMLESS_LOG_RECORDS.items()}


def verbose_requested(env=None) -> bool:
    """True when ``BRAINSEG_VERBOSE`` asks for the libraries' own output."""
    return (os.environ if env is None else env).get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def muted_stderr_fd():
    """Send file descriptor 2 (C/C++ writers included) to a scratch file for the block; replay it
    to stderr if the block raises, so a failing import still explains itself."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreter): nothing to mute
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))


@contextlib.contextmanager
def muted_stdout():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _after_tensorflow() -> None:
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    absl = sys.modules.get("absl.logging")
    if absl is not None:
        absl.set_verbosity(absl.ERROR)


# top-level module -> (muting context, what to do once it is loaded)
_MUTED_IMPORTS = {"tensorflow": (muted_stderr_fd, _after_tensorflow),
                  "segmentation_models": (muted_stdout, None)}


class _MutedLoader(importlib.abc.Loader):
    """Runs the real loader's ``exec_module`` inside a muting context."""

    def __init__(self, inner, mute, after):
        self._inner, self._mute, self._after = inner, mute, after

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        with self._mute():
            self._inner.exec_module(module)
        if self._after:
            self._after()

    def __getattr__(self, name):  # get_data, get_resource_reader, ... of the real loader
        return getattr(self._inner, name)


class _MutedImports(importlib.abc.MetaPathFinder):
    """Finds the real spec of a noisy top-level package and wraps its loader."""

    def __init__(self):
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name not in _MUTED_IMPORTS or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return spec
        mute, after = _MUTED_IMPORTS[name]
        spec.loader = _MutedLoader(spec.loader, mute, after)
        return spec


_FINDER = _MutedImports()


def install() -> None:
    """Quiet mode (idempotent): environment, warning filters, logger levels, muted imports."""
    if _state["installed"]:
        return
    _state["installed"] = True
    _state["env"] = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    os.environ.update(_state["env"])
    _state["filters"] = list(warnings.filters)
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    warnings.filterwarnings("ignore", category=FutureWarning)
    _state["levels"] = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, record_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(record_filter)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    if "tensorflow" in sys.modules:
        _after_tensorflow()


def uninstall() -> None:
    """Undo :func:`install` (``--verbose``): effective for libraries not loaded yet."""
    if not _state["installed"]:
        return
    _state["installed"] = False
    for key in _state["env"]:
        os.environ.pop(key, None)
    if _state["filters"] is not None:
        warnings.filters[:] = _state["filters"]
        warnings._filters_mutated()  # noqa: SLF001 - the documented way resets the whole list
    for name, level in _state["levels"].items():
        logging.getLogger(name).setLevel(level)
    for name, record_filter in _LOG_FILTERS.items():
        logging.getLogger(name).removeFilter(record_filter)
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_FINDER)


def configure(verbose: bool) -> None:
    """The CLI's ``--verbose``: libraries speak (and subprocesses, through the environment)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        uninstall()
    else:
        install()
