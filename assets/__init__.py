"""Dagster assets over the DVC pipeline: one per dvc.yaml stage (dvc_assets), with the groups,
UI metadata and checks of the per-stage modules (data, model), plus the scaling ladder (ladder)."""

from assets import data, model
from assets.spec import StageSpec

STAGE_SPECS: dict[str, StageSpec] = {**data.SPECS, **model.SPECS}
