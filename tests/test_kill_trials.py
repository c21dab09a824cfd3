"""Fault injection: SIGKILL at seeded random points inside every stage, through `dvc repro` and
through a Dagster materialization, then a rerun. After every kill the rerun completes, no stage
reads a partial output, and the final outputs equal an uninterrupted run's (the suite's
reproduced project, tests/conftest.py): the data stages
byte-identical, training bit-identical (CPU). The session ends with the count of trials, of kills
that landed inside the stage's process, and of partial artifacts found (tests/conftest.py).

Marked `faults`: `make test` (and so CI) runs them; `pytest -m "not faults"` leaves them out.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from llm.artifacts import load_final
from llm.corpus.tables import iter_batches
from llm.errors import UserError
from llm.io import remove_stale_outputs
from llm.layout import Layout
from llm.shards import verify_shards
from llm.tokenizer import Tokenizer
from tests.conftest import Template, copy_project, dvc_bin, project_env

pytestmark = [pytest.mark.slow, pytest.mark.faults]
STAGES = ["ingest", "clean", "tokenizer", "shards", "train", "evaluate", "report"]
# Outputs whose bytes must equal the uninterrupted run's (the report and train.json hold timings).
COMPARED = {"ingest": ["data/raw"], "clean": ["data/clean"], "tokenizer": ["data/tokenizer"], "shards": ["data/shards"],
            "train": ["models/final", "metrics/loss.csv"], "evaluate": ["metrics/eval.json"]}
# Deterministic instants a timer cannot hit, forced through the fault points of llm/faults.py: an
# output finished and about to be put in place, a checkpoint. (DVC removes a stage's outputs
# before running it, so under DVC there is no previous output to swap with; the swap's own
# windows, atomic_dir.exchanged and .between_renames, are killed in tests/test_io.py.)
POINTS = {stage: ["atomic_dir.written", "atomic_file.written"] for stage in STAGES}
POINTS["evaluate"] = ["atomic_file.written"]  # its output is one file (metrics/eval.json)
POINTS["train"] = ["atomic_dir.written", "atomic_file.written", "train.checkpoint.3"]
STALE = re.compile(r"^\..+\.(tmp|old)-\d+$")


def env(**extra: str) -> dict[str, str]:
    return project_env(DAGSTER_HOME=extra.pop("DAGSTER_HOME", os.environ.get("DAGSTER_HOME", "")), **extra)


def locked(root: Path) -> dict[str, str]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for s in COMPARED for o in stages[s]["outs"] if o["path"] in COMPARED[s]}


def partial_artifacts(root: Path) -> list[str]:
    """Every output that exists but cannot be read whole: what a later stage would consume."""
    lay, bad = Layout(root), []
    checks = {
        lay.raw: lambda: sum(b.num_rows for b in iter_batches(lay.raw)),
        lay.clean: lambda: sum(b.num_rows for b in iter_batches(lay.clean)),
        lay.tokenizer: lambda: Tokenizer.load(lay.tokenizer).encode("To be"),
        lay.shards: lambda: verify_shards(lay.shards),
        lay.final: lambda: load_final(lay.final),
        lay.checkpoints / "last.pt": lambda: torch.load(lay.checkpoints / "last.pt", weights_only=True)["step"],
        lay.reports: lambda: (lay.reports / "report.html").read_text().index("</html>"),
    }
    for path, check in checks.items():
        if path.exists():
            try:
                check()
            except (UserError, OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
                bad.append(f"{path.relative_to(root)}: {type(e).__name__}: {e}")
    for metrics in lay.metrics_dir.glob("*.json"):
        try:
            json.loads(metrics.read_text())
        except ValueError as e:
            bad.append(f"{metrics.relative_to(root)}: {e}")
    return bad


def _become_subreaper() -> None:
    """Linux prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are reparented to this process."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def started(output: str, stage: str) -> bool:
    """Whether DVC (run directly or by a Dagster step) has started the stage's command."""
    return f"Running stage '{stage}'" in output or f"> llm {stage}" in output


def kill_during(cmd: list[str], cwd: Path, stage: str, delay: float, extra_env: dict[str, str]) -> tuple[str, bool]:
    """Start cmd, wait until the stage's process (`llm STAGE`) starts (or the fault point kills
    it), then SIGKILL everything in the project after `delay` seconds: nothing gets to clean up.
    Returns the output and whether the stage's process was still running when the kill came."""
    _become_subreaper()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    begun, deadline = None, time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if begun is None and stage_processes(cwd, stage):
            begun = time.monotonic()
        if begun is not None and time.monotonic() - begun >= delay:
            break
        time.sleep(0.02)
    inside = proc.poll() is None and bool(stage_processes(cwd, stage))
    # Everything running in the project, as a power cut would: Dagster's step processes and their
    # `dvc repro` are not all in this process group. This test process is a subreaper, so the
    # killed orphans become its children and are reaped here, as an init process reaps them
    # (DVC's lock would otherwise take an unreaped zombie for a live writer).
    seen: set[int] = set()
    with contextlib.suppress(psutil.Error):
        seen |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = _in_project(cwd)
        seen |= {p.pid for p in alive}
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        for pid in seen:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if not alive and not any(psutil.pid_exists(pid) for pid in seen):
            break
        time.sleep(0.2)
    proc.wait(timeout=30)
    reader.join(timeout=10)
    return "".join(lines), inside


