"""Asset checks as Dagster sees them: the plain check functions of the per-stage modules
(assets/data.py, assets/model.py), wrapped as blocking checks, so a failed check stops the
assets downstream of it."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets.spec import Check, StageSpec
from llm.layout import Layout


def build_checks(project: Path, stage_names: list[str], specs: dict[str, StageSpec]) -> list[dg.AssetChecksDefinition]:
    return [_check(Path(project), stage, c) for stage in stage_names if stage in specs for c in specs[stage].checks]


def _check(project: Path, stage: str, check: Check) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=stage, name=check.name, description=check.description, blocking=True)
    def _run() -> dg.AssetCheckResult:
        passed, metadata = check.fn(Layout.of(project))
        return dg.AssetCheckResult(passed=passed, metadata=metadata)

    return _run
