"""What a per-stage module adds to the asset dvc.yaml declares: a group, the metadata the UI
shows after a materialization, and the checks its output must pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llm.layout import Layout

# A check is a plain function of the project's layout: (passed, metadata).
CheckFn = Callable[[Layout], tuple[bool, dict]]


@dataclass(frozen=True)
class Check:
    name: str
    fn: CheckFn
    description: str


@dataclass(frozen=True)
class StageSpec:
    group: str
    metadata: Callable[[Layout], dict] | None = None
    """Materialization metadata from the stage's outputs (numbers, tables, markdown, images)."""
    checks: tuple[Check, ...] = field(default=())
    live: bool = False
    """The stage reports progress over Dagster Pipes while it runs (train: step metrics)."""
