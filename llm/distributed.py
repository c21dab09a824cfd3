"""Several processes, one training run: torch's elastic launcher starts them, DDP joins them.

`llm train` with train.nproc_per_node x train.nnodes > 1 relaunches itself through
`torch.distributed.run` (the code behind `torchrun`), so `dvc repro`, `dvc exp run`, the Dagster
assets and the schedule all train with DDP and nobody types torchrun. The launcher watches the
workers: when one fails or is killed it stops the others, and the launch ends with one line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm.config import TrainParams
from llm.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: `llm ingest` does not need it
    import torch

    from llm.device import Device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; a single process is rank 0 of 1. Every tensor it hands
    to a collective is on `device`, the training device: NCCL serves CUDA tensors only, and a CPU
    tensor there fails the first collective ("No backend type associated with device type cpu")."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device | str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0 of the run: the one that logs and tracks."""
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        """Local rank 0: the process that writes this node's files (checkpoint, final model, metrics),
        so `dvc repro` on every node ends with the same outputs (DDP keeps the weights equal)."""
        return self.local_rank == 0

    def _all_reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        import torch.distributed as tdist

        tdist.all_reduce(value, op=getattr(tdist.ReduceOp, op))
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over all processes (the value itself in one process). A NaN or inf on any
        rank makes the result non-finite on every rank, so all of them stop together."""
        if self.world_size == 1:
            return value
        return self._all_reduce(value.detach().to(self.device, copy=True), "SUM") / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a time budget reached, say)."""
        if self.world_size == 1:
            return flag
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self._all_reduce(t, "MAX").item())

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def init_distributed(device: Device) -> Dist:
    """The launcher sets RANK and WORLD_SIZE; without them this is a single process. NCCL on
    CUDA, gloo elsewhere; the collectives run on the training device either way."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device.torch_device)
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                 device_id=device.torch_device if device.type == "cuda" else None)
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world, device.torch_device)


def processes(tp: TrainParams) -> int:
    return tp.nproc_per_node * tp.nnodes


def under_launcher() -> bool:
    """True inside a worker the elastic launcher started (or a hand-run torchrun)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def launcher_args(tp: TrainParams, run_id: str) -> list[str]:
    """torchrun's own arguments for the train params: a c10d rendezvous at train.rdzv_endpoint
    across nodes, on a free local port on one node."""
    # torchrun's --standalone, spelled out (its handling lives in torchrun's main, not in the
    # config this module builds): c10d on a free port of this machine.
    endpoint = tp.rdzv_endpoint or "127.0.0.1:0"
    return [f"--nproc-per-node={tp.nproc_per_node}", f"--nnodes={tp.nnodes}", "--max-restarts=0",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
            f"--rdzv-conf=join_timeout={tp.rdzv_timeout_s}"]


def launch(tp: TrainParams, worker_argv: list[str], run_id: str = "llm-train") -> None:
    """Run `python -m llm.cli WORKER_ARGV` on nproc_per_node processes per node through
    torch.distributed.run; a failed or killed worker ends the launch with one UserError."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    args = get_args_parser().parse_args([*launcher_args(tp, run_id), "-m", "llm.cli", *worker_argv])
    # torch.distributed.run's own default for its workers, set here so that it need not print a
    # banner about it; a CPU worker then sets its threads from train.threads (llm.device.set_threads).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config, cmd, cmd_args = config_from_args(args)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    # Its lines on a failed or stopped worker ("failed (exitcode: 2) local_rank: 0 ...", "Sending
    # process ... closing signal") say again what the one error line below says.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    log.info("train: launching %d process(es) x %d node(s) through torch.distributed.run", tp.nproc_per_node, tp.nnodes)
    if tp.nnodes > 1:
        log.info("train: waiting up to %d s (train.rdzv_timeout_s) for %d nodes to meet at %s (train.rdzv_endpoint)",
                 tp.rdzv_timeout_s, tp.nnodes, tp.rdzv_endpoint)
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as e:
        raise UserError(describe_failure(e, processes(tp))) from None
    except RendezvousError as e:
        raise UserError(f"train: the {tp.nnodes} nodes did not meet at train.rdzv_endpoint {tp.rdzv_endpoint} within "
                        f"train.rdzv_timeout_s ({tp.rdzv_timeout_s} s; {type(e).__name__}): start `dvc repro` on every "
                        "node with the same params, and check that each reaches that host:port") from None


def describe_failure(err, world_size: int) -> str:
    """One line for a failed launch. A worker's own error line (it hands it over in torch
    elastic's error file) is the message, whichever process wrote it: the launcher may have
    stopped another before it wrote its own, and that one can look first by timestamp.
    Otherwise how the first failed process ended."""

    def own_line(failure) -> bool:
        message = failure.message if isinstance(failure.message, str) else ""
        return failure.exitcode > 0 and bool(message) and "To enable traceback" not in message

    own = sorted((f.timestamp, r, f) for r, f in err.failures.items() if own_line(f))
    rank, failure = (own[0][1], own[0][2]) if own else err.get_first_failure()
    if own:
        message = failure.message
        others = len(err.failures) - 1
        together = (f"all {world_size} processes stopped together" if others + 1 == world_size
                    else f"process {rank}; the others were stopped")
        return f"{message} ({together})"
    code = failure.exitcode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"train: process {rank} of {world_size} {how}; the launch stopped the others (its log is above)"
