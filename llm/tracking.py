"""MLflow: one run per pipeline run, shared by train, evaluate and report.

Train opens the run and records its id in its summary (metrics/train.json, `mlflow_run_id`);
evaluate and report log into that run. The store is a sqlite file in the project (mlflow.db,
artifacts in mlartifacts/) unless MLFLOW_TRACKING_URI points elsewhere. "The project" is the
workspace even inside a temporary or queued DVC experiment, which runs in a copy under
.dvc/tmp/exps/ that DVC deletes: DVC names the workspace in DVC_ROOT.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.common import git_commit
from llm.config import Params
from llm.dvclock import training_data_hashes
from llm.errors import UserError
from llm.io import read_json

log = logging.getLogger(__name__)
CHAMPION = "champion"


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


def _mlflow(root: Path):
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


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def dvc_hashes(root: Path) -> dict[str, str]:
    """DVC's hashes of the data outputs, from dvc.lock (absent outside `dvc repro`)."""
    return {f"dvc.{stage}.md5": md5 for stage, md5 in training_data_hashes(root).items()}


# MLflow 3 opens an experiment in its GenAI view (traces) unless it is marked as model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3.17's UI takes the view from a global workflow type (GenAI unless the browser has kept
# another choice), read from the URL first: the links the project prints carry it.
TRAINING_VIEW = "workflowType=machine_learning"
# A saved view of the runs table (the UI's "Views" menu keeps them as experiment tags): the
# headline metrics as columns, the best val_bpb first. The links the project prints open it.
RUNS_VIEW_ID = "llm-training-runs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_ID}"
HEADLINE_METRICS = ("val_bpb", "val_loss", "tokens_per_sec", "mfu")
RUNS_VIEW_STATE = {
    "searchFilter": "", "orderByKey": "metrics.`val_bpb`", "orderByAsc": True, "startTime": "ALL",
    "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
    "selectedColumns": ["attributes.`Source`", "attributes.`Models`", *(f"metrics.`{m}`" for m in HEADLINE_METRICS),
                        "tags.`dvc.exp_name`"],
    "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False,
    "runListHidden": False, "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True,
    "groupBy": None, "groupsExpanded": {}, "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0,
                                                                     "selectedXAxisMetricKey": ""},
}


def runs_view(created_ms: int) -> str:
    """The saved view's tag value: MLflow's envelope around the runs table's state (JSON)."""
    return json.dumps({"name": "Training runs", "createdAt": created_ms, "updatedAt": created_ms,
                       "state": json.dumps(RUNS_VIEW_STATE, separators=(",", ":"))}, separators=(",", ":"))


def ui_url(base: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """A link into the MLflow UI at `base` that opens in the model-training view: the
    experiment's training runs (the saved view), one run, or the experiments list."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?{TRAINING_VIEW}"
    if run_id is None:
        return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_ID}&{TRAINING_VIEW}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def experiment_id(mlflow, root: Path, name: str) -> str:
    """The experiment's id, created (or brought up to date) as a model-training experiment with
    the saved view of its runs table."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if tracking_uri(root).startswith("sqlite:"):
            location = (store_root(root) / "mlartifacts").as_uri()
        mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        exp = mlflow.get_experiment_by_name(name)
    wanted = {**EXPERIMENT_KIND, RUNS_VIEW_TAG: runs_view(exp.creation_time or 0)}
    client = mlflow.MlflowClient()
    for key, value in wanted.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


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
    mlflow = _mlflow(root)
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
    mlflow = _mlflow(root)
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


def register_and_gate(root: Path, name: str, run: Any, artifact_path: str, val_bpb: float) -> dict:
    """Register the run's model as a new version (tagged with its val_bpb and the DVC hashes of
    its data); move the `champion` alias to it only if its val_bpb beats the current champion's,
    and say why on the version and the registered model. Returns the decision."""
    mlflow = _mlflow(root)
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet
        client.create_registered_model(name, description="GPT models trained by llm-pipeline; champion = best val_bpb")
    source = f"{run.info.artifact_uri}/{artifact_path}"
    run = client.get_run(run.info.run_id)  # with the tags set since it started
    data = {k: v for k, v in run.data.tags.items() if k.startswith("dvc.")}
    version = client.create_model_version(
        name, source, run_id=run.info.run_id, tags={"val_bpb": f"{val_bpb:.6f}", **data,
                                                    "git.commit": run.data.tags.get("git.commit", "")},
        description=f"{run.info.run_name}: val_bpb {val_bpb:.4f} on the held-out split",
    )
    champion_bpb = None
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        champion_bpb = float(current.tags.get("val_bpb", "inf"))
    except Exception:  # noqa: BLE001 - no champion yet
        current = None
    promoted = champion_bpb is None or val_bpb < champion_bpb
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        why = "the first model" if champion_bpb is None else f"beats version {current.version}'s {champion_bpb:.4f}"
        client.update_registered_model(name, description=f"GPT models trained by llm-pipeline. `champion` is version "
                                                         f"{version.version} ({run.info.run_name}): val_bpb "
                                                         f"{val_bpb:.4f}, {why}.")
        verdict = f"champion: {why}"
    else:
        verdict = f"not champion: version {current.version} has val_bpb {champion_bpb:.4f}"
    client.update_model_version(name, version.version,
                                description=f"{run.info.run_name}: val_bpb {val_bpb:.4f}; {verdict}")
    decision = {
        "model": name,
        "version": int(version.version),
        "val_bpb": val_bpb,
        "previous_champion_version": int(current.version) if current is not None else None,
        "previous_champion_val_bpb": champion_bpb,
        "promoted": promoted,
    }
    log.info(
        "mlflow: registered %s version %s (val_bpb %.4f); %s",
        name, version.version, val_bpb,
        "now champion" if promoted else f"champion stays version {decision['previous_champion_version']} "
                                        f"({champion_bpb:.4f})",
    )
    return decision


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


def open_dagster_pipes():
    """The Dagster Pipes channel when a Dagster asset runs this stage (through DVC), else None.
    dagster-pipes is the protocol's small client library: no Dagster, no orchestration here."""
    if not os.environ.get("DAGSTER_PIPES_CONTEXT"):
        return None
    from dagster_pipes import PipesContext
    from dagster_pipes import open_dagster_pipes as open_pipes

    return PipesContext.get() if PipesContext.is_initialized() else open_pipes()


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
