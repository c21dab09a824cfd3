"""One Dagster asset per DVC stage, derived from dvc.yaml: the DAG is declared once.

Materializing an asset runs `dvc repro --single-item STAGE`, so dvc.lock and the DVC cache stay
authoritative (a stage whose inputs did not change is reported as cached, not recomputed); the
stage's output streams into the Dagster run log; the data version is DVC's hash of its outputs.
"""


import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from assets.dvc_project import Stage, locked_hashes, read_stages

GROUP = "pipeline"


def dvc_command() -> str:
    """`dvc` from the project's environment (make setup links it there), else from PATH."""
    here = Path(sys.executable).parent
    found = shutil.which("dvc", path=f"{here}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise dg.Failure(description="dvc is not installed: run `make setup`")
    return found


def data_version(project: Path, stage: str) -> dg.DataVersion | None:
    hashes = locked_hashes(project, stage)
    if not hashes:
        return None
    blob = json.dumps(hashes, sort_keys=True).encode()
    return dg.DataVersion(hashlib.sha256(blob).hexdigest()[:16])


def run_stage(context: dg.AssetExecutionContext, project: Path, stage: Stage) -> dg.MaterializeResult:
    env = {**os.environ, "DAGSTER_RUN_ID": context.run_id, "LLM_PROGRESS": "0"}
    cmd = [dvc_command(), "repro", "--single-item", stage.name]
    context.log.info(f"{' '.join(cmd[1:])} in {project}")
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                context.log.info(line)
    if proc.returncode != 0:
        raise dg.Failure(description=f"dvc repro {stage.name} failed (exit {proc.returncode})",
                         metadata={"output": dg.MetadataValue.md("```\n" + "\n".join(lines[-40:]) + "\n```")})
    recomputed = any(line.startswith(f"Running stage '{stage.name}'") for line in lines)
    hashes = locked_hashes(project, stage.name)
    return dg.MaterializeResult(
        data_version=data_version(project, stage.name),
        metadata={"recomputed": recomputed, "dvc_hashes": dg.MetadataValue.json(hashes)},
    )


def stage_asset(project: Path, stage: Stage) -> dg.AssetsDefinition:
    @dg.asset(
        name=stage.name,
        deps=list(stage.upstream),
        description=stage.desc or f"DVC stage {stage.name}: {stage.cmd}",
        group_name=GROUP,
        kinds={"dvc"},
        metadata={"cmd": stage.cmd, "outs": list(stage.outs), "params": list(stage.params)},
    )
    def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        return run_stage(context, project, stage)

    return _asset


def build_assets(project: Path) -> list[dg.AssetsDefinition]:
    """An asset for every stage of project/dvc.yaml, in the file's order."""
    return [stage_asset(Path(project), s) for s in read_stages(project)]