def stage_processes(root: Path, stage: str) -> list[psutil.Process]:
    """The stage's own processes (`llm STAGE`, as DVC starts it), seen directly rather than
    through the output: a Dagster step hands its subprocess's lines on in chunks."""
    out = []
    for p in _in_project(root):
        with contextlib.suppress(psutil.Error):
            parts = p.cmdline()
            if len(parts) >= 2 and parts[-1] == stage and Path(parts[-2]).name == "llm":
                out.append(p)
    return out


def _in_project(root: Path) -> list[psutil.Process]:
    """Processes (not zombies) whose working directory is the project: its stages and tools."""
    out = []
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.info["status"] != psutil.STATUS_ZOMBIE and Path(p.cwd()).is_relative_to(root):
                out.append(p)
    return out


def trial_plan(seed: int = 20261122) -> list[dict]:
    """Seeded: every stage killed twice, once through `dvc repro` and once through a Dagster
    materialization; of the `dvc repro` kills, every other stage's at a forced window (a fault
    point) and the rest on a timer, the two alternating with the seed."""
    rng = random.Random(seed)
    first = rng.randrange(2)
    plan = []
    for t, (stage, engine) in enumerate((s, e) for s in STAGES for e in ("dvc", "dagster")):
        kind = "dagster" if engine == "dagster" else ["timer", "point"][(STAGES.index(stage) + first) % 2]
        point = rng.choice(POINTS[stage])
        plan.append({"trial": t, "stage": stage, "via": kind, "fraction": rng.random(),
                     "point": point if kind == "point" else None})
    return plan


def downstream_assets(root: Path, stage: str) -> list[str]:
    """The stage's asset and everything downstream of it, less the scaling ladder (partitioned:
    a materialization of it names a rung)."""
    import dagster as dg

    from pipelines import build_definitions

    graph = build_definitions(root).resolve_asset_graph()
    selection = dg.AssetSelection.assets(stage).downstream() - dg.AssetSelection.assets("ladder").downstream()
    return sorted(key.to_user_string() for key in selection.resolve(graph))


@pytest.mark.parametrize("trial", trial_plan(), ids=lambda t: f"{t['trial']}-{t['via']}-{t['stage']}")
def test_a_kill_inside_a_stage_loses_nothing_and_the_rerun_is_identical(template: Template, tmp_path: Path,
                                                                        trial: dict, record_property):
    """From a copy of the suite's reproduced project, the killed stage and what follows it are
    forced to run again; the rerun must give the uninterrupted run's outputs."""
    ref_hashes, seconds = locked(template.root), template.seconds
    root = copy_project(template.root, tmp_path / "project")
    stage = trial["stage"]
    # Anywhere in the stage's process: its start-up (imports, reading params) and its work.
    delay = 0.05 + trial["fraction"] * 0.9 * seconds[stage]
    extra: dict[str, str] = {}
    if trial["point"]:
        extra["LLM_FAULT_POINT"] = trial["point"]
        delay = 600  # the process kills itself at the point
    if trial["via"] == "dagster":
        home = tmp_path / "dagster_home"
        home.mkdir()
        extra.update(DAGSTER_HOME=str(home), LLM_PROJECT=str(root))
        config = json.dumps({"ops": {stage: {"config": {"force": True}}}})
        cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "pipelines",
               "--select", ",".join(downstream_assets(root, stage)), "--config-json", config]
    else:
        cmd = [dvc_bin(), "repro", "--force", "--no-run-cache", "--downstream", stage]
    out, inside = kill_during(cmd, root, stage, delay, extra)
    if trial["point"]:  # the stage's process killed itself at the point, so it never finished
        inside = f"INFO llm: {stage}: done in" not in out
        assert inside, f"{trial['point']} never came in {stage}:\n{out[-3000:]}"
    assert started(out, stage), out[-3000:]  # a run that failed before the stage would make the trial vacuous
    found = partial_artifacts(root)
    rerun = subprocess.run([dvc_bin(), "repro", "--no-run-cache"], cwd=root, env=env(), capture_output=True, text=True,
                           timeout=600)
    # Counted by conftest.py over all trials (across pytest-xdist workers) and printed at the end.
    record_property("kill_trial", {"partial": len(found), "rerun_failed": rerun.returncode != 0,
                                   "inside": inside})
    assert not found, found
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    assert locked(root) == ref_hashes
    # Nothing a killed stage wrote stays: the next stage's sweep removes it (a rerun in which no
    # stage needs to run leaves it for the next one; the sweep is what runs first in any stage).
    remove_stale_outputs(Layout(root))
    left = [p for d in ("data", "models", "metrics", "reports") for p in (root / d).rglob(".*") if STALE.match(p.name)]
    assert not left, left

