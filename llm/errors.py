"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import os


class UserError(Exception):
    """Bad params, a missing source, an empty corpus: the message says what and where."""


class DataValidationError(UserError):
    """A table failed its schema. The message lists failing checks and rows."""


def server_problem(exc: BaseException) -> str | None:
    """One line for an MLflow server that refused this client or did not answer, naming the
    server and the variable to fix; None for any other error."""
    if "mlflow" not in type(exc).__module__:
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    code, text = getattr(exc, "error_code", ""), str(exc)
    endpoint = text.split("endpoint ", 1)[1].split(" ", 1)[0] if "endpoint " in text else "this request"
    if code == "UNAUTHENTICATED":
        if not user:
            return (f"the MLflow server at {uri} asks for a login: set MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD")
        return (f"the MLflow server at {uri} refused the login of {user!r}: check MLFLOW_TRACKING_PASSWORD "
                "(and MLFLOW_TRACKING_USERNAME)")
    if code == "PERMISSION_DENIED":
        return (f"the MLflow server at {uri} does not let {user!r} do {endpoint}: ask its admin for EDIT on the "
                "experiment and the registered model (python -m pipelines.serve user NAME --permission EDIT), or "
                "set MLFLOW_TRACKING_USERNAME to a user that has it")
    if uri and ("Max retries exceeded" in text or "Connection refused" in text or "failed with exception" in text):
        return (f"the MLflow server at {uri} does not answer ({endpoint} failed after MLflow's retries): start it, or "
                "point MLFLOW_TRACKING_URI at a server that runs")
    return None
