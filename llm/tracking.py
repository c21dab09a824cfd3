"""MLflow: one run per pipeline run, shared by train, evaluate and report.

Train opens the run and records its id in its summary (metrics/train.json, `mlflow_run_id`);
evaluate and report log into that run. The store is a sqlite file in the project (mlflow.db,
artifacts in mlartifacts/) unless MLFLOW_TRACKING_URI points elsewhere. "The project" is the
workspace even inside a temporary or queued DVC experiment, which runs in a copy under
.dvc/tmp/exps/ that DVC deletes: DVC names the workspace in DVC_ROOT.

Beside it: where the store is (llm/mlflow_store.py), how the MLflow UI shows the runs
(llm/mlflow_view.py), the registry's champion gate (llm/registry.py) and Dagster Pipes
(llm/pipes.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.common import flatten, git_commit
from llm.config import Params
from llm.dvclock import training_data_hashes
from llm.io import read_json
from llm.mlflow_store import open_mlflow, tracking_uri
from llm.mlflow_view import experiment_id
from llm.pipes import open_dagster_pipes

log = logging.getLogger(__name__)


def dvc_hashes(root: Path) -> dict[str, str]:
    """DVC's hashes of the data outputs, from dvc.lock (absent outside `dvc repro`)."""
    return {f"dvc.{stage}.md5": md5 for stage, md5 in training_data_hashes(root).items()}


def run_name(params: Params, commit: str, tags: dict[str, str]) -> str:
    """A name a person can read in the runs table: the DVC experiment's name inside `dvc exp
    run` (DVC sets DVC_EXP_NAME), else the model's shape and the short git commit."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    m = params.model
    prefix = f"rung-{tags['ladder.rung']}" if "ladder.rung" in tags else "gpt"
    short = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "") if commit != "unknown" else "nogit"
    return f"{prefix}-{m.n_layer}x{m.n_embd}-{short}"


@contextlib.contextmanager
def start_run(params: Params, root: Path, tags: dict[str, str]) -> Iterator[Any]:
    """A new run with the flattened params and the provenance tags."""
    mlflow = open_mlflow(root)
    exp = experiment_id(mlflow, root, params.tracking.experiment)
    commit = git_commit(root)
    all_tags = {"git.commit": commit, **dvc_hashes(root), **tags}
    if os.environ.get("DAGSTER_RUN_ID"):
        all_tags["dagster.run_id"] = os.environ["DAGSTER_RUN_ID"]
    if os.environ.get("DVC_EXP_NAME"):
        all_tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    name = run_name(params, commit, tags)
    with mlflow.start_run(experiment_id=exp, run_name=name, log_system_metrics=params.tracking.system_metrics) as run:
        mlflow.set_tags(all_tags)
        mlflow.log_params(flatten(params.model_dump(mode="json")))
        log.info("mlflow: run %s in experiment %r at %s", run.info.run_id, params.tracking.experiment,
                 tracking_uri(root))
        yield run


@contextlib.contextmanager
def resume_run(train_summary: Path, root: Path, params: Params) -> Iterator[Any]:
    """The run that trained the model (its id is in the train summary); a new one if this
    tracking store does not know it."""
    mlflow = open_mlflow(root)
    run_id = None
    if Path(train_summary).is_file():
        run_id = read_json(train_summary).get("mlflow_run_id")
    if run_id:
        try:
            mlflow.get_run(run_id)
        except Exception:  # noqa: BLE001 - any lookup failure means "not in this store"
            log.warning("mlflow: run %s is not in %s; starting a new run", run_id, tracking_uri(root))
            run_id = None
    if run_id:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
    else:
        with start_run(params, root, {"note": "model trained outside this tracking store"}) as run:
            yield run


class Tracker:
    """One training run in MLflow: per-step metrics sent in batches, the summary and the model
    at the end. A context manager: the run is open inside it."""

    def __init__(self, params: Params, root: Path, tags: dict[str, str]):
        self.params, self.root, self.tags = params, root, tags
        self.pending: list = []
        self._ctx = None
        self.run = None
        self.pipes = None

    def __enter__(self) -> Tracker:
        self._ctx = start_run(self.params, self.root, self.tags)
        self.run = self._ctx.__enter__()
        self.pipes = open_dagster_pipes()
        return self

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.pipes is not None and ("tokens_per_sec" in metrics or "val_loss" in metrics):
            self.pipes.report_custom_message({"step": step, **metrics})  # live in Dagster, at each log line
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.run is not None:
            import mlflow

            mlflow.MlflowClient().log_batch(self.run.info.run_id, metrics=self.pending)
            self.pending = []

    def finish(self, final_dir: Path, summary: dict) -> dict:
        """The summary's numbers and the final model into the run; returns the run's ids."""
        import mlflow

        self.flush()
        mlflow.log_metrics({k: float(v) for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_artifacts(str(final_dir), artifact_path="model")
        return {"mlflow_run_id": self.run.info.run_id, "mlflow_experiment_id": self.run.info.experiment_id}

    def __exit__(self, exc_type, *exc) -> None:
        if self.pipes is not None:
            self.pipes.close()
        if self._ctx is not None:
            self.flush()
            self._ctx.__exit__(exc_type, *exc)


class NullTracker:
    """The tracker of a process that does not track (ranks other than 0): does nothing."""

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def log(self, metrics: dict[str, float], step: int) -> None:
        return None

    def finish(self, final_dir: Path, summary: dict) -> dict:
        return {}
