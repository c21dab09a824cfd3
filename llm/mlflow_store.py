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

