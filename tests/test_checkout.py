"""The DAG runs from any checkout: a fresh `git clone` (no `make setup`, no data/, no dvc.lock)
reproduces, runs a temporary experiment and runs a queued one.

Temporary and queued experiments run in a copy of the git tree (.dvc/tmp/exps/...), not in the
workspace: git-ignored and untracked files are not there (DVC outputs come from its cache). So
everything a stage needs must be in git; the inbox, a dependency of ingest, is there as
data/inbox/.gitkeep. The `llm` command comes from the environment, on PATH (tests' `run`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from llm.mlflow_store import store_root, tracking_uri
from tests.conftest import dvc_bin, make_dvc_project, run

pytestmark = pytest.mark.slow

ALL_STAGES = ["ingest", "clean", "tokenizer", "shards", "train", "evaluate", "report", "export"]
# train persists its checkpoints: DVC's run cache never restores it
MODEL_STAGES = ["train", "evaluate", "report", "export"]
QUEUE_TIMEOUT_S = 300


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def clone_of_a_committed_project(tmp_path_factory) -> Path:
    origin = make_dvc_project(tmp_path_factory.mktemp("origin"), n_plays=4, max_chars=10_000)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "pipeline"], origin)
    clone = tmp_path_factory.mktemp("checkout") / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], origin.parent)
    return clone


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """A fresh clone after `dvc repro`, and what that printed. Read-only: tests copy it.
    dvc.lock stays uncommitted, as a user who just ran the pipeline has it."""
    clone = clone_of_a_committed_project(tmp_path_factory)
    assert not (clone / "dvc.lock").exists() and not (clone / "data" / "raw").exists()
    assert sorted(p.name for p in (clone / "data" / "inbox").iterdir()) == [".gitkeep"]
    return clone, run([dvc_bin(), "repro"], clone)


@pytest.fixture
def checkout(reproduced: tuple[Path, str], tmp_path: Path) -> Path:
    return Path(shutil.copytree(reproduced[0], tmp_path / "clone", symlinks=True))


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's data by name."""
    shown = json.loads(run([dvc_bin(), "exp", "show", "--json"], repo))
    return {rev["name"]: rev["data"] for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"]}


def tracked_in_the_workspace(repo: Path, name: str, exp: dict) -> None:
    """The experiment ran in a copy under .dvc/tmp/exps/ that DVC deleted; its MLflow run is in the
    workspace's store all the same: named after it, with its val_bpb, its model and a registered
    version, as `make ui` shows them."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llm")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in client.search_runs([experiment.experiment_id])]
    tracked = runs[0]
    assert tracked.data.metrics["val_bpb"] == pytest.approx(exp["metrics"]["metrics/eval.json"]["data"]["val_bpb"])
    assert tracked.data.tags["dvc.exp_name"] == name
    assert {a.path for a in client.list_artifacts(tracked.info.run_id, "model")} >= {"model/model.safetensors"}
    assert client.search_model_versions(f"run_id = '{tracked.info.run_id}'")
    assert not list((repo / ".dvc" / "tmp" / "exps").glob("tmp*/mlflow.db"))


@pytest.mark.parametrize("sub", ["", "proj", "a/b"])
def test_the_store_is_the_workspace_folder_wherever_dvc_runs_the_stage(tmp_path: Path, monkeypatch, sub: str):
    """The project's folder (sub) in the workspace or in an experiment's copy of it, with and
    without DVC's DVC_ROOT: the store is always the workspace's folder."""
    workspace = tmp_path / "ws"
    copy = workspace / ".dvc" / "tmp" / "exps" / "tmpab12"
    for repo in (workspace, copy):
        (repo / ".dvc").mkdir(parents=True)
        (repo / sub).mkdir(parents=True, exist_ok=True)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert store_root(workspace / sub) == workspace / sub
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert store_root(workspace / sub) == workspace / sub
    assert store_root(copy / sub) == workspace / sub
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a server wins over any folder
    assert tracking_uri(copy / sub) == "http://127.0.0.1:5000"


def test_a_fresh_clone_reproduces_every_stage(reproduced: tuple[Path, str]):
    clone, out = reproduced
    assert ran_stages(out) == ALL_STAGES
    assert (clone / "reports" / "report.html").is_file()
    assert run([dvc_bin(), "status"], clone).strip().endswith("Data and pipelines are up to date.")


def test_a_temporary_experiment_runs_in_a_fresh_clone(checkout: Path):
    out = run([dvc_bin(), "exp", "run", "--temp", "-S", "train.max_steps=4", "-n", "steps4"], checkout)
    # dvc.lock is not committed: the data stages come back from DVC's run cache, not rerun.
    assert ran_stages(out) == MODEL_STAGES
    exp = experiments(checkout)["steps4"]
    assert exp["params"]["params.yaml"]["data"]["train"]["max_steps"] == 4
    assert exp["metrics"]["metrics/train.json"]["data"]["steps"] == 4
    assert exp["metrics"]["metrics/eval.json"]["data"]["val_bpb"] > 0
    assert "max_steps: 6" in (checkout / "params.yaml").read_text()  # --temp: the workspace is untouched
    tracked_in_the_workspace(checkout, "steps4", exp)


def test_a_queued_experiment_runs_in_a_fresh_clone(checkout: Path):
    run([dvc_bin(), "exp", "run", "--queue", "-S", "train.learning_rate=0.003", "-n", "lr3e-3"], checkout)
    try:
        run([dvc_bin(), "queue", "start"], checkout)
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        status = ""
        while time.monotonic() < deadline:
            status = run([dvc_bin(), "queue", "status"], checkout)
            if re.search(r"lr3e-3\s.*\b(Success|Failed)\b", status):
                break
            time.sleep(3)
        logs = run([dvc_bin(), "queue", "logs", "lr3e-3"], checkout)
        assert re.search(r"lr3e-3\s.*\bSuccess\b", status), f"queue status:\n{status}\nlogs:\n{logs}"
    finally:  # the worker exits once the queue is empty; a timed-out one must not outlive the test
        subprocess.run([dvc_bin(), "queue", "stop", "--kill"], cwd=checkout, capture_output=True, timeout=60)
    assert ran_stages(logs) == MODEL_STAGES
    exp = experiments(checkout)["lr3e-3"]
    assert exp["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.003
    assert exp["metrics"]["metrics/eval.json"]["data"]["val_bpb"] > 0
    tracked_in_the_workspace(checkout, "lr3e-3", exp)
