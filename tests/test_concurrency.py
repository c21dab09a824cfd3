"""Two runs of the pipeline at once: DVC's repository lock lets one through and stops the other
with one clear line; nothing is corrupted, and the next run has nothing to do."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from llm.artifacts import load_final
from llm.layout import Layout
from llm.shards import verify_shards
from tests.conftest import Template, copy_project, dvc_bin, project_env, run

pytestmark = pytest.mark.slow
BLOCKED = ("is busy, it is being blocked by", "Unable to acquire lock")


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def intact(root: Path) -> None:
    verify_shards(Layout(root).shards)
    load_final(Layout(root).final)
    assert run([dvc_bin(), "status"], root).strip().endswith("Data and pipelines are up to date.")


def stopped_with_one_line(out: str) -> bool:
    """A run that lost the race for a lock: exactly one `ERROR:` line, naming the lock."""
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    return len(errors) == 1 and any(b in errors[0] for b in BLOCKED)


def test_two_dvc_repro_at_once_one_runs_the_other_stops_with_one_line(template: Template, tmp_path: Path):
    # A changed training param: both runs have train, evaluate, report and export to do.
    root = copy_project(template.root, tmp_path / "project", train={"max_steps": 4})
    first = start([dvc_bin(), "repro"], root)
    time.sleep(0.5)
    second = start([dvc_bin(), "repro"], root)
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    codes = [first.returncode, second.returncode]
    assert 0 in codes, outputs
    for code, out in zip(codes, outputs):
        if code != 0:
            assert stopped_with_one_line(out), out[-2000:]
    intact(root)


def test_a_dagster_run_beside_a_dvc_repro_waits_its_turn_or_fails_with_one_line(template: Template, tmp_path: Path):
    """Which of the two takes a stage's lock first is a race (on a loaded machine the Dagster run
    can get in while `dvc repro` is still starting): one of them finishes, and the other either
    waited its turn or stopped with one line naming the lock."""
    from pipelines import build_definitions

    root = copy_project(template.root, tmp_path / "project")
    busy = start([dvc_bin(), "repro", "--force", "train"], root)  # holds DVC's locks for a while
    time.sleep(2)
    defs = build_definitions(root)
    assets = [a for a in defs.assets if a.key.to_user_string() in ("train", "evaluate", "report")]
    with dg.instance_for_test() as instance:
        result = dg.materialize(assets, selection=["report"], instance=instance, raise_on_error=False,
                                run_config={"ops": {"report": {"config": {"force": True}}}})
    out = busy.communicate(timeout=600)[0]
    assert busy.returncode == 0 or result.success, out[-2000:]
    if busy.returncode != 0:
        assert stopped_with_one_line(out), out[-2000:]
    if not result.success:
        failure = next(e for e in result.all_events if e.is_step_failure)
        message = failure.step_failure_data.error.message
        assert "dvc repro report failed" in message and any(b in message for b in BLOCKED), message
    run([dvc_bin(), "repro"], root)  # what the loser (or `dvc repro train`) left behind
    intact(root)
