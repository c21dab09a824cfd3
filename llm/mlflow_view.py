"""How the MLflow UI shows the project: experiments marked as model training, a saved view of the
runs table, and links that open in it."""

from __future__ import annotations

import json
from pathlib import Path

from llm.mlflow_store import store_root, tracking_uri

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
        try:
            mlflow.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except mlflow.exceptions.MlflowException as e:  # a run in parallel (dvc queue start -j N) made it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        exp = mlflow.get_experiment_by_name(name)
    wanted = {**EXPERIMENT_KIND, RUNS_VIEW_TAG: runs_view(exp.creation_time or 0)}
    client = mlflow.MlflowClient()
    for key, value in wanted.items():
        if exp.tags.get(key) != value:
            try:
                client.set_experiment_tag(exp.experiment_id, key, value)
            except mlflow.exceptions.MlflowException:  # a parallel run set the same tag at the same moment
                if client.get_experiment(exp.experiment_id).tags.get(key) != value:
                    raise
    return exp.experiment_id
