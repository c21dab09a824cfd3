"""Where the project's MLflow store is, and MLflow opened on it: the sqlite file beside params.yaml
(under DVC, the workspace's, even for an experiment run in a copy), or MLFLOW_TRACKING_URI's server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llm.errors import UserError


def store_root(root: Path) -> Path:
    """The folder of the project's own store (mlflow.db, mlartifacts/): root, or under DVC the same
    folder of the workspace. DVC_ROOT names the workspace's repository even when the stage runs in
    an experiment's copy of it; root's place in the repository it runs in (the nearest folder with
    .dvc/) is its place in the workspace."""
    root = Path(root).resolve()
    workspace = os.environ.get("DVC_ROOT")
    repo = next((p for p in (root, *root.parents) if (p / ".dvc").is_dir()), None)
    if not workspace or repo is None:
        return root
    return Path(workspace).resolve() / root.relative_to(repo)


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root(root) / 'mlflow.db'}"


def open_mlflow(root: Path):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        import mlflow
    except ImportError as e:  # a bare GPU node: the training path is installed, MLflow is not
        raise UserError(f"tracking.enabled is true but MLflow cannot be imported ({e}): pip install mlflow, or set "
                        "tracking: {enabled: false} in params.yaml to train without it") from None

    logging.getLogger("alembic").setLevel(logging.WARNING)
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(root))
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; put back what the user had, so the
    # project's own store never looks like a user's choice to a later call or a subprocess.
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_uri
    return mlflow


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
