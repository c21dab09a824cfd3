"""Dagster assets derived from dvc.yaml, one per DVC stage, with per-stage metadata and checks."""
