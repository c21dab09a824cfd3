"""Several processes: `llm train` with train.nproc_per_node > 1 starts itself through torch's
elastic launcher and trains with DDP (gloo on CPU), through `dvc repro` like any other run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llm.common import free_port
from llm.distributed import Dist
from llm.io import read_json
from llm.layout import Layout
from tests.conftest import REPO, Template, copy_project, deep_merge, dvc_bin, project_env, run
from tests.devices import DEVICES, on_device
from tests.test_train import project_from

pytestmark = pytest.mark.slow


def grad_norms(root: Path) -> list[float]:
    import mlflow

    run_id = read_json(Layout(root).metrics("train"))["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, "grad_norm"), key=lambda m: m.step)]


def test_dvc_repro_with_two_processes_matches_one_process_with_the_same_global_batch(template: Template,
                                                                                     tmp_path: Path):
    # The reference, one process with 8 sequences per step: the suite's reproduced project ...
    ref = template.root
    assert read_json(Layout(ref).metrics("train"))["processes"] == 1
    assert yaml.safe_load((ref / "params.yaml").read_text())["train"]["batch_size"] == 8
    one = read_json(Layout(ref).metrics("train"))
    w1 = load_file(str(Layout(ref).final / "model.safetensors"))
    norms1 = grad_norms(ref)
    # ... then two processes with 4 each, declared in params.yaml: every step sees the same 8
    # blocks, and DDP averages the gradients.
    root = copy_project(ref, tmp_path / "project", train={"nproc_per_node": 2, "batch_size": 4})
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
    # Throughput per device and MFU per device, against one device's peak (here a process's thread):
    # the global rate over one device's peak would count both processes as the first one.
    assert two["tokens_per_sec_per_device"] == pytest.approx(two["tokens_per_sec"] / 2, abs=1)
    assert two["mfu"] == pytest.approx(two["tokens_per_sec_per_device"] * two["flops_per_token"] / two["peak_flops"],
                                       rel=0.01)
    assert two["mfu"] < 1.5 * one["mfu"]


def test_two_nodes_on_loopback_train_as_one_run_and_each_ends_with_the_same_outputs(template: Template,
                                                                                    tmp_path: Path):
    """train.nnodes: 2 as two machines would run it: each node runs `dvc repro` with the same params,
    and they meet at train.rdzv_endpoint (one c10d rendezvous, gloo)."""
    one = load_file(str(Layout(template.root).final / "model.safetensors"))  # one process, 8 sequences a step
    two_nodes = {"train": {"nnodes": 2, "batch_size": 4, "rdzv_endpoint": f"127.0.0.1:{free_port()}"}}
    # Each machine's clone, data stages already built.
    node0, node1 = (copy_project(template.root, tmp_path / f"node{i}", **two_nodes) for i in range(2))
    procs = [subprocess.Popen([dvc_bin(), "repro"], cwd=node, env=project_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (node0, node1)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert all("Running stage 'train'" in out and "Running stage 'ingest'" not in out for out in outputs)
    final = [(Layout(node).final / "model.safetensors").read_bytes() for node in (node0, node1)]
    assert final[0] == final[1]  # DDP kept the weights equal; each node wrote its own copy
    assert [read_json(Layout(node).metrics("train"))["processes"] for node in (node0, node1)] == [2, 2]
    assert all((Layout(node).hf / "config.json").is_file() for node in (node0, node1))  # and the stages after train ran
    two = load_file(str(Layout(node1).final / "model.safetensors"))
    assert all((one[k] - two[k]).abs().max() < 2e-3 for k in one)  # the one-process run, as above


def test_every_tensor_handed_to_a_collective_is_on_the_training_device(monkeypatch):
    """NCCL serves CUDA tensors only, and gloo both, so no CPU run can see a CPU tensor handed to an
    NCCL collective. Dist carries the training device; a spy records the device of each tensor
    handed to torch.distributed (here the meta device, standing in for a GPU)."""
    import torch.distributed as tdist

    class Handed(Exception):
        pass

    seen = []

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Handed

    monkeypatch.setattr(tdist, "all_reduce", spy)
    dist = Dist(rank=0, local_rank=0, world_size=2, device=torch.device("meta"))
    with pytest.raises(Handed):
        dist.any(True)
    with pytest.raises(Handed):
        dist.mean(torch.zeros(()))
    assert seen == [torch.device("meta")] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_training_hands_every_collective_a_tensor_on_the_training_device(built, tmp_path: Path, monkeypatch,
                                                                            device: str):
    """`llm train` with DDP on one device: a process group of one rank (gloo on CPU, NCCL on CUDA)
    and a Dist that says there are 2 processes, so the model is wrapped in DDP, the first of the
    2 micro-batches of a step runs under no_sync and Dist all-reduces the loss. NCCL refuses a CPU
    tensor itself; a spy records the device of each tensor handed to torch.distributed."""
    import torch.distributed as tdist

    import llm.train
    from llm.train import train

    backend = "nccl" if device == "cuda" else "gloo"
    seen, all_reduce = [], tdist.all_reduce

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.device.type)
        return all_reduce(tensor, *args, **kwargs)

    def one_rank_group(dev) -> Dist:
        kwargs = {"device_id": dev.torch_device} if backend == "nccl" else {}
        tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, **kwargs)
        return Dist(rank=0, local_rank=0, world_size=2, device=dev.torch_device)

    monkeypatch.setattr(tdist, "all_reduce", spy)
    monkeypatch.setattr(llm.train, "init_distributed", one_rank_group)
    # a step: 2 micro-batches of 4 x 32 tokens in each of the 2 processes Dist counts; no time
    # budget, whose check all-reduces too (Dist.any: the test above)
    override = {"train": {"tokens_per_step": 2 * 4 * 32 * 2, "time_budget_minutes": 0}, "tracking": {"enabled": False}}
    root, params = project_from(built, tmp_path, **deep_merge(on_device(device), override))
    summary = train(params, Layout(root))
    assert summary["steps"] == 6 and summary["processes"] == 2
    assert not tdist.is_initialized()  # Dist.close ended the group
    assert seen == [device] * 6  # Dist.mean of each step's loss


def test_only_dist_calls_collectives():
    """Every collective in llm/ goes through Dist, whose tensors are on the training device."""
    pattern = re.compile(r"\b(all_reduce|all_gather|broadcast|reduce_scatter|barrier)\(")
    callers = {path.name for path in (REPO / "llm").rglob("*.py") if pattern.search(path.read_text())}
    assert callers == {"distributed.py"}


def launch(root: Path, fault: dict[str, str], timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = project_env(**fault)
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
    # nor torch elastic's own account of the stopped processes (its glog lines: E1202 12:00:00.0 ...)
    assert not re.search(r"^[EW]\d{4} ", proc.stderr, re.M), proc.stderr[-3000:]
    assert torch.load(Layout(root).checkpoints / "last.pt", weights_only=True)["step"] == 3
    assert not Layout(root).final.exists()
    assert seconds < 200


def test_a_node_whose_peers_never_come_stops_with_one_line_naming_the_rendezvous(built, tmp_path: Path):
    """nnodes: 2, and the other node never starts: after train.rdzv_timeout_s one line naming the
    endpoint and the knob, not torch's traceback after ten silent minutes."""
    endpoint = f"127.0.0.1:{free_port()}"
    root, _ = project_from(built, tmp_path, train={"nnodes": 2, "rdzv_endpoint": endpoint, "rdzv_timeout_s": 5})
    proc, seconds = launch(root, {})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"the 2 nodes did not meet at train.rdzv_endpoint {endpoint} within train.rdzv_timeout_s (5 s" in lines[0]
    assert f"waiting up to 5 s (train.rdzv_timeout_s) for 2 nodes to meet at {endpoint}" in proc.stderr
    assert not Layout(root).checkpoints.exists()
    assert seconds < 90


