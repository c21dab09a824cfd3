"""The model stages (train, evaluate, report): what their asset pages show and the checks their
outputs must pass. The stages themselves are declared in dvc.yaml."""

from __future__ import annotations

import math

import dagster as dg

from assets import ui
from assets.spec import Check, StageSpec
from llm.layout import Layout

GROUP = "model"


def _read(layout: Layout, name: str) -> dict:
    from llm.io import read_json

    return read_json(layout.metrics(name))


# ----------------------------------------------------------------------------- metadata
def run_views(layout: Layout, summary: dict, alt: str) -> dict:
    """A training run's loss curve (image) and, when it was tracked, the link to its MLflow run."""
    from llm.report import loss_plot, read_history

    out = {"loss curve": ui.image(loss_plot(read_history(layout.loss_csv)), alt)}
    if summary.get("mlflow_run_id") and summary.get("mlflow_experiment_id"):
        out["MLflow run"] = ui.mlflow_run_url(summary["mlflow_experiment_id"], summary["mlflow_run_id"])
    return out


def train_metadata(layout: Layout) -> dict:
    s = _read(layout, "train")
    out = {
        "parameters": s["params"],
        "steps": s["steps"],
        "stopped by": s["stopped_by"],
        "tokens seen": s["tokens_seen"],
        "final train loss": s["final_train_loss"],
        "final val loss": s["final_val_loss"],
        "initial val loss": s["initial_val_loss"],
        "tokens per second": s["tokens_per_sec"],
        "MFU": s["mfu"],
        "train seconds": s["train_seconds"],
        "device": f"{s['device']} x {s['processes']}",
    }
    return out | run_views(layout, s, "train and val loss per step")


def evaluate_metadata(layout: Layout) -> dict:
    e = _read(layout, "eval")
    rows = [{"model": "this model", "bits per byte": e["val_bpb"], "beaten": ""}]
    rows += [{"model": name, "bits per byte": v, "beaten": "yes" if e["beats"][name] else "no"}
             for name, v in sorted(e["baseline_bpb"].items(), key=lambda kv: kv[1])]
    out = {"val_bpb": e["val_bpb"], "val loss": e["val_loss"], "val perplexity": e["val_ppl"],
           "val bytes": e["val_bytes"], "against baselines": ui.table(rows)}
    out.update({f"{name} bpb": v for name, v in e["baseline_bpb"].items()})
    return out


def report_metadata(layout: Layout) -> dict:
    md = (layout.reports / "report.md").read_text(encoding="utf-8")
    samples = md.split("## Samples", 1)[-1].split("\n## ", 1)[0].strip()
    return {
        "path": dg.MetadataValue.path(str(layout.reports / "report.html")),
        "samples": dg.MetadataValue.md(samples),
    }


def export_metadata(layout: Layout) -> dict:
    from llm.gguf_export import MANIFEST, file_name
    from llm.io import read_json

    config = read_json(layout.hf / "config.json")
    gguf = read_json(layout.gguf / MANIFEST)
    out = {
        "architecture": ", ".join(config.get("architectures", [])),
        "path": dg.MetadataValue.path(str(layout.hf)),
        "files": ", ".join(sorted(p.name for p in layout.hf.iterdir())),
        "load it": ui.fenced(f'AutoModelForCausalLM.from_pretrained("{layout.hf}")\n'
                             f'AutoTokenizer.from_pretrained("{layout.hf}")'),
        "GGUF files": ui.table([{"file": f"{layout.gguf.name}/{name}", "size": f"{size / 1e6:.2f} MB", "bytes": size}
                                for name, size in gguf["files"].items()]),
    }
    if gguf["architecture"]:
        out["run it in llama.cpp"] = ui.fenced(f'llama-completion -m {layout.gguf / file_name("f32")} -p "ROMEO:" '
                                               f"-n 64 -no-cnv")
    else:
        out["no GGUF"] = gguf["reason"]
    return out


# ----------------------------------------------------------------------------- checks
def training_sane(layout: Layout) -> tuple[bool, dict]:
    """Every logged loss is finite and the final val loss is below the initial (uniform) one."""
    from llm.report import read_history

    summary = _read(layout, "train")
    losses = [r[k] for r in read_history(layout.loss_csv) for k in ("train_loss", "val_loss")]
    finite = all(math.isfinite(v) for v in losses)
    improved = summary["final_val_loss"] < summary["initial_val_loss"]
    return finite and improved, {"final val loss": summary["final_val_loss"],
                                 "initial val loss": summary["initial_val_loss"],
                                 "all losses finite": finite}


def beats_bz2(layout: Layout) -> tuple[bool, dict]:
    result = _read(layout, "eval")
    bz2 = result["baseline_bpb"]["bz2"]
    return result["val_bpb"] < bz2, {"val_bpb": result["val_bpb"], "bz2_bpb": bz2}


SPECS = {
    "train": StageSpec(GROUP, train_metadata, (Check("loss_sane", training_sane,
                                                     "losses finite, final val loss below the initial one"),),
                       live=True),
    "evaluate": StageSpec(GROUP, evaluate_metadata, (Check("beats_bz2", beats_bz2,
                                                           "val bits per byte below bz2 -9 on the same text"),)),
    "report": StageSpec(GROUP, report_metadata),
    "export": StageSpec(GROUP, export_metadata),
}
