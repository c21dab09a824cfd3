"""Training throughput and MFU of model shapes and recipes, with and without torch.compile,
against the measured matmul peak.

    python benchmarks/train.py                       # the default preset and nanoGPT's CPU example
    python benchmarks/train.py --shapes 4x256x4:256:16,6x384x6:256:8 --steps 12
    python benchmarks/train.py --recipes preset,classic,modern --compile both

A shape is LAYERSxWIDTHxHEADS:BLOCK:BATCH[:ACCUM]. Each runs optimizer steps on random tokens
through `llm train`'s own train_step (ACCUM micro-batches of BATCH sequences, gradient
clipping, the optimizer; the same model and autocast), after warm-up steps. The preset's ACCUM
is params.yaml's tokens_per_step / (batch_size * block_size), as in `llm train`.
MFU = tokens/s * FLOPs per token (6N + 12 * layers * width * block) / peak, where the peak is
a plain matmul in the training dtype (fp32, or bf16 autocast: --precision) measured here in the
same process, the best of repeated runs. Tokens/s likewise: the best of --rounds timed windows
(the median window's MFU is printed beside it). Prints a table and writes
benchmarks/out/train.json.

    python benchmarks/train.py --against 07e8c6c     # this tree against a commit, tokens/s ratios

--against REF checks REF out into a temporary git worktree and runs its benchmarks/train.py and
this one alternately (--repeats times each, same arguments, one process at a time), then prints
each row's best tokens/s of both and their ratio: a regression check on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.common import table  # noqa: E402
from llm.config import ModelParams, TrainParams, load_params  # noqa: E402
from llm.device import measure_matmul_peak, pick_device, set_threads  # noqa: E402
from llm.distributed import Dist  # noqa: E402
from llm.model import GPT, GPTConfig  # noqa: E402
from llm.optim import build_optimizer  # noqa: E402
from llm.train import TrainState, deterministic_on_cpu, train_step  # noqa: E402

# A recipe: model options and the optimizer ("preset" is whatever params.yaml says).
RECIPES = {
    "classic": ({"position": "learned", "norm": "layernorm", "qk_norm": False, "mlp": "gelu", "zero_init": False,
                 "bias": True},
                "adamw"),
    "modern": ({"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "zero_init": True,
                "bias": False}, "muon"),
}


def parse_shape(text: str) -> tuple[int, int, int, int, int, int]:
    dims, block, batch, *accum = text.split(":")
    layers, width, heads = (int(v) for v in dims.split("x"))
    return layers, width, heads, int(block), int(batch), int(accum[0]) if accum else 1


def measure(shape: tuple[int, int, int, int, int, int], vocab: int, steps: int, warmup: int, device, peak: float,
            recipe: tuple[dict, str] = RECIPES["classic"], compile_model: bool = False, muon: str = "grouped",
            rounds: int = 3) -> dict:
    """Tokens/s of the best of `rounds` windows of `steps` steps (the peak is a best-of too: on a
    shared host, noise only ever slows a window down), and of the median window."""
    layers, width, heads, block, batch, accum = shape
    options, optimizer = recipe
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_params(ModelParams(block_size=block, n_layer=layers, n_head=heads, n_embd=width,
                                                  **options), vocab))
    model = model.to(device.torch_device)
    tp = TrainParams(optimizer=optimizer)
    state = TrainState(model, build_optimizer(model, tp, device), data=None, fingerprint="benchmark")
    if optimizer == "muon" and muon == "torch":  # the same groups, stepped by torch.optim.Muon itself
        state.optimizer.optimizers["muon"] = torch.optim.Muon(state.optimizer.optimizers["muon"].param_groups)
    if compile_model:  # a fresh compile per row, as each `llm train` process does: without this, the second
        torch._dynamo.reset()  # shape would recompile GPT.forward with dynamic shapes, which is slower
    runner = torch.compile(model) if compile_model else model
    x = torch.randint(0, vocab, (batch, block), device=device.torch_device)
    y = torch.randint(0, vocab, (batch, block), device=device.torch_device)
    batches = itertools.repeat((x, y))

    def step() -> None:
        train_step(runner, state, batches, accum, 1.0, tp.grad_clip, device, Dist())

    t_compile = time.perf_counter()
    for _ in range(warmup):  # the first step compiles, when compiling
        step()
    device.synchronize()
    warmup_seconds = time.perf_counter() - t_compile
    windows = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        device.synchronize()
        windows.append(steps * accum * batch * block / (time.perf_counter() - t0))
    tok_s, median = max(windows), statistics.median(windows)
    flops = model.flops_per_token()
    return {
        "shape": f"{layers}x{width}x{heads}:{block}:{batch}:{accum}",
        "recipe": "classic" if options == RECIPES["classic"][0] else "+".join(f"{k}={v}" for k, v in options.items()),
        "optimizer": f"{optimizer} ({muon})" if optimizer == "muon" else optimizer,
        "compile": compile_model, "warmup_seconds": round(warmup_seconds, 1),
        "params_m": round(model.num_params() / 1e6, 2),
        "vocab": vocab,
        "tokens_per_s": round(tok_s),
        "tokens_per_s_windows": [round(w) for w in windows],
        "gflops_per_s": round(tok_s * flops / 1e9, 1),
        "mfu": round(tok_s * flops / peak, 3),
        "mfu_median": round(median * flops / peak, 3),
    }


def main() -> None:
    params = load_params(REPO / "params.yaml")
    m, t = params.model, params.train
    default = (f"{m.n_layer}x{m.n_embd}x{m.n_head}:{m.block_size}:{t.batch_size}:"
               f"{max(1, t.tokens_per_step // (t.batch_size * m.block_size))}")
    preset = ({k: getattr(m, k) for k in ("position", "norm", "qk_norm", "mlp", "zero_init", "bias")}, t.optimizer)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=f"{default},4x128x4:64:12:1",
                    help=f"comma-separated shapes (default: preset {default} and nanoGPT's CPU example)")
    ap.add_argument("--recipes", default="preset", help=f"comma-separated: preset (params.yaml), {', '.join(RECIPES)}")
    ap.add_argument("--compile", choices=["no", "yes", "both"], default="both",
                    help="torch.compile the model (default: both ways)")
    ap.add_argument("--muon", default="grouped",
                    help="comma-separated: grouped (llm/optim.py's GroupedMuon, what llm train uses), torch "
                         "(torch.optim.Muon)")
    ap.add_argument("--vocab", type=int, default=params.tokenizer.vocab_size)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed windows of --steps steps; the best one is reported, and the median")
    ap.add_argument("--device", default=t.device)
    ap.add_argument("--precision", default=t.precision,
                    help="comma-separated CPU training precisions: auto, fp32, bf16 (default: params.yaml's); each "
                         "against its own peak")
    ap.add_argument("--against", metavar="REF", help="compare with this git commit (see above)")
    ap.add_argument("--repeats", type=int, default=2, help="with --against: runs of each tree, alternating")
    args = ap.parse_args()
    if args.against:
        return against(args)
    rows, peaks = [], {}
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    for precision in args.precision.split(","):
        device = pick_device(args.device, 0, precision)
        threads = set_threads(t.threads) if device.type == "cpu" else 0
        peak = measure_matmul_peak(device, seconds=2.0)
        dtype = str(device.dtype).removeprefix("torch.")
        peaks[dtype] = peak
        print(f"device: {device.name}, {threads} threads; measured {dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
        with deterministic_on_cpu(device):  # as llm train runs
            rows += [{**measure(parse_shape(s), args.vocab, args.steps, args.warmup, device, peak,
                                preset if r == "preset" else RECIPES[r], c, mu,
                                     args.rounds),
                      "dtype": dtype} for s in args.shapes.split(",") for r in args.recipes.split(",") for c in compiles
                     for mu in args.muon.split(",")]
    def recipe(r: dict) -> str:
        return ("classic" if r["recipe"] == "classic" and r["optimizer"] == "adamw"
                else ("modern" if r["optimizer"] != "adamw" else "custom"))

    print(table(["shape L x W x H : block : batch : accum", "recipe", "optimizer", "dtype", "compile", "params M",
                 "tokens/s", "GFLOP/s", "MFU", "median MFU", "warmup s"],
                [[r["shape"], recipe(r), r["optimizer"], r["dtype"], "yes" if r["compile"] else "no", r["params_m"],
                  r["tokens_per_s"], r["gflops_per_s"], f"{r['mfu']:.1%}", f"{r['mfu_median']:.1%}",
                  r["warmup_seconds"]] for r in rows], align="lllllrrrrrr"))
    out = REPO / "benchmarks" / "out" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device.name, "peak_flops": peaks, "rows": rows}, indent=2))
    print(f"\nwrote {out.relative_to(REPO)}")


def against(args: argparse.Namespace) -> None:
    """Run REF's benchmark and this one alternately; print best tokens/s of each and the ratio."""
    passed = [f"--{k}={v}" for k, v in vars(args).items()
              if k in ("shapes", "recipes", "compile", "muon", "vocab", "steps", "warmup", "rounds", "device",
                       "precision")]
    best: dict[tuple, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(ref), args.against], cwd=REPO, check=True)
        try:
            for i in range(args.repeats):
                for name, tree in ((args.against, ref), ("this tree", REPO)):
                    print(f"run {i + 1}/{args.repeats}: {name}", flush=True)
                    subprocess.run([sys.executable, str(tree / "benchmarks" / "train.py"), *passed], check=True,
                                   cwd=tree, stdout=subprocess.DEVNULL)
                    for r in json.loads((tree / "benchmarks" / "out" / "train.json").read_text())["rows"]:
                        key = (r["shape"], r["optimizer"], r["dtype"], r["compile"])
                        slot = best.setdefault(key, {})
                        slot[name] = max(slot.get(name, 0), r["tokens_per_s"])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(ref)], cwd=REPO, check=False)
    rows = []
    for (shape, optimizer, dtype, compiled), v in best.items():
        old, new = v.get(args.against, 0), v.get("this tree", 0)
        rows.append([shape, optimizer, dtype, "yes" if compiled else "no", old, new,
                     f"{new / old:.2f}" if old else "-"])
    print(table(["shape", "optimizer", "dtype", "compile", args.against, "this tree", "ratio"], rows,
                align="llllrrr"))


if __name__ == "__main__":
    main()
