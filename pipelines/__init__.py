"""Dagster definitions (resources, jobs, schedules, sensors) over the DVC pipeline.

The assets are derived from dvc.yaml (see assets/); this package will hold the Definitions
object that workspace.yaml loads.
"""