def test_a_killed_rank_ends_the_launch_with_one_line(built, tmp_path: Path):
    root, _ = project_from(built, tmp_path, train={"nproc_per_node": 2, "batch_size": 2})
    proc, seconds = launch(root, {"LLM_FAULT_POINT": "train.rank1.step2"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "train: process 1 of 2 was killed by signal 9" in lines[0]
    assert not Layout(root).final.exists()
    assert seconds < 200


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_the_launch_reports_the_workers_own_line_whichever_process_the_launcher_stopped(tmp_path: Path, order):
    """Rank 1 writes its error line and exits 2; the launcher stops rank 0 (SIGTERM) in the same
    second. Whatever order torch elastic lists them in, the line is the worker's."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from llm.distributed import describe_failure

    error_file = tmp_path / "error.json"
    error_file.write_text(json.dumps({"message": "train: loss is nan at step 4", "timestamp": 0}))
    failed = {1: ProcessFailure(local_rank=1, pid=11, exitcode=2, error_file=str(error_file)),
              0: ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file=str(tmp_path / "none.json"))}
    failed[0].timestamp = 0  # the same second as the line
    err = ChildFailedError("llm.cli", {rank: failed[rank] for rank in order})
    assert describe_failure(err, 2) == "train: loss is nan at step 4 (all 2 processes stopped together)"
    only_killed = ChildFailedError("llm.cli", {0: failed[0]})
    assert describe_failure(only_killed, 2).startswith("train: process 0 of 2 was killed by signal 15")
