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
        from llm.corpus.sources import watched_files
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
