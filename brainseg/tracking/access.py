"""A tracking server that refuses this process (MLflow's basic-auth app answering HTTP 401 or 403)
as one line that says what to set. No MLflow here: the CLI recognises the refusal by the error's
``error_code`` (MLflow's ``UNAUTHENTICATED``, ``PERMISSION_DENIED``) or its message.
"""

from __future__ import annotations

import os
import re

USER_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
# MLflow's error codes for a refused request (mlflow.exceptions maps them to these HTTP statuses)
_CODES = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}
_STATUS = re.compile(r"error code (401|403) != 200")


def refused_status(exc: BaseException | None) -> int | None:
    """401 or 403 when ``exc`` (or an error it was raised from) is the tracking server refusing
    the request, else None.

    >>> class MlflowException(Exception):
    ...     error_code = "PERMISSION_DENIED"
    >>> refused_status(MlflowException("Permission denied")), refused_status(ValueError("401"))
    (403, None)
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if "Mlflow" in type(exc).__name__ or "RestException" in type(exc).__name__:
            code = _CODES.get(str(getattr(exc, "error_code", "")))
            found = _STATUS.search(str(exc))
            if code or found:
                return code or int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def without_password(uri: str) -> str:
    """``uri`` without the password of its ``user:password@`` part.

    >>> without_password("https://bob:s3cret@mlflow.lab:5000"), without_password("http://127.0.0.1:5000")
    ('https://bob:***@mlflow.lab:5000', 'http://127.0.0.1:5000')
    """
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", uri)


def refusal_message(status: int, environ=os.environ) -> str:
    """The one line a refused command prints: the server (no password), what it said, what to set.

    >>> refusal_message(401, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})  # doctest: +NORMALIZE_WHITESPACE
    'the tracking server http://127.0.0.1:5000 asks for a login (HTTP 401): set MLFLOW_TRACKING_USERNAME
     and MLFLOW_TRACKING_PASSWORD to an account on that server'
    """
    server = without_password(environ.get("MLFLOW_TRACKING_URI") or "(MLFLOW_TRACKING_URI not set)")
    user = environ.get(USER_ENV)
    if status == 403:
        return (f"the tracking server {server} refused user {user!r} (HTTP 403: no permission for this "
                f"experiment or model): ask the server's admin for one, or set {USER_ENV} and "
                f"{PASSWORD_ENV} to another account")
    if user and environ.get(PASSWORD_ENV):
        return (f"the tracking server {server} refused the login of {USER_ENV}={user} (HTTP 401): check "
                f"{USER_ENV} and {PASSWORD_ENV}")
    return (f"the tracking server {server} asks for a login (HTTP 401): set {USER_ENV} and {PASSWORD_ENV} "
            "to an account on that server")
