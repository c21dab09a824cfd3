"""The recipe ablation: each model v2 option alone against the baseline, then all together, on
the project's shards (the held-out plays), at a fixed number of steps; prints val bits per byte,
step time and the time each would get within the same wall-clock budget.

    python benchmarks/ablation.py --steps 600                  # every variant, seed 1337
    python benchmarks/ablation.py --steps 1500 --variants baseline,all --seeds 1337,7

Needs `dvc repro shards` first. Runs go to benchmarks/out/ablation/NAME-SEED/ (MLflow
experiment llm-ablation, not registered); the table also goes to benchmarks/out/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.config import load_params, parse_params  # noqa: E402
from llm.evaluate import evaluate  # noqa: E402
from llm.layout import Layout  # noqa: E402
from llm.progress import setup_logging  # noqa: E402
from llm.train import train  # noqa: E402

MODERN_BLOCK = {"position": "rope", "norm": "rmsnorm"}
VARIANTS: dict[str, dict] = {
    "baseline": {},
    "muon": {"train": {"optimizer": "muon"}},
    "wsd": {"train": {"schedule": "wsd"}},
    "rope": {"model": {"position": "rope"}},
    "rmsnorm": {"model": {"norm": "rmsnorm"}},
    "qk_norm": {"model": {"qk_norm": True}},
    "relu2": {"model": {"mlp": "relu2"}},
    "swiglu": {"model": {"mlp": "swiglu"}},
    "zero_init": {"model": {"zero_init": True}},
    "all": {"model": {**MODERN_BLOCK, "qk_norm": True, "mlp": "swiglu", "zero_init": True, "bias": False},
            "train": {"optimizer": "muon", "schedule": "wsd"}},
    "all-relu2": {"model": {**MODERN_BLOCK, "qk_norm": True, "mlp": "relu2", "zero_init": True, "bias": False},
                  "train": {"optimizer": "muon", "schedule": "wsd"}},
}


def variant_params(base: dict, name: str, steps: int, seed: int, extra: dict) -> object:
    data = json.loads(json.dumps(base))
    data["seed"] = seed
    for group, values in {**VARIANTS[name]}.items():
        data[group].update(values)
    for group, values in extra.items():
        data[group].update(values)
    warmup = max(1, round(steps * 0.05))
    data["train"].update(max_steps=steps, warmup_steps=warmup, time_budget_minutes=0, eval_interval=steps, checkpoint_interval=steps)
    data["tracking"].update(experiment="llm-ablation")
    return parse_params(data, source=f"ablation {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="1337")
    ap.add_argument("--set", default="{}", help='JSON overrides for every variant, e.g. {"train": {"muon_learning_rate": 0.01}}')
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "ablation.json"))
    args = ap.parse_args()
    setup_logging("WARNING")
    base = load_params(REPO / "params.yaml").model_dump(mode="json")
    rows = []
    for name in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            params = variant_params(base, name, args.steps, seed, json.loads(args.set))
            layout = Layout.of(REPO, REPO / "benchmarks" / "out" / "ablation" / f"{name}-{seed}")
            t0 = time.perf_counter()
            summary = train(params, layout, resume="never", tags={"ablation": name})
            seconds = time.perf_counter() - t0
            result = evaluate(params, layout, register=False)
            rows.append({"variant": name, "seed": seed, "steps": args.steps, "val_bpb": result["val_bpb"],
                         "val_loss": result["val_loss"], "train_seconds": summary["train_seconds"],
                         "step_ms": round(1000 * summary["train_seconds"] / args.steps, 1), "wall_seconds": round(seconds, 1),
                         "params": summary["params"]})
            print(f"{name:>10} seed {seed}: val_bpb {result['val_bpb']:.4f}  {rows[-1]['step_ms']} ms/step  "
                  f"{summary['params'] / 1e6:.2f} M params", flush=True)
    base_ms = next((r["step_ms"] for r in rows if r["variant"] == "baseline"), None)
    print("\n| variant | seed | val bpb | ms/step | step time vs baseline |\n| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['step_ms'] / base_ms:.2f}x" if base_ms else "-"
        print(f"| {r['variant']} | {r['seed']} | {r['val_bpb']:.4f} | {r['step_ms']} | {ratio} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
