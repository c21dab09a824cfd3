"""One Dagster asset per DVC stage, derived from dvc.yaml: the DAG is declared once.

Materializing an asset runs `dvc repro --single-item STAGE`, so dvc.lock and the DVC cache stay
authoritative (a stage whose inputs did not change is reported as cached, not recomputed); the
stage's output streams into the Dagster run log; the data version is DVC's hash of its outputs.
A per-stage module (assets/data.py, assets/model.py) adds the group, the metadata the UI shows
and the checks; a stage without one is still an asset, in group `pipeline`.
"""


import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from assets import ui
from assets.dvc_project import Stage, code_deps, code_version, locked_hashes, read_stages
from assets.spec import StageSpec
from llm import common
from llm.layout import Layout

GROUP = "pipeline"


def dvc_command() -> str:
    """`dvc` from the project's environment (make setup links it there), else from PATH."""
    found = common.dvc_command()
    if found is None:
        raise dg.Failure(description="dvc is not installed: run `make setup`")
    return found


def data_version(project: Path, stage: str) -> dg.DataVersion | None:
    hashes = locked_hashes(project, stage)
    if not hashes:
        return None
    blob = json.dumps(hashes, sort_keys=True).encode()
    return dg.DataVersion(hashlib.sha256(blob).hexdigest()[:16])


def stream(context: dg.AssetExecutionContext, cmd: list[str], cwd: Path, what: str,
           extra_env: dict[str, str] | None = None, on_line: Callable[[], None] | None = None) -> list[str]:
    """Run cmd in cwd, each output line into the run log as it comes (then on_line()); a failure
    names `what`."""
    # The stage commands (`llm ...`) come from this environment, as dvc does.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "DAGSTER_RUN_ID": context.run.run_id, "LLM_PROGRESS": "0", **(extra_env or {})}
    context.log.info(f"{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))} in {cwd}")
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                context.log.info(line)
            if on_line is not None:
                on_line()
    if proc.returncode != 0:
        # The error line (ours or DVC's) says what happened; DVC's later lines are advice.
        headline = next((line for line in lines if line.startswith(("error:", "ERROR:"))),
                        lines[-1] if lines else "no output")
        raise dg.Failure(description=f"{what} failed (exit {proc.returncode}): {headline}",
                         metadata={"output": ui.fenced("\n".join(lines[-40:]))})
    return lines


class LiveMetrics:
    """Step metrics a stage sends over Dagster Pipes (custom messages) -> asset observations."""

    def __init__(self, context: dg.AssetExecutionContext, asset: str, session: dg.PipesSession):
        self.context, self.asset, self.session, self.seen = context, asset, session, 0

    def drain(self) -> None:
        messages = self.session.get_custom_messages()
        for message in messages[self.seen:]:
            if isinstance(message, dict) and "step" in message:
                metadata = {k: float(v) for k, v in message.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.context.log_event(dg.AssetObservation(asset_key=self.asset, metadata=metadata,
                                                           description=f"step {message['step']}"))
        self.seen = len(messages)


class StageRun(dg.Config):
    """Launchpad options of a stage asset."""

    force: bool = False
    """Run the stage even when DVC has its outputs for these inputs (`dvc repro --force`)."""


def run_stage(context: dg.AssetExecutionContext, project: Path, stage: Stage, spec: StageSpec | None = None,
              force: bool = False) -> dg.MaterializeResult:
    cmd = [dvc_command(), "repro", "--single-item", *(["--force"] if force else []), stage.name]
    if spec is not None and spec.live:
        # Dagster Pipes through DVC: the stage reports its step metrics while it runs, and each
        # becomes an observation of the asset (its Plots tab draws them). DVC stays the executor.
        with dg.open_pipes_session(context, context_injector=dg.PipesEnvContextInjector(),
                                   message_reader=dg.PipesTempFileMessageReader()) as session:
            live = LiveMetrics(context, stage.name, session)
            lines = stream(context, cmd, project, f"dvc repro {stage.name}", session.get_bootstrap_env_vars(),
                           live.drain)
        live.drain()
    else:
        lines = stream(context, cmd, project, f"dvc repro {stage.name}")
    recomputed = any(line.startswith(f"Running stage '{stage.name}'") for line in lines)
    metadata = {"recomputed": recomputed, **stage_metadata(project, stage.name, spec, context.log.warning)}
    return dg.MaterializeResult(data_version=data_version(project, stage.name), metadata=metadata)


def stage_metadata(project: Path, stage: str, spec: StageSpec | None, warn=None) -> dict:
    """What a stage's asset page shows: DVC's hashes of its outputs and the per-stage numbers.
    The same for a Dagster materialization and for a `dvc repro` the sensor reports."""
    metadata: dict = {"dvc_hashes": dg.MetadataValue.json(locked_hashes(project, stage))}
    if spec is not None and spec.metadata is not None:
        try:
            metadata.update(spec.metadata(Layout.of(project)))
        except Exception as e:  # noqa: BLE001 - the stage succeeded; say what the page lacks, keep the result
            if warn is not None:
                warn(f"{stage}: no UI metadata: {type(e).__name__}: {e}")
            metadata["metadata error"] = f"{type(e).__name__}: {e}"
    return metadata


def stage_asset(project: Path, stage: Stage, spec: StageSpec | None = None) -> dg.AssetsDefinition:
    @dg.asset(
        name=stage.name,
        deps=list(stage.upstream),
        description=stage.desc or f"DVC stage {stage.name}: {stage.cmd}",
        group_name=spec.group if spec else GROUP,
        kinds={"dvc"},
        # Dagster marks the asset stale when this differs from the one its last materialization recorded.
        code_version=code_version(project, stage),
        metadata={"cmd": stage.cmd, "outs": list(stage.outs), "params": list(stage.params),
                  "code": list(code_deps(stage))},
    )
    def _asset(context: dg.AssetExecutionContext, config: StageRun) -> dg.MaterializeResult:
        return run_stage(context, project, stage, spec, config.force)

    return _asset


def build_assets(project: Path, specs: dict[str, StageSpec] | None = None) -> list[dg.AssetsDefinition]:
    """An asset for every stage of project/dvc.yaml, in the file's order, with its spec
    (default: the project's, assets.STAGE_SPECS)."""
    if specs is None:
        from assets import STAGE_SPECS as specs
    return [stage_asset(Path(project), s, specs.get(s.name)) for s in read_stages(project)]
