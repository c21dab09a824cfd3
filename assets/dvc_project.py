"""dvc.yaml as a graph of stages, the way dagster-dbt reads a dbt manifest.

No Dagster here: this module reads the declaration; `assets.dvc_assets` turns it into assets.
A stage depends on another when one of its deps is, or lies inside, one of the other's outputs
(outs, metrics and plots alike), which is how DVC itself orders stages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from llm.dvclock import locked_outs


def _paths(entries: list | None) -> list[str]:
    """Paths of a deps/outs/metrics/plots list, whose items are strings or {path: options}."""
    out = []
    for item in entries or []:
        out.extend([item] if isinstance(item, str) else list(item))
    return out


def _inside(path: str, out: str) -> bool:
    p, o = PurePosixPath(path), PurePosixPath(out)
    return p == o or o in p.parents


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    desc: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # outs, metrics and plots: everything the stage writes
    params: tuple[str, ...]
    upstream: tuple[str, ...] = field(default=())


def read_stages(project: Path) -> list[Stage]:
    """The stages of project/dvc.yaml in file order, each with the stages it depends on."""
    data = yaml.safe_load((Path(project) / "dvc.yaml").read_text(encoding="utf-8")) or {}
    raw = data.get("stages", {})
    written: dict[str, str] = {}
    stages = []
    for name, spec in raw.items():
        outs = tuple(_paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots")))
        for o in outs:
            written[o] = name
        params = []
        for p in spec.get("params", []) or []:
            params.extend([p] if isinstance(p, str) else [k for v in p.values() for k in (v or [])])
        cmd = spec.get("cmd", "")
        stages.append(Stage(name, " && ".join(cmd) if isinstance(cmd, list) else cmd, spec.get("desc", ""),
                            tuple(_paths(spec.get("deps"))), outs, tuple(params)))
    result = []
    for s in stages:
        up = sorted({owner for d in s.deps for out, owner in written.items() if owner != s.name and _inside(d, out)})
        result.append(Stage(s.name, s.cmd, s.desc, s.deps, s.outs, s.params, tuple(up)))
    return result


def locked_hashes(project: Path, stage: str) -> dict[str, str]:
    """DVC's hashes of a stage's outputs, from dvc.lock (empty when the stage never ran)."""
    return locked_outs(project).get(stage, {})


def code_deps(stage: Stage) -> tuple[str, ...]:
    """The stage's code: the Python files among its deps, sorted."""
    return tuple(sorted(d for d in stage.deps if d.endswith(".py")))


def code_version(project: Path, stage: Stage) -> str:
    """The version of a stage's code, the way dagster-dbt versions a model by its SQL: a hash of
    its command and of the content of each Python file among its deps, read now. It changes when,
    and only when, one of those files or the command changes, which is when DVC reruns the stage
    for its code. Each file counts by its md5, the hash dvc.lock records for it; a missing file
    counts as missing (DVC will say so when the stage runs)."""
    files = {}
    for dep in code_deps(stage):
        path = Path(project) / dep
        files[dep] = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    blob = json.dumps({"cmd": stage.cmd, "code": files}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
