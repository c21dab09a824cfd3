"""Dagster Pipes from inside a stage: when a Dagster asset runs the stage (through DVC), the
channel its live metrics go through."""

from __future__ import annotations

import os


def open_dagster_pipes():
    """The Dagster Pipes channel when a Dagster asset runs this stage (through DVC), else None.
    dagster-pipes is the protocol's small client library: no Dagster, no orchestration here."""
    if not os.environ.get("DAGSTER_PIPES_CONTEXT"):
        return None
    from dagster_pipes import PipesContext
    from dagster_pipes import open_dagster_pipes as open_pipes

    return PipesContext.get() if PipesContext.is_initialized() else open_pipes()
