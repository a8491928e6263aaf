"""A registration is whole or nothing: what the registry holds of it afterwards is a complete version
(its description, its model card, its tags and scores) or nothing.

Registering takes many calls, and a server may refuse one of them half-way (an account that may
read a run but not write to it), a disk may fill, a process may be killed. So:

- the cheapest call the registration needs authorised comes first
  (:func:`brainseg.registry.model_registry.check_can_write` on the source run, where the card
  goes): refused there, nothing is created;
- a new version carries ``brainseg.registration=incomplete`` until every step is done, then
  ``complete``;
- a step that fails undoes what this registration created (the version, the registered model if it
  made it, the card files) and the error says what, if anything, is left;
- a version that an earlier attempt left incomplete (a killed process) is finished by the next
  registration of the same run.

No MLflow here: :mod:`brainseg.registry.model_registry` makes the calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from brainseg.registry import model_registry
from brainseg.tracking.access import USER_ENV, refused_status

TAG = model_registry.REGISTRATION_TAG
INCOMPLETE, COMPLETE = "incomplete", "complete"


class RegistrationFailed(ValueError):
    """A registration refused or failed; the message says what the registry holds of it, if anything."""


def http_status(exc: BaseException | None) -> int | None:
    """401 or 403 when ``exc`` (or an error it came from) is the server refusing: MLflow's errors
    (:func:`~brainseg.tracking.access.refused_status`) or an HTTP error of its artifact store."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = refused_status(exc) or getattr(getattr(exc, "response", None), "status_code", None)
        if code in (401, 403):
            return code
        exc = exc.__cause__ or exc.__context__
    return None


def reason(exc: BaseException) -> str:
    """What went wrong, in a few words: ``HTTP 403, user 'reader'``, ``No space left on device``."""
    status = http_status(exc)
    if status:
        user = os.environ.get(USER_ENV)
        return f"HTTP {status}" + (f", user {user!r}" if user else "")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def register_whole(name: str, model_uri: str, run_id: str, tags: dict, description: str,
                   finish: Callable[[str], None]):
    """Register ``model_uri`` of run ``run_id`` as a version of ``name`` and ``finish(version)`` it
    (its card, its scores), whole or not at all (see the module doc). A complete version of this run
    already there is returned as it is; an incomplete one is finished. Returns (ModelVersion, done
    now); :class:`RegistrationFailed` saying what is left."""
    existing = model_registry.find_version(name, run_id)
    if existing is not None and existing.tags.get(TAG) != INCOMPLETE:
        return existing, False  # complete (or registered before the tag existed)
    version = str(existing.version) if existing is not None else None
    try:
        model_registry.check_can_write(run_id)
    except Exception as exc:
        left = (f"{name} v{version} stays as an earlier attempt left it ({TAG}={INCOMPLETE})" if version
                else "nothing was registered")
        raise RegistrationFailed(f"registration of {name} from run {run_id} {_verb(exc)} before anything was "
                                 f"created ({reason(exc)}: cannot write to that run, where the version's model card "
                                 f"goes): {left}") from exc
    made_model = not model_registry.model_exists(name)
    try:
        if version is None:
            mv, _ = model_registry.register(name, model_uri, run_id, {**tags, TAG: INCOMPLETE}, description)
            version = str(mv.version)
        else:
            model_registry.set_version_tags(name, version, tags)
        finish(version)
        model_registry.set_version_tags(name, version, {TAG: COMPLETE})
    except BaseException as exc:  # Ctrl-C and SIGTERM too: undone, then the stop goes on
        left = _undo(name, run_id, version, made_model)
        if not isinstance(exc, Exception):
            raise
        shown = f"{name} v{version}" if version else name
        raise RegistrationFailed(f"registration of {shown} from run {run_id} {_verb(exc)} half-way ({reason(exc)}); "
                                 f"{left}") from exc
    return model_registry.get_version(name, version), True


def _verb(exc: BaseException) -> str:
    return "refused" if http_status(exc) else "failed"


def _undo(name: str, run_id: str, version: str | None, made_model: bool) -> str:
    """Delete what this registration created; the sentence that says what the registry holds now."""
    try:
        model_registry.undo_version(name, run_id, version, made_model)
    except Exception as exc:  # noqa: BLE001 - the server or the disk that failed the step may fail this too
        shown = f"{name} v{version}" if version else f"a version of {name}"
        return (f"undoing it failed too ({reason(exc)}): {shown} may be left, tagged {TAG}={INCOMPLETE}; "
                f"registering run {run_id} again finishes it")
    if version is None and not made_model:
        return "nothing was registered"
    undone = [f"v{version}"] if version else []
    undone += [f"the registered model {name} it had created"] if made_model else []
    return f"undone ({' and '.join(undone)} deleted): nothing of it is left in the registry"
