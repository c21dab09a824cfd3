"""Sensors: new raw data starts a pipeline run; a new ladder rung updates the scaling plot.

Each tick it stats the local files that `ingest.sources` and the `ingest.inbox` drop folder name
(packages and URLs are not watched). The first tick records them; after that, any file added,
changed or removed requests a `build_all` run: ingest and everything downstream, through DVC.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dagster as dg


def new_raw_files_sensor(project: Path, interval_seconds: int) -> dg.SensorDefinition:
    @dg.sensor(
        name="new_raw_files",
        job_name="build_all",
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A new, changed or removed file in the local sources or the inbox (ingest.inbox) starts "
                    "ingest and everything downstream.",
    )
    def new_raw_files(context: dg.SensorEvaluationContext):
        from llm.config import load_params
        from llm.corpus.resolve import watched_files
        from llm.errors import UserError

        try:
            params = load_params(project / "params.yaml")  # read every tick: the sources may change
            files = watched_files(params.ingest.sources, params.ingest.inbox, project)
        except UserError as e:
            return dg.SkipReason(f"cannot read the sources: {e}")
        state = {uri: list(v) for uri, v in sorted(files.items())}
        if context.cursor is None:
            context.update_cursor(json.dumps(state))
            return dg.SkipReason(f"watching {len(state)} file(s)")
        before = json.loads(context.cursor)
        added = sorted(set(state) - set(before))
        removed = sorted(set(before) - set(state))
        changed = sorted(u for u in set(state) & set(before) if state[u] != before[u])
        if not (added or removed or changed):
            return dg.SkipReason(f"no new or changed files among {len(state)}")
        context.update_cursor(json.dumps(state))
        summary = f"{len(added)} new, {len(changed)} changed, {len(removed)} removed"
        context.log.info(f"raw sources: {summary}: {', '.join((added + changed + removed)[:10])}")
        key = hashlib.sha256(json.dumps(state).encode()).hexdigest()[:16]
        return dg.RunRequest(run_key=key, tags={"llm/trigger": "new_raw_files", "llm/raw_changes": summary})

    return new_raw_files


def scaling_automation_sensor(interval_seconds: int) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the assets' automation conditions (asset `scaling` follows the ladder's rungs).
    Dagster's own default sensor for this starts stopped; this one runs."""
    return dg.AutomationConditionSensorDefinition(
        "scaling_automation",
        target=dg.AssetSelection.assets("scaling"),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=interval_seconds,
        description="Re-plots `scaling` when a rung of `ladder` is materialized",
    )


def dvc_lock_sensor(project: Path, stages: list[str], code_versions: dict[str, str | None],
                    upstream: dict[str, list[str]], interval_seconds: int) -> dg.SensorDefinition:
    """Records what `dvc repro` (or `dvc exp apply`) built outside Dagster, so the UI shows one
    truth: each tick reads dvc.lock, and every stage whose outputs' data version differs from
    its latest materialization in Dagster gets a runless materialization with that data version,
    the page's metadata, the code version and the data versions of its inputs (so staleness shows)."""

    @dg.sensor(
        name="dvc_lock",
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Records stages that `dvc repro` built outside Dagster (dvc.lock changed) as materializations "
                    "with DVC's data versions.",
    )
    def dvc_lock(context: dg.SensorEvaluationContext):
        events = lock_events(context.instance, project, stages, code_versions, upstream)
        if not events:
            return dg.SkipReason("dvc.lock agrees with Dagster")
        context.log.info(f"dvc.lock: recording {', '.join(e.asset_key.to_user_string() for e in events)}")
        return dg.SensorResult(asset_events=events)

    return dvc_lock


def lock_events(instance: dg.DagsterInstance, project: Path, stages: list[str], code_versions: dict[str, str | None],
                upstream: dict[str, list[str]]) -> list[dg.AssetMaterialization]:
    """The materializations that would bring Dagster level with dvc.lock, in DAG order."""
    from assets import STAGE_SPECS
    from assets.dvc_assets import data_version, stage_metadata

    versions = {s: data_version(project, s) for s in stages}
    events = []
    for stage in stages:
        version = versions[stage]
        latest = _latest(instance, stage)
        if version is None or (latest is not None
                               and latest.asset_materialization.tags.get("dagster/data_version") == version.value):
            continue
        tags = {"dagster/data_version": version.value, "llm/recorded_from": "dvc.lock"}
        if code_versions.get(stage):
            tags["dagster/code_version"] = code_versions[stage]
        for parent in upstream.get(stage, []):
            if versions.get(parent) is not None:
                tags[f"dagster/input_data_version/{parent}"] = versions[parent].value
                record = _latest(instance, parent)
                tags[f"dagster/input_event_pointer/{parent}"] = str(record.storage_id) if record else "NULL"
        metadata = {"recomputed": "outside Dagster (dvc repro)",
                    **stage_metadata(project, stage, STAGE_SPECS.get(stage))}
        events.append(dg.AssetMaterialization(asset_key=stage, metadata=metadata, tags=tags,
                                              description="built by `dvc repro` outside Dagster; "
                                                          "recorded from dvc.lock"))
    return events


def _latest(instance: dg.DagsterInstance, stage: str) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(dg.AssetKey(stage), limit=1).records
    return records[0] if records else None
