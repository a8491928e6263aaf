"""The study's database going away for a while (a PostgreSQL restart): workers wait, not die.

:func:`~brainseg.tune.plan.make_storage` pre-pings pooled connections, so a connection that a
restart closed is replaced before its next use; without more, the replacement fails while the
server is down, and so would the heartbeat thread (silently: the trial then looks dead to the other
workers), ``trial.report``, ``set_user_attr`` and ``study.tell``. :func:`wait_for_database` makes
a worker wait instead, for at most ``wait_s`` seconds:

- a new connection is tried again every second (SQLAlchemy's ``do_connect`` event), which covers
  every operation that starts while the server is down or starting up;
- the operations that may run twice without harm (the heartbeat, attributes, intermediate values,
  reads) run again when the server drops their connection in the middle of one.

A trial whose worker really died is the heartbeat's (:mod:`brainseg.tune.runs`: FAIL, retried once).
SQLite and journal storages are left as they are.
"""

from __future__ import annotations

import functools
import logging
import time

import optuna
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

WAIT_S = 60.0
REPEATABLE = ("record_heartbeat", "set_trial_user_attr", "set_trial_system_attr", "set_trial_intermediate_value",
              "get_trial", "get_all_trials", "get_study_user_attrs", "get_study_system_attrs", "get_study_id_from_name",
              "get_best_trial", "get_trial_param", "get_trial_user_attrs", "get_trial_system_attrs")


def connection_lost(exc: BaseException) -> bool:
    """True if ``exc`` (a storage error) says the database connection broke, not that a query was wrong."""
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    return isinstance(cause, DBAPIError) and bool(cause.connection_invalidated)


def _connect_patiently(wait_s: float, pause_s: float = 1.0):
    def do_connect(dialect, conn_rec, cargs, cparams):
        end, tries = time.monotonic() + wait_s, 0
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                if time.monotonic() + pause_s > end:
                    raise
                if not tries:
                    log.warning("study database unreachable (%s); trying again for up to %.0f s",
                                str(exc).splitlines()[0][:200], wait_s)
                tries += 1
                time.sleep(pause_s)

    return do_connect


def _repeat_on_lost_connection(method, wait_s: float, pause_s: float = 1.0):
    @functools.wraps(method)
    def call(*args, **kwargs):
        end = time.monotonic() + wait_s
        while True:
            try:
                return method(*args, **kwargs)
            except optuna.exceptions.StorageInternalError as exc:
                if not connection_lost(exc) or time.monotonic() + pause_s > end:
                    raise
                time.sleep(pause_s)

    return call


def wait_for_database(storage, wait_s: float = WAIT_S):
    """``storage`` (an Optuna storage), waiting up to ``wait_s`` seconds for a database server
    that went away (see the module). Returns it."""
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name == "sqlite":
        return storage
    event.listen(engine, "do_connect", _connect_patiently(wait_s))
    for name in REPEATABLE:
        setattr(storage, name, _repeat_on_lost_connection(getattr(storage, name), wait_s))
    return storage
