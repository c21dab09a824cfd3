"""The Dagster code location derived from dvc.yaml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from assets.dvc_assets import build_assets
from assets.dvc_project import read_stages
from tests.conftest import REPO, dvc_bin, make_dvc_project, run


def test_definitions_load_and_validate():
    from pipelines import defs

    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("build_all") is not None


def test_every_dvc_stage_is_an_asset_with_dvc_dependencies():
    from pipelines import defs

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(stages)
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()}
    assert parents["ingest"] == set()
    assert parents["clean"] == {"ingest"}
    assert parents["shards"] == {"clean", "tokenizer"}
    assert parents["train"] == {"shards", "tokenizer"}
    assert parents["evaluate"] == {"train", "shards"}
    assert parents["report"] == {"train", "evaluate", "shards", "tokenizer"}


def test_a_stage_added_to_dvc_yaml_becomes_an_asset(tmp_path: Path):
    data = yaml.safe_load((REPO / "dvc.yaml").read_text())
    data["stages"]["export"] = {"cmd": "python export.py", "deps": ["models/final"], "outs": ["exports/model.onnx"], "desc": "Export the model"}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assets = {a.key.to_user_string(): a for a in build_assets(tmp_path)}
    assert "export" in assets
    assert [k.to_user_string() for k in assets["export"].asset_deps[assets["export"].key]] == ["train"]
    assert assets["export"].descriptions_by_key[assets["export"].key] == "Export the model"


def test_stage_outputs_include_metrics_and_plots():
    stages = {s.name: s for s in read_stages(REPO)}
    assert "metrics/eval.json" in stages["evaluate"].outs
    assert "metrics/loss.csv" in stages["train"].outs
    assert stages["evaluate"].upstream == ("shards", "train")


def test_dagster_cli_validates_the_workspace(tmp_path: Path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_materializing_runs_the_stages_through_dvc(tmp_path: Path):
    make_dvc_project(tmp_path, n_plays=6, max_chars=15_000)
    assets = build_assets(tmp_path)
    data = ["ingest", "clean", "tokenizer", "shards"]
    with dg.instance_for_test() as instance:
        first = dg.materialize(assets, selection=data, instance=instance)
        assert first.success
        mats = {m.asset_key.to_user_string(): m for m in first.get_asset_materialization_events()}
        assert set(mats) == set(data)
        assert all(e.materialization.metadata["recomputed"].value for e in mats.values())
        status = run([dvc_bin(), "status", *data], tmp_path)
        assert "up to date" in status.lower()
        lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
        assert set(lock) == set(data)
        second = dg.materialize(assets, selection=data, instance=instance)
        again = {m.asset_key.to_user_string(): m for m in second.get_asset_materialization_events()}
        assert not any(e.materialization.metadata["recomputed"].value for e in again.values())  # DVC: cached
        versions = {k: e.materialization.tags.get("dagster/data_version") for k, e in mats.items()}
        assert all(versions.values())
        assert versions == {k: e.materialization.tags.get("dagster/data_version") for k, e in again.items()}


def test_every_check_is_blocking_and_attached_to_its_stage():
    from pipelines import defs

    graph = defs.resolve_asset_graph()
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert checks == {("ingest", "raw_schema"), ("clean", "clean_schema"), ("tokenizer", "round_trip"),
                      ("shards", "consistent"), ("train", "loss_sane"), ("evaluate", "beats_bz2")}
    for check in defs.asset_checks:
        assert all(spec.blocking for spec in check.check_specs)


def test_a_model_that_does_not_beat_bz2_fails_its_check_and_blocks_the_report(tmp_path: Path):
    """The planted bad input: one training step, so the model cannot beat bz2."""
    from assets.checks import build_checks
    make_dvc_project(tmp_path, n_plays=6, max_chars=15_000, train={"max_steps": 1})
    assets = build_assets(tmp_path)
    checks = build_checks(tmp_path, [a.key.to_user_string() for a in assets])
    with dg.instance_for_test() as instance:
        result = dg.materialize([*assets, *checks], instance=instance, raise_on_error=False)
    materialized = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    evaluations = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert evaluations["beats_bz2"] is False
    assert all(evaluations[name] for name in ("raw_schema", "clean_schema", "round_trip", "consistent"))
    assert "evaluate" in materialized and "report" not in materialized  # blocked downstream
    assert not (tmp_path / "reports").exists()
