"""The recipe ablation: each model v2 option alone against the baseline, then all together, on
the project's shards (the held-out plays), at the same wall-clock budget: each variant's step
time is measured first (benchmarks/train.py's measure, the machine quiet), and a variant whose
step is slower gets proportionally fewer steps than the baseline's --steps. The training runs
themselves then depend on steps only, not on the machine's load.

    python benchmarks/ablation.py --steps 600                  # every variant, seed 1337
    python benchmarks/ablation.py --steps 1500 --variants baseline,all --seeds 1337,7
    python benchmarks/ablation.py --steps 1500 --variants defaults --same-steps \
--set '{"train": {"decay_fraction": 0.5}}'

Every variant but `defaults` starts from the classic (2022) recipe, whatever params.yaml says.

The tokenizer's vocabulary, at equal compute: `--prepare-vocab 1024` tokenizes the repo's
data/clean again into benchmarks/out/vocab-1024/ (tokenizer and shards stages, nothing else
changed); `--data benchmarks/out/vocab-1024 --set '{"tokenizer": {"vocab_size": 1024}}'` then
trains on it (bits per byte stay comparable: they count the text's bytes, not its tokens).

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

from llm.common import table  # noqa: E402
from llm.config import load_params, parse_params  # noqa: E402
from llm.evaluate import evaluate  # noqa: E402
from llm.layout import Layout  # noqa: E402
from llm.progress import setup_logging  # noqa: E402
from llm.train import train  # noqa: E402

# The 2022 recipe (nanoGPT's) that every single-option variant changes one thing of.
CLASSIC = {"model": {"position": "learned", "norm": "layernorm", "qk_norm": False, "mlp": "gelu", "zero_init": False,
                     "bias": True},
           "train": {"optimizer": "adamw", "schedule": "cosine"}}
MODERN_BLOCK = {"position": "rope", "norm": "rmsnorm"}
VARIANTS: dict[str, dict] = {
    "defaults": None,  # params.yaml as it is (today's recipe), for sweeps with --set
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


def step_speeds(base: dict, names: list[str], extra: dict | None = None) -> dict[str, float]:
    """Training tokens/s of each variant's model and optimizer on random tokens, in one process.
    `defaults` is measured with the --set overrides (model, tokenizer.vocab_size, train.optimizer)
    and `defaults-plain` without: a sweep's steps are then scaled to params.yaml's own speed."""
    from benchmarks.train import measure
    from llm.device import measure_matmul_peak, pick_device, set_threads

    device = pick_device("cpu")
    set_threads(0)
    peak = measure_matmul_peak(device, seconds=1.0)
    m, t = base["model"], base["train"]
    extra = extra or {}
    speeds = {}
    for name in names + (["defaults-plain"] if "defaults" in names else []):
        variant = VARIANTS.get(name)
        if name == "defaults":
            model, train, vocab = ({**m, **extra.get("model", {})}, {**t, **extra.get("train", {})},
                                   extra.get("tokenizer", {}).get("vocab_size", base["tokenizer"]["vocab_size"]))
        elif variant is None:  # defaults-plain
            model, train, vocab = m, t, base["tokenizer"]["vocab_size"]
        else:
            model, train = {**m, **CLASSIC["model"], **variant.get("model", {})}, {**CLASSIC["train"],
                                                                                   **variant.get("train", {})}
            vocab = base["tokenizer"]["vocab_size"]
        accum = max(1, train["tokens_per_step"] // (train["batch_size"] * model["block_size"]))
        shape = (model["n_layer"], model["n_embd"], model["n_head"], model["block_size"], train["batch_size"], accum)
        options = {k: v for k, v in model.items()
                   if k in ("position", "norm", "qk_norm", "mlp", "zero_init", "bias", "rope_theta", "tie_embeddings")}
        speeds[name] = measure(shape, vocab, 12, 3, device, peak, (options, train["optimizer"]))["tokens_per_s"]
    return speeds


def variant_params(base: dict, name: str, steps: int, seed: int, extra: dict) -> object:
    data = json.loads(json.dumps(base))
    data["seed"] = seed
    if VARIANTS[name] is not None:
        for changes in (CLASSIC, VARIANTS[name]):
            for group, values in changes.items():
                data[group].update(values)
    for group, values in extra.items():
        data[group].update(values)
    warmup = max(1, round(steps * 0.05))
    data["train"].update(max_steps=steps, warmup_steps=warmup, time_budget_minutes=0, eval_interval=steps,
                         checkpoint_interval=steps)
    data["tracking"].update(experiment="llm-ablation")
    return parse_params(data, source=f"ablation {name}")


def prepare_vocab(base: dict, vocab: int) -> Path:
    """The repo's cleaned data tokenized with a `vocab`-piece tokenizer, in a project of its own."""
    from llm.stages import run

    root = REPO / "benchmarks" / "out" / f"vocab-{vocab}"
    (root / "data").mkdir(parents=True, exist_ok=True)
    clean = root / "data" / "clean"
    if not clean.exists():
        clean.symlink_to(REPO / "data" / "clean", target_is_directory=True)
    data = json.loads(json.dumps(base))
    data["tokenizer"]["vocab_size"] = vocab
    params = parse_params(data, source=f"ablation vocab {vocab}")
    for stage in ("tokenizer", "shards"):
        run(stage, params, Layout(root))
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="1337")
    ap.add_argument("--label", default="",
                    help="suffix of the run directories, so that sweeps do not overwrite each other")
    ap.add_argument("--same-steps", action="store_true", help="no speed calibration: every variant trains --steps")
    ap.add_argument("--set", default="{}",
                    help='JSON overrides for every variant, e.g. {"train": {"muon_learning_rate": 0.01}}')
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "ablation.json"))
    ap.add_argument("--data", default=str(REPO),
                    help="the project whose data/tokenizer and data/shards the runs train on (default: this repo)")
    ap.add_argument("--prepare-vocab", type=int, default=0, metavar="N",
                    help="tokenize data/clean again with N pieces into benchmarks/out/vocab-N, then stop")
    args = ap.parse_args()
    setup_logging("WARNING")
    base = load_params(REPO / "params.yaml").model_dump(mode="json")
    if args.prepare_vocab:
        print(f"--data {prepare_vocab(base, args.prepare_vocab)}")
        return 0
    names = args.variants.split(",")
    if args.same_steps:
        speeds = {name: 0 for name in names} | {"baseline": 0}
    else:
        speeds = step_speeds(base, sorted(set(names) | {"baseline"}), json.loads(args.set))
        print("tokens/s: " + ", ".join(f"{n} {v:,}" for n, v in speeds.items()), flush=True)
    rows = []
    for name in names:
        # same wall clock
        reference = speeds.get("defaults-plain" if name == "defaults" else "baseline")
        steps = args.steps if args.same_steps else round(args.steps * speeds[name] / reference)
        for seed in (int(s) for s in args.seeds.split(",")):
            params = variant_params(base, name, steps, seed, json.loads(args.set))
            layout = Layout.of(args.data, REPO / "benchmarks" / "out" / "ablation"
                               / f"{name}-{seed}{args.label and '-' + args.label}")
            t0 = time.perf_counter()
            summary = train(params, layout, resume="never", tags={"ablation": name})
            seconds = time.perf_counter() - t0
            result = evaluate(params, layout, register=False)
            rows.append({"variant": name, "seed": seed, "steps": steps, "val_bpb": result["val_bpb"],
                         "val_loss": result["val_loss"], "tokens_per_s": speeds[name],
                         "wall_seconds": round(seconds, 1),
                         "params": summary["params"]})
            print(f"{name:>10}{args.label and ' ' + args.label} seed {seed}: {steps} steps, val_bpb "
                  f"{result['val_bpb']:.4f} ({seconds:.0f} s here)", flush=True)
    print()
    print(table(["variant", "seed", "steps (same wall clock)", "tokens/s", "val bpb"],
                [[r["variant"], r["seed"], r["steps"], f"{r['tokens_per_s']:,}", f"{r['val_bpb']:.4f}"] for r in rows],
                align="llrrr", markdown=True))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
