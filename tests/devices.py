"""The devices a device-parametrized test runs on: the CPU always, CUDA where torch sees a GPU.

Each variant carries a marker named after its device: `pytest -m cuda` runs the CUDA variants
(the GPU check, benchmarks/gpu.py, does on a GPU machine) and `-m cpu` their CPU twins.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llm.common import deep_merge

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.cpu),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def on_device(device: str) -> dict:
    """The params overlay of a run on `device` (CUDA trains in bf16 autocast: llm.device). Tracking
    is off where MLflow does not import: a GPU machine has none (../shared/gpu/README.md)."""
    overlay = {} if device == "cpu" else {"train": {"device": device}}
    if importlib.util.find_spec("mlflow") is None:
        overlay = deep_merge(overlay, {"tracking": {"enabled": False}})
    return overlay
