"""Dagster definitions over the DVC pipeline: `dagster dev` in the repo root loads them
(workspace.yaml). Assets come from dvc.yaml (assets/dvc_assets.py); this module adds jobs.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets.checks import build_checks
from assets.dvc_assets import build_assets

PROJECT = Path(__file__).resolve().parents[1]

build_all = dg.define_asset_job("build_all", selection=dg.AssetSelection.all(), description="Every stage, in DVC order")

_assets = build_assets(PROJECT)
defs = dg.Definitions(
    assets=_assets,
    asset_checks=build_checks(PROJECT, [a.key.to_user_string() for a in _assets]),
    jobs=[build_all],
)
