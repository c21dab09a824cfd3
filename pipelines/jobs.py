"""Jobs and the retraining schedule."""

from __future__ import annotations

import dagster as dg

from llm.config import Params

RETRAIN = ["train", "evaluate", "report"]


def build_jobs(stage_names: list[str]) -> list[dg.UnresolvedAssetJobDefinition]:
    # In one process: each step is a `dvc repro` of its stage, and DVC runs one at a time in a
    # workspace (its lock), so a process per step (Dagster's default) would add only start-up.
    build_all = dg.define_asset_job(
        "build_all", selection=dg.AssetSelection.assets(*stage_names), executor_def=dg.in_process_executor,
        description="Every stage of dvc.yaml, in DVC order (stages whose inputs did not change are reported cached)",
    )
    retrain = dg.define_asset_job(
        "retrain", selection=dg.AssetSelection.assets(*[s for s in RETRAIN if s in stage_names]),
        executor_def=dg.in_process_executor,
        description="Train, evaluate and report on the current shards",
    )
    ladder = dg.define_asset_job(
        "scaling_ladder", selection=dg.AssetSelection.assets("ladder"),  # partitioned like the asset: one rung per run
        description="One rung of the scaling ladder per run (launch a backfill for all of them)",
    )
    return [build_all, retrain, ladder]


def retrain_schedule(params: Params) -> dg.ScheduleDefinition:
    o = params.orchestration
    return dg.ScheduleDefinition(
        name="retrain_schedule",
        job_name="retrain",
        cron_schedule=o.retrain_cron,
        execution_timezone=o.timezone,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Retrain on the current shards at `{o.retrain_cron}` ({o.timezone}); orchestration.retrain_cron "
                    "in params.yaml",
    )
