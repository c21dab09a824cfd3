"""dvc.lock, read in one place: what DVC recorded of each stage's last run."""

from __future__ import annotations

from pathlib import Path

import yaml


def locked_outs(root: Path) -> dict[str, dict[str, str]]:
    """{stage: {out path: md5}} from root/dvc.lock: DVC's hashes of what each stage wrote
    (a directory's ends in `.dir`). Empty when no stage has run."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
    return {name: {o["path"]: o.get("md5", "") for o in stage.get("outs") or []} for name, stage in stages.items()}


def training_data_hashes(root: Path) -> dict[str, str]:
    """{stage: md5} of the tokenizer and shards a model is trained on (absent outside `dvc repro`)."""
    locked = locked_outs(root)
    outs = {"tokenizer": "data/tokenizer", "shards": "data/shards"}
    return {stage: locked[stage][out] for stage, out in outs.items() if out in locked.get(stage, {})}
