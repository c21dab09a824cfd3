"""The Dagster code location derived from dvc.yaml: definitions, in-process materializations of
a temporary DVC project, checks, the scaling ladder, jobs, the schedule and the sensor."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets import STAGE_SPECS
from assets.checks import build_checks
from assets.dvc_assets import build_assets
from assets.dvc_project import read_stages
from llm.io import read_json
from tests.conftest import REPO, Template, copy_project, dvc_bin, run, template_project

STAGES = ["ingest", "clean", "tokenizer", "shards", "train", "evaluate", "report", "export"]


def materializations(result) -> dict:
    return {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}


# ----------------------------------------------------------------------------- definitions
def test_definitions_load_and_validate():
    from pipelines import defs

    dg.Definitions.validate_loadable(defs)
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"build_all", "retrain", "scaling_ladder"}


def test_every_dvc_stage_is_an_asset_with_dvc_dependencies():
    from pipelines import defs

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(stages) | {"ladder", "scaling"}
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["ingest"] == set()
    assert parents["clean"] == {"ingest"}
    assert parents["shards"] == {"clean", "tokenizer"}
    assert parents["train"] == {"shards", "tokenizer"}
    assert parents["evaluate"] == {"train", "shards"}
    assert parents["report"] == {"train", "evaluate", "shards", "tokenizer"}
    assert parents["export"] == {"train"}
    assert parents["ladder"] == {"shards", "tokenizer"} and parents["scaling"] == {"ladder"}
    groups = {k.to_user_string(): graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == {"ingest": "data", "clean": "data", "tokenizer": "data", "shards": "data",
                      "train": "model", "evaluate": "model", "report": "model", "export": "model", "ladder": "scaling",
                      "scaling": "scaling"}


def test_a_stage_added_to_dvc_yaml_becomes_an_asset(tmp_path: Path):
    data = yaml.safe_load((REPO / "dvc.yaml").read_text())
    data["stages"]["onnx"] = {"cmd": "python onnx.py", "deps": ["models/final"], "outs": ["exports/model.onnx"],
                              "desc": "Export the model"}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assets = {a.key.to_user_string(): a for a in build_assets(tmp_path)}
    assert "onnx" in assets
    assert [k.to_user_string() for k in assets["onnx"].asset_deps[assets["onnx"].key]] == ["train"]
    assert assets["onnx"].descriptions_by_key[assets["onnx"].key] == "Export the model"
    assert assets["onnx"].group_names_by_key[assets["onnx"].key] == "pipeline"  # no per-stage module: default group


def test_a_users_own_stage_materializes_and_a_broken_page_does_not_fail_it(tmp_path: Path):
    """A stage with no per-stage module runs like any other; metadata that cannot be built is
    reported on the page, and the materialization (DVC already ran the stage) stands."""
    from assets.spec import StageSpec

    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hello > hello.txt\n    outs: [hello.txt]\n")
    run(["git", "init", "-q"], tmp_path)
    run([dvc_bin(), "init", "-q"], tmp_path)
    broken = StageSpec("mine", metadata=lambda layout: {"size": (layout.root / "missing.json").stat().st_size})
    with dg.instance_for_test() as instance:
        result = dg.materialize(build_assets(tmp_path, {"hello": broken}), instance=instance)
    meta = materializations(result)["hello"].metadata
    assert meta["recomputed"].value is True and "hello.txt" in meta["dvc_hashes"].value
    assert meta["metadata error"].value.startswith("FileNotFoundError")
    assert (tmp_path / "hello.txt").read_text() == "hello\n"


def test_stage_outputs_include_metrics_and_plots():
    stages = {s.name: s for s in read_stages(REPO)}
    assert "metrics/eval.json" in stages["evaluate"].outs
    assert "metrics/loss.csv" in stages["train"].outs
    assert stages["evaluate"].upstream == ("shards", "train")


def test_dagster_cli_validates_the_workspace(tmp_path: Path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    # Not from the repo root: Dagster would read the checkout's .env there (DAGSTER_HOME=.dagster).
    proc = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
                           str(REPO / "workspace.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_jobs_and_the_retrain_schedule():
    from llm.config import load_params
    from pipelines import defs

    params = load_params(REPO / "params.yaml")
    graph = defs.resolve_asset_graph()

    def selected(job: str) -> set[str]:
        return {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.selected_asset_keys}

    assert selected("build_all") == set(STAGES)
    assert selected("retrain") == {"train", "evaluate", "report"}
    assert selected("scaling_ladder") == {"ladder"}
    # DVC runs one stage at a time: the pipeline's jobs step in one process, not one process a step
    assert {defs.resolve_job_def(j).executor_def.name for j in ("build_all", "retrain")} == {"in_process"}
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.cron_schedule == params.orchestration.retrain_cron
    assert schedule.execution_timezone == params.orchestration.timezone
    assert schedule.job_name == "retrain"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    ladder = graph.get(dg.AssetKey("ladder")).partitions_def
    assert ladder.get_partition_keys() == list(params.ladder.rungs)
    raw = defs.resolve_sensor_def("new_raw_files")
    assert raw.job_name == "build_all" and raw.default_status == dg.DefaultSensorStatus.RUNNING
    assert raw.minimum_interval_seconds == params.orchestration.sensor_interval_seconds
    assert defs.resolve_sensor_def("scaling_automation").default_status == dg.DefaultSensorStatus.RUNNING


def test_every_check_is_blocking_and_attached_to_its_stage():
    from pipelines import defs

    graph = defs.resolve_asset_graph()
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert checks == {("ingest", "raw_schema"), ("clean", "clean_schema"), ("tokenizer", "round_trip"),
                      ("shards", "consistent"), ("train", "loss_sane"), ("evaluate", "beats_bz2")}
    for check in defs.asset_checks:
        assert all(spec.blocking for spec in check.check_specs)


# ----------------------------------------------------------------------------- materializing
@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    """Every stage of a temporary DVC project materialized in-process through Dagster, twice."""
    root = template_project(tmp_path_factory.mktemp("dagster_project") / "project")  # the suite's, unbuilt
    from pipelines import build_definitions

    defs = build_definitions(root)
    assets = [a for a in defs.assets if a.key.to_user_string() in STAGES]
    with dg.instance_for_test() as instance:
        first = dg.materialize(assets, instance=instance)
        status = run([dvc_bin(), "status"], root)
        second = dg.materialize(assets, instance=instance)
        yield root, defs, instance, first, status, second


@pytest.mark.slow
def test_materializing_every_asset_runs_the_stages_through_dvc(materialized):
    root, _, _, first, status, second = materialized
    assert first.success and second.success
    mats = materializations(first)
    assert set(mats) == set(STAGES)
    assert all(m.metadata["recomputed"].value for m in mats.values())
    assert status.strip().endswith("Data and pipelines are up to date."), status
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    again = materializations(second)
    assert not any(m.metadata["recomputed"].value for m in again.values())  # DVC: cached
    versions = {k: m.tags.get("dagster/data_version") for k, m in mats.items()}
    assert all(versions.values())
    assert versions == {k: m.tags.get("dagster/data_version") for k, m in again.items()}


@pytest.mark.slow
def test_training_reports_step_metrics_to_dagster_while_it_runs(materialized):
    """Over Dagster Pipes, through `dvc repro`: observations of train, each before its materialization."""
    _, _, instance, first, _, _ = materialized
    observations = instance.fetch_observations(dg.AssetKey("train"), limit=100, ascending=True).records
    steps = {int(r.asset_observation.metadata["step"].value): r for r in observations}
    assert sorted(steps) == [2, 3, 4, 6]  # log_interval 2 (tokens/s, MFU, ETA) and eval_interval 3 (val loss)
    assert {"train_loss", "tokens_per_sec", "mfu", "eta_seconds"} <= set(steps[2].asset_observation.metadata)
    assert "val_loss" in steps[3].asset_observation.metadata
    materialization = instance.fetch_materializations(dg.AssetKey("train"), limit=1, ascending=True).records[0]
    assert all(r.storage_id < materialization.storage_id for r in observations)  # live, not replayed at the end
    assert all(r.run_id == materialization.run_id for r in observations)


@pytest.mark.slow
def test_force_reruns_a_stage_that_dvc_has_cached(materialized):
    root, defs, instance, *_ = materialized
    assets = [a for a in defs.assets if a.key.to_user_string() in STAGES]
    before = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["report"]
    forced = dg.materialize(assets, selection=["report"], instance=instance,
                            run_config={"ops": {"report": {"config": {"force": True}}}})
    assert materializations(forced)["report"].metadata["recomputed"].value is True
    after = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["report"]
    assert after["deps"] == before["deps"]  # same inputs, run again
    assert run([dvc_bin(), "status"], root).strip().endswith("Data and pipelines are up to date.")


@pytest.mark.slow
def test_each_asset_page_shows_what_its_stage_produced(materialized):
    root, _, _, first, _, _ = materialized
    meta = {k: {name: v.value for name, v in m.metadata.items()} for k, m in materializations(first).items()}
    ingest = read_json(root / "metrics" / "ingest.json")
    assert meta["ingest"]["documents"] == ingest["documents"] == 4  # the suite's project: 4 plays
    assert meta["ingest"]["bytes"] == ingest["bytes"]
    assert any(k.startswith("preview (corpus/") for k in meta["ingest"])
    clean = meta["clean"]
    filters = {r.data["filter"] for r in clean["filter report"].records}
    assert {"too_short", "exact_duplicate", "near_duplicate"} <= filters
    assert clean["documents"] == read_json(root / "metrics" / "clean.json")["documents_out"]
    tok = meta["tokenizer"]
    assert tok["vocab size"] == 512 and 1.0 < tok["bytes per token (val)"] < 8.0
    assert " | " in tok["sample tokenization"]
    manifest = read_json(root / "data" / "shards" / "manifest.json")
    assert meta["shards"]["train tokens"] == manifest["splits"]["train"]["tokens"]
    assert meta["shards"]["val documents"] == manifest["splits"]["val"]["documents"]
    assert meta["shards"]["shard files"] >= 2
    train = meta["train"]
    summary = read_json(root / "metrics" / "train.json")
    assert (train["steps"] == 6 and train["tokens seen"] == 6 * 256
            and train["final val loss"] == summary["final_val_loss"])
    assert train["loss curve"].startswith("![train and val loss per step](data:image/png;base64,")
    assert train["MLflow run"].endswith(f"/runs/{summary['mlflow_run_id']}?workflowType=machine_learning")
    evaluation = meta["evaluate"]
    assert evaluation["val_bpb"] == read_json(root / "metrics" / "eval.json")["val_bpb"]
    assert {"bz2 bpb", "gzip bpb", "xz bpb", "unigram bpb"} <= set(evaluation)
    assert [r.data["model"] for r in evaluation["against baselines"].records][0] == "this model"
    assert meta["report"]["path"] == str(root / "reports" / "report.html")
    assert "ROMEO:" in meta["report"]["samples"]
    gguf = {r.data["file"]: r.data["bytes"] for r in meta["export"]["GGUF files"].records}
    assert set(gguf) == {"gguf/model-f32.gguf", "gguf/model-q8_0.gguf", "gguf/Modelfile"}
    assert all(size == (root / "models" / name).stat().st_size for name, size in gguf.items())


@pytest.mark.slow
def test_dagster_and_dvc_repro_give_the_same_artifacts(materialized, template: Template, tmp_path: Path):
    root = materialized[0]
    other = copy_project(template.root, tmp_path / "other")  # the same project, built by `dvc repro`
    a = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    b = yaml.safe_load((other / "dvc.lock").read_text())["stages"]
    for stage in ("ingest", "clean", "tokenizer", "shards"):
        assert a[stage]["outs"] == b[stage]["outs"], stage
    final = [o for o in a["train"]["outs"] if o["path"] == "models/final"]
    assert final and final == [o for o in b["train"]["outs"] if o["path"] == "models/final"]

    # Dagster then shows what `dvc repro` built: the dvc_lock sensor records every stage with
    # the data version a Dagster materialization of the same bytes has, and the page's metadata.
    from pipelines import build_definitions

    defs = build_definitions(other)
    sensor = next(s for s in defs.sensors if s.name == "dvc_lock")
    dagster_versions = {k: m.tags["dagster/data_version"] for k, m in materializations(materialized[3]).items()}
    with dg.instance_for_test() as instance:
        result = sensor(dg.build_sensor_context(instance=instance, definitions=defs))
        events = {e.asset_key.to_user_string(): e for e in result.asset_events}
        assert list(events) == STAGES  # in DAG order
        for stage in ("ingest", "clean", "tokenizer", "shards"):
            assert events[stage].tags["dagster/data_version"] == dagster_versions[stage], stage
        assert (events["clean"].tags["dagster/input_data_version/ingest"]
                == events["ingest"].tags["dagster/data_version"])
        assert events["evaluate"].metadata["val_bpb"].value == read_json(other / "metrics" / "eval.json")["val_bpb"]
        assert events["train"].metadata["loss curve"].value.startswith("![train and val loss per step](data:image/png")
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        again = sensor(dg.build_sensor_context(instance=instance, definitions=defs))
        assert isinstance(again, dg.SkipReason) and "agrees" in again.skip_message
        latest = instance.fetch_materializations(dg.AssetKey("evaluate"), limit=1).records[0]
        assert (latest.asset_materialization.tags["dagster/data_version"]
                == events["evaluate"].tags["dagster/data_version"])


@pytest.mark.slow
def test_the_scaling_ladder_trains_each_rung_and_plots_bpb_against_flops(materialized):
    import mlflow

    root, defs, instance, *_ = materialized
    ladder = [a for a in defs.assets if a.key.to_user_string() in ("ladder", "scaling")]
    cursor = dg.evaluate_automation_conditions(defs=ladder, instance=instance).cursor
    requested = []
    for rung in ("a", "b"):
        result = dg.materialize(ladder, selection=["ladder"], partition_key=rung, instance=instance)
        meta = materializations(result)["ladder"].metadata
        assert meta["val_bpb"].value == read_json(root / "ladder" / rung / "rung.json")["val_bpb"]
        assert meta["tokens"].value == 4 * 256  # the ladder's fixed budget, whatever the rung
        due = dg.evaluate_automation_conditions(defs=ladder, instance=instance, cursor=cursor)
        requested.append(due.get_num_requested(dg.AssetKey("scaling")))
        cursor = due.cursor
    # Declarative automation: `scaling` is due once every rung has run (not after the first only).
    assert requested == [0, 1]
    assert due.get_num_requested(dg.AssetKey("scaling")) == 1
    plot = materializations(dg.materialize(ladder, selection=["scaling"], instance=instance))["scaling"].metadata
    done = dg.evaluate_automation_conditions(defs=ladder, instance=instance, cursor=due.cursor)
    assert done.get_num_requested(dg.AssetKey("scaling")) == 0
    summary = read_json(root / "ladder" / "scaling.json")
    assert summary["rungs"] == ["a", "b"] and summary["missing"] == []
    flops = [p["train_flops"] for p in summary["points"]]
    assert flops[0] < flops[1]
    assert plot["plot"].value.startswith("![val bits per byte against training FLOPs](data:image/png;base64,")
    assert [r.data["rung"] for r in plot["rungs"].value.records] == ["a", "b"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llm-ladder")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["ladder.rung"] for r in runs) == ["a", "b"]
    assert all("val_bpb" in r.data.metrics for r in runs)
    assert run([dvc_bin(), "status"], root).strip().endswith("up to date."), "the ladder must not touch DVC's outputs"


def test_a_model_that_does_not_beat_bz2_fails_its_check_and_blocks_the_report(template: Template, tmp_path: Path):
    """The planted bad input: one training step, so the model cannot beat bz2. (In a copy of the
    reproduced project: the data stages are DVC's cache hits, and the good model's report is there.)"""
    root = copy_project(template.root, tmp_path / "project", train={"max_steps": 1})
    report = (root / "reports" / "report.html").read_bytes()
    assets = build_assets(root)
    checks = build_checks(root, [a.key.to_user_string() for a in assets], STAGE_SPECS)
    with dg.instance_for_test() as instance:
        result = dg.materialize([*assets, *checks], instance=instance, raise_on_error=False)
    materialized = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    evaluations = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert evaluations["beats_bz2"] is False
    assert all(evaluations[name] for name in ("raw_schema", "clean_schema", "round_trip", "consistent"))
    assert "evaluate" in materialized and "report" not in materialized  # blocked downstream
    assert read_json(root / "metrics" / "eval.json")["val_bpb"] > read_json(template.root / "metrics" / "eval.json")[
        "val_bpb"]  # evaluate ran on the one-step model ...
    assert (root / "reports" / "report.html").read_bytes() == report  # ... and its report was never written


# ----------------------------------------------------------------------------- sensor
def test_the_sensor_requests_a_run_when_a_file_lands_in_the_inbox(tmp_path: Path):
    from pipelines.sensors import new_raw_files_sensor
    from tests.conftest import small_params, write_corpus_slice, write_params

    write_corpus_slice(tmp_path / "corpus", n_plays=2, max_chars=2_000)
    write_params(tmp_path, small_params(["corpus"]))
    sensor = new_raw_files_sensor(tmp_path, 30)
    assert sensor.job_name == "build_all"
    with dg.instance_for_test() as instance:
        def tick(cursor):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor)
            return sensor(ctx), ctx.cursor

        first, cursor = tick(None)
        assert isinstance(first, dg.SkipReason) and "watching 2 file(s)" in first.skip_message  # the inbox is missing
        quiet, cursor = tick(cursor)
        assert isinstance(quiet, dg.SkipReason) and "no new or changed" in quiet.skip_message
        (tmp_path / "data" / "inbox").mkdir(parents=True)
        (tmp_path / "data" / "inbox" / ".DS_Store").write_bytes(b"\0")  # hidden: not a source file
        hidden, cursor = tick(cursor)
        assert isinstance(hidden, dg.SkipReason)
        (tmp_path / "data" / "inbox" / "new.txt").write_text("A new play arrives.\n" * 20)
        request, cursor = tick(cursor)
        assert isinstance(request, dg.RunRequest)
        assert request.tags["llm/raw_changes"] == "1 new, 0 changed, 0 removed"
        again, cursor = tick(cursor)
        assert isinstance(again, dg.SkipReason)
        (tmp_path / "corpus" / sorted(os.listdir(tmp_path / "corpus"))[0]).write_text("Rewritten.\n" * 30)
        changed, cursor = tick(cursor)
        assert isinstance(changed, dg.RunRequest) and changed.tags["llm/raw_changes"] == "0 new, 1 changed, 0 removed"
        assert changed.run_key != request.run_key
        (tmp_path / "params.yaml").write_text("ingest: {sources: [missing_dir]}\n")
        broken, _ = tick(cursor)
        assert isinstance(broken, dg.SkipReason) and "no such file or directory: missing_dir" in broken.skip_message


# ----------------------------------------------------------------------------- code versions
def code_versions(project: Path) -> dict[str, str | None]:
    return {a.key.to_user_string(): a.code_versions_by_key[a.key] for a in build_assets(project, {})}


def test_a_stages_code_version_changes_with_its_code_deps_and_nothing_else(tmp_path: Path):
    stages = {"prepare": {"cmd": "python prepare.py", "deps": ["prepare.py", "lib.py", "raw.txt"],
                          "outs": ["prepared.txt"]},
              "fit": {"cmd": "python fit.py", "deps": ["fit.py", "prepared.txt"], "outs": ["model.txt"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    for name in ("prepare.py", "lib.py", "fit.py", "unlisted.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "raw.txt").write_text("data\n")
    first = code_versions(tmp_path)
    assert first["prepare"] and first["fit"] and first["prepare"] != first["fit"]
    assert code_versions(tmp_path) == first  # deterministic
    (tmp_path / "lib.py").write_text("# lib.py\n")  # rewritten, same bytes: content counts, not time
    (tmp_path / "raw.txt").write_text("other data\n")  # a data dep: DVC's hashes, not the code version
    (tmp_path / "unlisted.py").write_text("# not a dep\n")
    assert code_versions(tmp_path) == first
    (tmp_path / "lib.py").write_text("# lib.py, edited\n")
    edited = code_versions(tmp_path)
    assert edited["prepare"] != first["prepare"] and edited["fit"] == first["fit"]
    (tmp_path / "lib.py").write_text("# lib.py\n")
    assert code_versions(tmp_path) == first


def test_every_project_stage_is_versioned_by_its_own_code():
    stages = {s.name: s for s in read_stages(REPO)}
    assets = {a.key.to_user_string(): a for a in build_assets(REPO)}
    versions = {name: a.code_versions_by_key[a.key] for name, a in assets.items()}
    assert all(versions.values()) and len(set(versions.values())) == len(versions)
    for name, a in assets.items():
        code = a.metadata_by_key[a.key]["code"]
        assert code and code == sorted(d for d in stages[name].deps if d.endswith(".py")), name


def test_an_edited_code_dep_marks_the_materialized_asset_stale(tmp_path: Path):
    """What the UI shows: fresh after a materialization, stale (cause: code) once its code changes."""
    # Dagster's own resolver behind the UI's staleness; no public API exposes it yet.
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleCauseCategory, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    (tmp_path / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: python hello.py\n    deps: [hello.py]\n    outs: "
                                       "[hello.txt]\n")
    (tmp_path / "hello.py").write_text("open('hello.txt', 'w').write('hello\\n')\n")
    run(["git", "init", "-q"], tmp_path)
    run([dvc_bin(), "init", "-q"], tmp_path)
    key = dg.AssetKey("hello")

    def staleness(instance) -> tuple[StaleStatus, list]:
        graph = dg.Definitions(assets=build_assets(tmp_path, {})).resolve_asset_graph()
        resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
        return resolver.get_status(key), [c.category for c in resolver.get_stale_causes(key)]

    with dg.instance_for_test() as instance:
        dg.materialize(build_assets(tmp_path, {}), instance=instance)
        assert staleness(instance) == (StaleStatus.FRESH, [])
        (tmp_path / "hello.py").write_text("open('hello.txt', 'w').write('hello, world\\n')\n")
        assert staleness(instance) == (StaleStatus.STALE, [StaleCauseCategory.CODE])
