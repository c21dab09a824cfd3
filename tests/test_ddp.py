"""Several processes: `llm train` with train.nproc_per_node > 1 starts itself through torch's
elastic launcher and trains with DDP (gloo on CPU), through `dvc repro` like any other run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from llm.io import read_json
from llm.layout import Layout
from tests.conftest import dvc_bin, make_dvc_project, run, write_params
from tests.test_train import project_from

pytestmark = pytest.mark.slow


def grad_norms(root: Path) -> list[float]:
    run_id = read_json(Layout(root).metrics("train"))["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, "grad_norm"), key=lambda m: m.step)]


def test_dvc_repro_with_two_processes_matches_one_process_with_the_same_global_batch(tmp_path: Path):
    root = make_dvc_project(tmp_path, n_plays=6, max_chars=15_000, train={"batch_size": 8})
    # One process, 8 sequences per step ...
    run([dvc_bin(), "repro"], root)
    one = read_json(Layout(root).metrics("train"))
    w1 = load_file(str(Layout(root).final / "model.safetensors"))
    norms1 = grad_norms(root)
    # ... then two processes with 4 each, declared in params.yaml: every step sees the same 8
    # blocks, and DDP averages the gradients.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(nproc_per_node=2, batch_size=4)
    write_params(root, params)
    out = run([dvc_bin(), "repro"], root)
    assert "Running stage 'train'" in out and "Running stage 'ingest'" not in out
    two = read_json(Layout(root).metrics("train"))
    w2 = load_file(str(Layout(root).final / "model.safetensors"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["steps"] == one["steps"] == 6 and two["tokens_seen"] == one["tokens_seen"]
    # A gradient summed instead of averaged doubles the norm (Adam would hide it in the weights).
    norms2 = grad_norms(root)
    assert norms2 == pytest.approx(norms1, rel=2e-3)  # float sums in another order; a sum bug is 2x
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-3)
    assert all((w1[k] - w2[k]).abs().max() < 2e-3 for k in w1)  # Muon's iterations amplify float-order noise


def launch(root: Path, fault: dict[str, str], timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "LLM_PROGRESS": "0", **fault}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llm.cli", "train", "--params", str(root / "params.yaml")], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_nan_on_one_rank_stops_every_rank_with_one_line(built, tmp_path: Path):
    root, _ = project_from(built, tmp_path, train={"nproc_per_node": 2, "batch_size": 2})
    proc, seconds = launch(root, {"LLM_FAULT_NAN": "train.rank1.step3"})  # only rank 1 diverges: NaN at step 4
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "loss is nan at step 4" in lines[0] and "last good checkpoint" in lines[0]
    assert "Traceback" not in proc.stderr
    assert torch.load(Layout(root).checkpoints / "last.pt", weights_only=True)["step"] == 3
    assert not Layout(root).final.exists()
    assert seconds < 200


def test_a_killed_rank_ends_the_launch_with_one_line(built, tmp_path: Path):
    root, _ = project_from(built, tmp_path, train={"nproc_per_node": 2, "batch_size": 2})
    proc, seconds = launch(root, {"LLM_FAULT_POINT": "train.rank1.step2"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "train: process 1 of 2 was killed by signal 9" in lines[0]
    assert not Layout(root).final.exists()
    assert seconds < 200
