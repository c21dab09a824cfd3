"""The scaling ladder in Dagster: asset `ladder` has one static partition per rung of
`ladder.rungs` (params.yaml); each trains a model of that shape on the current shards for the
ladder's fixed token budget (`llm ladder RUNG`, logged to MLflow). Asset `scaling` plots val bits
per byte against training FLOPs across the rungs, and updates itself when a rung does.

These are experiments beside the DVC pipeline, not stages of it: their outputs live in ladder/.
"""


import hashlib
import sys
from pathlib import Path

import dagster as dg

from assets import ui
from assets.dvc_assets import stream
from llm.layout import Layout

GROUP = "scaling"


def _llm(project: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "llm.cli", *args, "--params", str(project / "params.yaml")]


def ladder_assets(project: Path, rungs: list[str]) -> list[dg.AssetsDefinition]:
    from llm.io import read_json
    from llm.ladder import RESULT, ladder_dir

    partitions = dg.StaticPartitionsDefinition(rungs)

    @dg.asset(
        name="ladder",
        deps=["shards", "tokenizer"],
        partitions_def=partitions,
        group_name=GROUP,
        kinds={"pytorch", "mlflow"},
        description="One model size per partition (ladder.rungs), trained on the current shards for the same number "
                    "of tokens, evaluated and logged to MLflow (experiment ladder.experiment). Outputs: ladder/RUNG/.",
    )
    def ladder(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from assets.model import run_views

        rung = context.partition_key
        stream(context, _llm(project, "ladder", rung), project, f"llm ladder {rung}")
        run = Layout.of(project, ladder_dir(project) / rung)
        point = read_json(run.metrics_dir / RESULT)
        train = read_json(run.metrics("train"))
        metadata = {
            "parameters": point["params"],
            "shape": f"{point['n_layer']} layers x {point['n_embd']} wide, {point['n_head']} heads",
            "tokens": point["tokens"],
            "training FLOPs": float(point["train_flops"]),
            "val_bpb": point["val_bpb"],
            "val loss": point["val_loss"],
            "tokens per second": point["tokens_per_sec"],
            **run_views(run, train, f"rung {rung}: train and val loss"),
        }
        weights = (run.final / "model.safetensors").read_bytes()
        return dg.MaterializeResult(metadata=metadata,
                                    data_version=dg.DataVersion(hashlib.sha256(weights).hexdigest()[:16]))

    @dg.asset(
        name="scaling",
        deps=["ladder"],
        group_name=GROUP,
        kinds={"matplotlib"},
        automation_condition=dg.AutomationCondition.eager(),
        description="Val bits per byte against training compute across the rungs that have run, with a power-law fit "
                    "(ladder/scaling.png, ladder/scaling.json).",
    )
    def scaling(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        stream(context, _llm(project, "scaling"), project, "llm scaling")
        summary = read_json(ladder_dir(project) / "scaling.json")
        rows = [{"rung": p["rung"], "parameters": p["params"], "training FLOPs": float(p["train_flops"]),
                 "val_bpb": p["val_bpb"]}
                for p in summary["points"]]
        metadata = {
            "plot": ui.image((ladder_dir(project) / "scaling.png").read_bytes(),
                             "val bits per byte against training FLOPs"),
            "rungs": ui.table(rows),
            "rungs missing": ", ".join(summary["missing"]) or "none",
            "path": dg.MetadataValue.path(str(ladder_dir(project) / "scaling.png")),
        }
        if summary["fit"]:
            metadata["fit: bpb = a * FLOPs^b, b"] = round(summary["fit"]["b"], 4)
        return dg.MaterializeResult(metadata=metadata)

    return [ladder, scaling]
