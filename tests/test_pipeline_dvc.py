"""The whole pipeline through `dvc repro` in a temporary git repository, on a slice of the
default corpus and a model that trains in seconds.

The suite's template repository (tests/conftest.py) is reproduced once per suite run and never
changed afterwards; each test that runs DVC works on its own copy (DVC cache included), so every
test stands alone: under -k, in any order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from llm.io import read_json
from tests.conftest import REPO, Template, copy_project, dvc_bin, run, template_project, write_params
from tests.test_code_deps import stage_closure

pytestmark = pytest.mark.slow

ALL_STAGES = ["ingest", "clean", "tokenizer", "shards", "train", "evaluate", "report", "export"]


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture
def repo(template: Template, tmp_path: Path) -> Path:
    """This test's own copy of the suite's reproduced project (tests/conftest.py: template)."""
    return copy_project(template.root, tmp_path / "repo")


def test_repro_builds_every_stage(template: Template, repo: Path):
    assert ran_stages(template.first_repro) == ALL_STAGES
    for path in ("data/raw", "data/clean", "data/tokenizer/tokenizer.model", "data/shards/manifest.json",
                 "models/checkpoints/last.pt", "models/final/model.safetensors", "metrics/eval.json",
                 "reports/report.html"):
        assert (repo / path).exists(), path
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(ALL_STAGES)
    manifest = read_json(repo / "data/shards/manifest.json")
    assert manifest["splits"]["train"]["tokens"] > 0 and manifest["splits"]["val"]["tokens"] > 0
    metrics = run([dvc_bin(), "metrics", "show", "--json"], repo)
    assert "val_bytes_per_token" in metrics and "documents_out" in metrics and "val_bpb" in metrics


def test_repro_exports_a_gguf_that_names_its_training_data(repo: Path):
    import gguf

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {o["path"] for o in lock["export"]["outs"]} == {"models/hf", "models/gguf"}
    assert {"model-f32.gguf", "model-q8_0.gguf", "Modelfile", "export.json"} <= {p.name for p in
                                                                                 (repo / "models/gguf").iterdir()}
    fields = gguf.GGUFReader(repo / "models/gguf/model-f32.gguf").fields
    shards = next(o["md5"] for o in lock["shards"]["outs"] if o["path"] == "data/shards")
    assert fields["llm_pipeline.dvc.shards.md5"].contents() == shards


def test_second_repro_does_nothing(repo: Path):
    out = run([dvc_bin(), "repro"], repo)
    assert ran_stages(out) == []
    assert "up to date" in out.lower()
    assert run([dvc_bin(), "status"], repo).strip().endswith("Data and pipelines are up to date.")


def test_changing_a_shards_param_reruns_shards_and_what_follows_only(repo: Path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    before = read_json(repo / "data/shards/manifest.json")
    params["shards"]["shard_tokens"] = 5_000
    write_params(repo, params)
    out = run([dvc_bin(), "repro"], repo)
    assert ran_stages(out) == ["shards", "train", "evaluate", "report", "export"]
    after = read_json(repo / "data/shards/manifest.json")
    assert len(after["splits"]["train"]["shards"]) > len(before["splits"]["train"]["shards"])
    assert after["splits"]["train"]["tokens"] == before["splits"]["train"]["tokens"]


def test_changing_a_report_param_reruns_only_the_report(repo: Path):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["report"]["max_new_tokens"] = 8
    write_params(repo, params)
    assert ran_stages(run([dvc_bin(), "repro"], repo)) == ["report"]


def stale_stages(repo: Path) -> set[str]:
    return set(json.loads(run([dvc_bin(), "status", "--json"], repo)))


@pytest.mark.parametrize("module", ["llm/corpus/clean.py", "llm/device.py"])
def test_editing_a_module_makes_the_stages_that_import_it_stale(repo: Path, module: str):
    """An edit to a library module is a changed dep of exactly the stages that import it."""
    assert stale_stages(repo) == set()
    with (repo / module).open("a", encoding="utf-8") as f:
        f.write("# an edit\n")
    users = {name for name in ALL_STAGES if module in stage_closure(name)}
    assert stale_stages(repo) == users
    if module == "llm/corpus/clean.py":  # the cleaning filters: clean alone (its output then reruns the rest)
        assert users == {"clean"}
    else:  # the model's device: model stages only
        assert "train" in users and not users & {"ingest", "clean", "tokenizer", "shards"}


def experiments(shown: list) -> dict[str, dict]:
    """`dvc exp show --json` as {experiment name: its data (params, metrics)}."""
    out = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs", []):
                if rev.get("name"):
                    out[rev["name"]] = rev["data"]
    return out


def test_each_dvc_experiment_is_one_mlflow_run_named_after_it(repo: Path):
    import mlflow

    lrs = {"lr3e-3": 0.003, "lr1e-3": 0.001}
    for name, lr in lrs.items():
        out = run([dvc_bin(), "exp", "run", "-S", f"train.learning_rate={lr}", "-n", name], repo)
        assert ran_stages(out) == ["train", "evaluate", "report", "export"]
    exps = experiments(json.loads(run([dvc_bin(), "exp", "show", "--json"], repo)))
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm")
    for name, lr in lrs.items():
        data = exps[name]
        assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == lr
        val_bpb = data["metrics"]["metrics/eval.json"]["data"]["val_bpb"]
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{name}'")
        assert len(runs) == 1, [r.info.run_name for r in runs]  # train, evaluate and report: one run
        assert runs[0].info.run_name == name
        assert runs[0].data.params["train.learning_rate"] == str(lr)
        assert runs[0].data.metrics["val_bpb"] == pytest.approx(val_bpb, abs=1e-5)
    assert (exps["lr3e-3"]["metrics"]["metrics/eval.json"]["data"]["val_bpb"]
            != exps["lr1e-3"]["metrics"]["metrics/eval.json"]["data"]["val_bpb"])
    diff = json.loads(run([dvc_bin(), "metrics", "diff", "HEAD", "lr3e-3", "--json"], repo))
    assert "val_bpb" in diff["metrics/eval.json"]
    plots = json.dumps(json.loads(run([dvc_bin(), "plots", "show", "--json"], repo)))
    assert '"train_loss"' in plots and '"val_loss"' in plots  # dvc.yaml's loss plot, from metrics/loss.csv


def test_same_params_and_data_give_the_same_artifacts(template: Template, tmp_path: Path):
    """Determinism: the stages run again elsewhere produce byte-identical outputs (dvc.lock md5s)."""
    other = template_project(tmp_path)
    assert (other / "params.yaml").read_bytes() == (template.root / "params.yaml").read_bytes()
    run([dvc_bin(), "repro", "shards"], other)
    lock_a = yaml.safe_load((template.root / "dvc.lock").read_text())["stages"]
    lock_b = yaml.safe_load((other / "dvc.lock").read_text())["stages"]
    for stage in ("ingest", "clean", "tokenizer", "shards"):
        assert lock_a[stage]["outs"] == lock_b[stage]["outs"], stage


def test_repo_dvc_yaml_declares_every_stage_command_as_the_cli():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"llm {name}"
        assert stage["params"], name
        assert stage.get("metrics") or stage.get("outs"), name
