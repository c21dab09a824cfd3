"""What evaluate, report and export add to the pipeline's MLflow run, and the process that adds it.

Importing MLflow and opening its store takes a tracked stage seconds, more than the stage's own
work on a small model (docs/LOG.md). So `llm STAGE` starts this module as a second process before
it imports the stage: that process imports MLflow, opens the store and finds the run while the
stage imports torch and works on the other core. At the end the stage hands it a `RunLog` and waits
for its answer; a failure there fails the stage with the worker's one line. A stage that dies
first closes the pipe, and the worker logs nothing. Called as a library (no worker open), the
stage logs in its own process.

Protocol, one JSON line each way: the stage writes {"params", "root", "run_dir"} at start and the RunLog at
the end (nothing: cancelled); the worker answers {"run_id"} or {"error", "user"} last on stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llm.config import Params
from llm.errors import UserError, server_problem
from llm.layout import Layout

log = logging.getLogger(__name__)
ANSWER = "llm.stage_log: "  # the worker's answer line on stdout; anything else there is passed through


@dataclass
class RunLog:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (a file or folder, its folder in the run)
    champion_bpb: float | None = None  # evaluate: register the model; `champion` moves if this val bpb wins


def apply(run_log: RunLog, params: Params, layout: Layout) -> str:
    """Log into the run that trained the model (llm.tracking.resume_run); returns its id."""
    from llm.mlflow_store import open_mlflow
    from llm.registry import register_and_gate
    from llm.tracking import resume_run

    root = layout.root
    mlflow = open_mlflow(root)
    with resume_run(layout.metrics("train"), root, params) as run:
        if run_log.metrics:
            mlflow.log_metrics(run_log.metrics)
        for path, folder in run_log.artifacts:
            if Path(path).is_dir():
                mlflow.log_artifacts(path, artifact_path=folder)
            else:
                mlflow.log_artifact(path, artifact_path=folder)
        if run_log.champion_bpb is not None:
            register_and_gate(root, params.tracking.registered_model, run, "model", run_log.champion_bpb)
        return run.info.run_id


class Worker:
    """The stage's side: starts `python -m llm.stage_log` and warms it with the params and layout."""

    def __init__(self, params: Params, layout: Layout):
        self.proc = subprocess.Popen([sys.executable, "-m", "llm.stage_log"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        start = {"params": params.model_dump(mode="json"), "root": str(layout.root),
                 "run_dir": str(layout.run_dir) if layout.run_dir is not None else None}
        self.proc.stdin.write(json.dumps(start) + "\n")
        self.proc.stdin.flush()

    def send(self, run_log: RunLog) -> str:
        out, _ = self.proc.communicate(json.dumps(asdict(run_log)) + "\n")
        answer = None
        for line in out.splitlines():
            if line.startswith(ANSWER):
                answer = json.loads(line[len(ANSWER):])
            else:
                print(line)
        if answer is None:
            raise RuntimeError(f"the MLflow logging process ended with code {self.proc.returncode} and no answer")
        if "error" in answer:
            raise (UserError if answer["user"] else RuntimeError)(answer["error"])
        return answer["run_id"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_worker: Worker | None = None


@contextlib.contextmanager
def worker(params: Params, layout: Layout) -> Iterator[None]:
    """A worker for the stage run inside, when tracking is on."""
    global _worker
    if not params.tracking.enabled:
        yield
        return
    _worker = started = Worker(params, layout)
    try:
        yield
    finally:
        started.close()
        _worker = None


def log_to_run(run_log: RunLog, params: Params, layout: Layout) -> str:
    """Hand the RunLog to this stage's worker, or log it here when there is none."""
    global _worker
    if _worker is None:
        return apply(run_log, params, layout)
    worker_, _worker = _worker, None  # one RunLog a stage
    return worker_.send(run_log)


def _answer(fn) -> dict:
    try:
        return {"run_id": fn()}
    except UserError as e:
        return {"error": str(e), "user": True}
    except Exception as e:  # handed to the stage, which fails with it; the traceback is logged here
        if line := server_problem(e):
            return {"error": line, "user": True}
        log.exception("logging to MLflow failed")
        return {"error": f"logging to MLflow failed: {type(e).__name__}: {e}", "user": False}


def _warm(mlflow) -> str:
    mlflow.MlflowClient().search_experiments(max_results=1)
    return ""


def main() -> int:
    from llm.mlflow_store import open_mlflow
    from llm.progress import setup_logging

    setup_logging("INFO")
    # At the stage's own priority: niced, it starves on a busy machine while the stage waits for it.
    start = json.loads(sys.stdin.readline())
    params, layout = Params.model_validate(start["params"]), Layout.of(start["root"], start["run_dir"])
    # the import and the store, warm while the stage works; an error waits for the stage's RunLog
    warm = _answer(lambda: _warm(open_mlflow(layout.root)))
    try:
        run_log = RunLog(**json.loads(sys.stdin.readline()))
    except ValueError:  # the stage died or gave up: log nothing
        return 0
    answer = warm if "error" in warm else _answer(lambda: apply(run_log, params, layout))
    print(ANSWER + json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
