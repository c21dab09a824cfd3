"""The Model Registry's gate: every evaluated model becomes a version, and the `champion` alias
moves to it only when its val bits per byte beat the champion's."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llm.mlflow_store import open_mlflow

log = logging.getLogger("llm.tracking")
CHAMPION = "champion"


def register_and_gate(root: Path, name: str, run: Any, artifact_path: str, val_bpb: float) -> dict:
    """Register the run's model as a new version (tagged with its val_bpb and the DVC hashes of
    its data); move the `champion` alias to it only if its val_bpb beats the current champion's,
    and say why on the version and the registered model. Returns the decision."""
    mlflow = open_mlflow(root)
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet
        try:
            client.create_registered_model(name, description="GPT models trained by llm-pipeline; champion = best "
                                                             "val_bpb")
        except mlflow.exceptions.MlflowException as e:  # a parallel experiment registered it first
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    source = f"{run.info.artifact_uri}/{artifact_path}"
    run = client.get_run(run.info.run_id)  # with the tags set since it started
    data = {k: v for k, v in run.data.tags.items() if k.startswith("dvc.")}
    version = client.create_model_version(
        name, source, run_id=run.info.run_id, tags={"val_bpb": f"{val_bpb:.6f}", **data,
                                                    "git.commit": run.data.tags.get("git.commit", "")},
        description=f"{run.info.run_name}: val_bpb {val_bpb:.4f} on the held-out split",
    )
    champion_bpb = None
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        champion_bpb = float(current.tags.get("val_bpb", "inf"))
    except Exception:  # noqa: BLE001 - no champion yet
        current = None
    promoted = champion_bpb is None or val_bpb < champion_bpb
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        why = "the first model" if champion_bpb is None else f"beats version {current.version}'s {champion_bpb:.4f}"
        client.update_registered_model(name, description=f"GPT models trained by llm-pipeline. `champion` is version "
                                                         f"{version.version} ({run.info.run_name}): val_bpb "
                                                         f"{val_bpb:.4f}, {why}.")
        verdict = f"champion: {why}"
    else:
        verdict = f"not champion: version {current.version} has val_bpb {champion_bpb:.4f}"
    client.update_model_version(name, version.version,
                                description=f"{run.info.run_name}: val_bpb {val_bpb:.4f}; {verdict}")
    decision = {
        "model": name,
        "version": int(version.version),
        "val_bpb": val_bpb,
        "previous_champion_version": int(current.version) if current is not None else None,
        "previous_champion_val_bpb": champion_bpb,
        "promoted": promoted,
    }
    log.info(
        "mlflow: registered %s version %s (val_bpb %.4f); %s",
        name, version.version, val_bpb,
        "now champion" if promoted else f"champion stays version {decision['previous_champion_version']} "
                                        f"({champion_bpb:.4f})",
    )
    return decision
