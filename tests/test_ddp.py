"""Several processes with torchrun: DDP with the gloo backend on CPU, the same `llm train`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llm.io import read_json
from llm.stages import Layout
from llm.train import train
from tests.test_train import project_from

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(built, tmp_path: Path):
    # One process, 8 sequences per step ...
    single, ps = project_from(built, tmp_path / "one", train={"batch_size": 8, "tokens_per_step": 256})
    one = train(ps, single)
    # ... and two processes with 4 each: every step sees the same 8 blocks, gradients averaged.
    multi, _ = project_from(built, tmp_path / "two", train={"batch_size": 4, "tokens_per_step": 256})
    env = {**os.environ, "LLM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "llm.cli", "train"]
    proc = subprocess.run(cmd, cwd=multi, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_json(Layout(multi).metrics("train"))
    assert two["processes"] == 2 and two["steps"] == one["steps"] == 6
    assert two["tokens_seen"] == one["tokens_seen"]
    assert abs(two["final_val_loss"] - one["final_val_loss"]) < 1e-3
    assert (Layout(multi).final / "model.safetensors").is_file()
