"""Attention alone: F.scaled_dot_product_attention's CPU kernels (flash, math) in fp32 and bf16,
forward and forward + backward, at the default preset's shape. Why llm/model.py's `attend` runs
attention in fp32 under bf16 autocast on a CPU.

    python benchmarks/attention.py
    python benchmarks/attention.py --batch 8 --heads 4 --block 128 --head-dim 32 --repeat 50

Prints a table (milliseconds per call, the best of --rounds rounds) and writes
benchmarks/out/attention.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.common import table  # noqa: E402
from llm.config import load_params  # noqa: E402
from llm.device import set_threads  # noqa: E402


def best_ms(fn, repeat: int, rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        times.append((time.perf_counter() - t0) / repeat * 1e3)
    return min(times)


def time_kernel(backend: SDPBackend, dtype: torch.dtype, shape: tuple[int, ...], repeat: int, rounds: int) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)

    def forward() -> None:
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    with sdpa_kernel(backend):
        return {"forward_ms": round(best_ms(forward, repeat, rounds), 3),
                "forward_backward_ms": round(best_ms(forward_backward, repeat, rounds), 3)}


def main() -> None:
    params = load_params(REPO / "params.yaml")
    m, t = params.model, params.train
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=t.batch_size)
    ap.add_argument("--heads", type=int, default=m.n_head)
    ap.add_argument("--block", type=int, default=m.block_size)
    ap.add_argument("--head-dim", type=int, default=m.n_embd // m.n_head)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    threads = set_threads(t.threads)
    shape = (args.batch, args.heads, args.block, args.head_dim)
    print(f"causal attention, (batch, heads, block, head dim) = {shape}, {threads} threads")
    rows = [{"kernel": kernel, "dtype": str(dtype).removeprefix("torch."),
             **time_kernel(backend, dtype, shape, args.repeat, args.rounds)}
            for kernel, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH))
            for dtype in (torch.float32, torch.bfloat16)]
    print(table(["kernel", "dtype", "forward ms", "fwd + bwd ms"],
                [[r["kernel"], r["dtype"], f"{r['forward_ms']:.2f}", f"{r['forward_backward_ms']:.2f}"] for r in rows],
                align="llrr"))
    out = REPO / "benchmarks" / "out" / "attention.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": shape, "threads": threads, "rows": rows}, indent=2))
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
