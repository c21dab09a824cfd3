"""Dagster definitions over the DVC pipeline: `dagster dev` in the repo root loads them
(workspace.yaml). The stage assets come from dvc.yaml (assets/dvc_assets.py) with the per-stage
metadata and checks (assets/data.py, assets/model.py); the scaling ladder from ladder.rungs
(assets/ladder.py); jobs and the schedule from pipelines/jobs.py, the sensor from
pipelines/sensors.py.

The project is the repository this package lives in, or the directory LLM_PROJECT names (a
copy of the project elsewhere, as the tests use).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from assets import STAGE_SPECS
from assets.checks import build_checks
from assets.dvc_assets import build_assets
from assets.ladder import ladder_assets
from llm.config import load_params
from pipelines.jobs import build_jobs, retrain_schedule
from pipelines.sensors import dvc_lock_sensor, new_raw_files_sensor, scaling_automation_sensor

PROJECT = Path(os.environ.get("LLM_PROJECT") or Path(__file__).resolve().parents[1]).resolve()


def build_definitions(project: Path) -> dg.Definitions:
    params = load_params(project / "params.yaml")
    rungs = list(params.ladder.rungs)
    stage_assets = build_assets(project, STAGE_SPECS)
    stages = [a.key.to_user_string() for a in stage_assets]
    code_versions = {a.key.to_user_string(): a.code_versions_by_key.get(a.key) for a in stage_assets}
    upstream = {a.key.to_user_string(): [k.to_user_string() for k in a.asset_deps[a.key]] for a in stage_assets}
    return dg.Definitions(
        assets=[*stage_assets, *ladder_assets(project, rungs)],
        asset_checks=build_checks(project, stages, STAGE_SPECS),
        jobs=build_jobs(stages),
        schedules=[retrain_schedule(params)],
        sensors=[new_raw_files_sensor(project, params.orchestration.sensor_interval_seconds),
                 dvc_lock_sensor(project, stages, code_versions, upstream,
                                 params.orchestration.sensor_interval_seconds),
                 scaling_automation_sensor(params.orchestration.sensor_interval_seconds)],
    )


defs = build_definitions(PROJECT)
