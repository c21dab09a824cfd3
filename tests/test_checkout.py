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
