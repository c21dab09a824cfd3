"""The scaling ladder: "scale gradually, measure loss".

Every rung of `ladder.rungs` is a model shape; each trains on the same shards for the same
number of tokens (`ladder.max_steps` x `train.tokens_per_step`, no time budget), is evaluated
like the main model, and is logged to MLflow (experiment `ladder.experiment`, not registered).
Its outputs go to ladder/NAME/. `scaling` then plots val bits per byte against training compute
(6N + attention FLOPs per token x tokens) across the rungs that have run, with a power-law fit.

    llm ladder NAME     train and evaluate one rung (a Dagster partition of asset `ladder`)
    llm scaling         ladder/scaling.png and ladder/scaling.json from the rungs so far
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from llm.config import Params, parse_params
from llm.errors import UserError
from llm.evaluate import evaluate
from llm.io import atomic_file, read_json, write_json
from llm.layout import Layout
from llm.train import train

log = logging.getLogger(__name__)
RESULT = "rung.json"


def ladder_dir(root: Path) -> Path:
    return Path(root) / "ladder"


def rung_params(params: Params, name: str) -> Params:
    """The project's params with the rung's shape and the ladder's fixed budget."""
    ladder = params.ladder
    if name not in ladder.rungs:
        raise UserError(f"ladder: no rung {name!r} in ladder.rungs (have: {', '.join(ladder.rungs)})")
    data = params.model_dump(mode="json")
    data["model"].update(ladder.rungs[name].model_dump())
    data["train"].update(max_steps=ladder.max_steps, warmup_steps=ladder.warmup_steps, time_budget_minutes=0)
    data["tracking"]["experiment"] = ladder.experiment
    return parse_params(data, source=f"ladder.rungs.{name}")


def run_rung(params: Params, root: Path, name: str, resume: str = "auto") -> dict:
    """Train and evaluate one rung into ladder/NAME/; returns (and writes) its point."""
    rp = rung_params(params, name)
    lay = Layout.of(root, ladder_dir(root) / name)
    log.info("ladder: rung %s: %d layers x %d wide, %d heads; %d steps x %d tokens", name, rp.model.n_layer,
             rp.model.n_embd, rp.model.n_head, rp.train.max_steps, rp.train.tokens_per_step)
    summary = train(rp, lay, resume, tags={"ladder.rung": name})
    result = evaluate(rp, lay, register=False)
    point = {
        "rung": name,
        **params.ladder.rungs[name].model_dump(),
        "params": summary["params"],
        "tokens": summary["tokens_seen"],
        "flops_per_token": summary["flops_per_token"],
        "train_flops": summary["flops_per_token"] * summary["tokens_seen"],
        "val_loss": result["val_loss"],
        "val_bpb": result["val_bpb"],
        "bz2_bpb": result["baseline_bpb"]["bz2"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_sec": summary["tokens_per_sec"],
        "mlflow_run_id": summary.get("mlflow_run_id"),
    }
    write_json(lay.metrics_dir / RESULT, point)
    log.info("ladder: rung %s: %.2f M params, %.3g FLOPs -> val_bpb %.4f", name, point["params"] / 1e6,
             point["train_flops"], point["val_bpb"])
    return point


def rung_points(params: Params, root: Path) -> list[dict]:
    """The results of the rungs of params that have run, by training compute."""
    points = [read_json(p) for name in params.ladder.rungs if (p := ladder_dir(root) / name / RESULT).is_file()]
    return sorted(points, key=lambda p: p["train_flops"])


def power_law(points: list[dict]) -> dict | None:
    """Least-squares fit of log(bpb) = log(a) + b log(C): bpb = a * C^b (None below 2 points)."""
    if len(points) < 2:
        return None
    xs = [math.log(p["train_flops"]) for p in points]
    ys = [math.log(p["val_bpb"]) for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"a": math.exp(my - b * mx), "b": b}


def scaling(params: Params, root: Path) -> dict:
    """ladder/scaling.png (val bpb against training FLOPs) and ladder/scaling.json."""
    points = rung_points(params, root)
    if not points:
        raise UserError("scaling: no rung has run yet (materialize asset `ladder`, or `llm ladder NAME`)")
    fit = power_law(points)
    out = ladder_dir(root)
    with atomic_file(out / "scaling.png", "wb") as f:
        f.write(scaling_plot(points, fit))
    summary = {"rungs": [p["rung"] for p in points], "points": points, "fit": fit,
               "missing": [n for n in params.ladder.rungs if n not in {p["rung"] for p in points}]}
    write_json(out / "scaling.json", summary)
    log.info("scaling: %d rung(s)%s -> %s", len(points),
             f"; bpb = {fit['a']:.3g} * C^{fit['b']:.3f}" if fit else "", out / "scaling.png")
    return summary


def scaling_plot(points: list[dict], fit: dict | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llm.report import png

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    flops = [p["train_flops"] for p in points]
    ax.plot(flops, [p["val_bpb"] for p in points], "o", ms=6, label="rungs")
    for p in points:
        ax.annotate(f"{p['rung']} ({p['params'] / 1e6:.2f} M)", (p["train_flops"], p["val_bpb"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    if fit:
        lo, hi = min(flops), max(flops)
        grid = [lo * (hi / lo) ** (i / 50) for i in range(51)] if hi > lo else [lo]
        ax.plot(grid, [fit["a"] * c ** fit["b"] for c in grid], "--", alpha=0.6, label=f"fit: bpb ∝ C^{fit['b']:.3f}")
    ax.axhline(points[0]["bz2_bpb"], color="grey", lw=1, ls=":", label="bz2 -9")
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("val bits per byte")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    data = png(fig)
    plt.close(fig)
    return data
