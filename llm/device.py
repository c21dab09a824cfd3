"""Device choice, precision, threads and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass

import torch

from llm.errors import UserError

# Dense bf16 tensor-core peaks (FLOP/s) of GPUs people train on; MFU is reported against these.
GPU_BF16_PEAK = {
    # Matched as whole words in torch.cuda.get_device_name(), in this order: the first match wins,
    # so the more specific names come first. A GPU not in the table is measured.
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H20": 148e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A6000": 155e12,  # RTX A6000 (Ampere)
    "A10": 125e12,  # not the A10G, which is measured
    "RTX 6000 Ada": 364e12,
    "RTX 5090": 210e12,
    "RTX 4090": 165e12,
    "RTX 4080": 97e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores: V100 has no bf16
    "T4": 65e12,  # fp16 tensor cores
}


MIN_TORCH = (2, 9)  # torch.optim.Muon


def require_torch() -> None:
    """One line instead of an AttributeError deep in the optimizer on an older torch."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise UserError(f"torch {torch.__version__} is too old: llm needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                        "(torch.optim.Muon); pip install 'torch>=2.9'")


@dataclass(frozen=True)
class Device:
    type: str  # cpu | cuda | mps
    torch_device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    name: str

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=self.dtype)

    def synchronize(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()
        elif self.type == "mps":
            torch.mps.synchronize()


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN: AVX512-BF16 or AMX); without, bf16
    is emulated and slower than fp32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_device(requested: str = "auto", local_rank: int = 0, precision: str = "fp32") -> Device:
    """auto: CUDA, then Apple MPS, then CPU. bf16 autocast on CUDA (where supported); on a CPU
    as `precision` says (auto: bf16 where the CPU has bf16 instructions, fp32 elsewhere: without
    them bf16 matmuls are emulated and slower); fp32 on MPS."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device: cuda requested but no CUDA device is available (use auto or cpu)")
        torch.cuda.set_device(local_rank)
        torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in fp32
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Device("cuda", torch.device("cuda", local_rank), dtype, torch.cuda.get_device_name(local_rank))
    if requested == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("train.device: mps requested but not available")
        return Device("mps", torch.device("mps"), torch.float32, "Apple MPS")
    if requested == "cpu":
        if precision == "bf16" and not cpu_has_bf16():
            raise UserError("train.precision: bf16 needs a CPU with bf16 instructions (AVX512-BF16 or AMX); use auto "
                            "or fp32")
        bf16 = precision == "bf16" or (precision == "auto" and cpu_has_bf16())
        return Device("cpu", torch.device("cpu"), torch.bfloat16 if bf16 else torch.float32,
                      f"CPU ({torch.get_num_threads()} threads)")
    raise UserError(f"train.device: unknown device {requested!r} (auto, cpu, cuda, mps)")


def set_threads(threads: int) -> int:
    """Intra-op threads for CPU work: 0 means one per usable core (not per hyperthread sibling
    the scheduler would not give us)."""
    if threads <= 0:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:
            threads = os.cpu_count() or 1
        # Processes on this node share its cores (torchrun sets LOCAL_WORLD_SIZE).
        threads = max(1, threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def measure_matmul_peak(device: Device, n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of a plain square matmul in the training dtype, the best of repeated runs."""
    dtype = device.dtype
    if device.type == "cuda":
        n = 8192
    # Its own generator: measuring must not move the global RNG that training (and resuming) uses.
    gen = torch.Generator(device=device.torch_device).manual_seed(0)
    a = torch.randn(n, n, device=device.torch_device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device.torch_device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    device.synchronize()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        device.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def datasheet_peak(gpu_name: str) -> tuple[float, str] | None:
    """The dense bf16 tensor-core peak of a GPU by name (fp16 where it has no bf16), if the table has it."""
    for key, value in GPU_BF16_PEAK.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", gpu_name):
            return value, f"{key} datasheet peak"
    return None


def peak_flops(device: Device) -> tuple[float, str]:
    """The FLOP/s of one device that MFU is measured against, and where the number comes from."""
    if device.type == "cuda":
        return datasheet_peak(device.name) or (measure_matmul_peak(device), "measured bf16 matmul peak")
    return measure_matmul_peak(device), f"measured {'bf16' if device.dtype == torch.bfloat16 else 'fp32'} matmul peak"
