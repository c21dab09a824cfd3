"""Stage `train`: shards -> models/checkpoints/last.pt and models/final/.

The shape is torchtitan's: a `TrainState` that is exactly what a checkpoint holds, a
`train_step()` that returns the loss and the gradient norm, one function that records an
evaluation, and a tracker (MLflow, or nothing on ranks other than 0). The same loop runs on one
CPU, one GPU, or N processes (DDP; gloo on CPU, NCCL on GPU) started by torch's elastic launcher
(llm/distributed.py). AdamW (or Muon for the blocks' matrices and AdamW for the rest: llm/optim.py), warmup
then cosine or warmup-stable-decay, gradient accumulation to `train.tokens_per_step`, global-norm
clipping. A checkpoint continues bit-identically on CPU: weights, optimizer, step, RNG state and
the data loader's position.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llm.artifacts import save_final
from llm.config import Params, TrainParams
from llm.dataset import TokenBlocks
from llm.device import Device, peak_flops, pick_device, set_threads
from llm.distributed import Dist, init_distributed
from llm.errors import UserError
from llm.faults import kill_point, poisoned
from llm.io import atomic_dir, atomic_file, write_json
from llm.layout import Layout
from llm.model import GPT, GPTConfig
from llm.optim import Optimizers, build_optimizer
from llm.progress import progress_enabled
from llm.shards import read_manifest, verify_shards
from llm.tokenizer import MODEL_FILE
from llm.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"
# Params that do not change the numbers a run computes: changing them keeps its checkpoint.
_NOT_IN_FINGERPRINT = {"time_budget_minutes", "checkpoint_interval", "log_interval", "eval_interval", "eval_tokens", "threads",
                       "compile", "device", "rdzv_endpoint"}
HISTORY_FIELDS = ["step", "tokens", "train_loss", "val_loss", "lr"]
# The modules whose code decides the numbers a run computes: a checkpoint written by other code
# is not resumed (DVC reruns train when they change; resuming would hand back the old model).
MATH_MODULES = ("model.py", "optim.py", "train.py", "dataset.py", "device.py", "distributed.py")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class NonFiniteLoss(Exception):
    """Raised by train_step before the optimizer steps; the loop turns it into TrainingDiverged."""

    def __init__(self, loss: float):
        super().__init__(f"loss is {loss}")
        self.loss = loss


def lr_at(step: int, tp: TrainParams) -> float:
    """AdamW's learning rate at a step (Muon's follows the same curve from its own peak).
    Linear warmup to learning_rate; then cosine decay to learning_rate * min_lr_ratio, or (wsd)
    the peak held until the last decay_fraction of the steps and a linear decay to that floor."""
    if step < tp.warmup_steps:
        return tp.learning_rate * (step + 1) / tp.warmup_steps
    low = tp.learning_rate * tp.min_lr_ratio
    if tp.schedule == "wsd":
        decay_start = tp.max_steps - max(1, round(tp.decay_fraction * tp.max_steps))
        progress = min(1.0, max(0.0, (step - decay_start) / max(1, tp.max_steps - decay_start)))
        return tp.learning_rate - (tp.learning_rate - low) * progress
    span = max(1, tp.max_steps - tp.warmup_steps)
    progress = min(1.0, (step - tp.warmup_steps) / span)
    return low + 0.5 * (tp.learning_rate - low) * (1 + math.cos(math.pi * progress))


def code_version(package: Path = Path(__file__).parent) -> str:
    """sha256 of MATH_MODULES' bytes, in that order."""
    digest = hashlib.sha256()
    for name in MATH_MODULES:
        digest.update(name.encode() + b"\0" + (package / name).read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(params: Params, manifest: dict) -> str:
    """What a checkpoint must match to be resumed: the model, the math of training, the data and
    the code that computes it."""
    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT}
    data = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    blob = json.dumps({"seed": params.seed, "model": params.model.model_dump(mode="json"), "train": train, "data": data,
                       "tokenizer": manifest["tokenizer"]["sha256"], "code": code_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def accumulation_steps(tp: TrainParams, block_size: int, world: int) -> int:
    per_micro = tp.batch_size * block_size * world
    if tp.tokens_per_step % per_micro:
        raise UserError(
            f"train.tokens_per_step ({tp.tokens_per_step}) must be a multiple of batch_size * block_size * processes "
            f"({tp.batch_size} * {block_size} * {world} = {per_micro})"
        )
    return tp.tokens_per_step // per_micro


@torch.no_grad()
def evaluate_loss(model: GPT, val: TokenBlocks, max_tokens: int, batch_size: int, device: Device) -> float:
    """Mean loss over the first max_tokens of the val stream (a fixed set of blocks)."""
    was_training = model.training
    model.eval()
    n_blocks = max(1, min(len(val), max_tokens // val.block_size))
    total, count = 0.0, 0
    for start in range(0, n_blocks, batch_size):
        blocks = [val.block(b) for b in range(start, min(n_blocks, start + batch_size))]
        x = torch.stack([b[0] for b in blocks]).to(device.torch_device)
        y = torch.stack([b[1] for b in blocks]).to(device.torch_device)
        with device.autocast():
            _, loss = model(x, y)
        total += loss.item() * len(blocks)
        count += len(blocks)
    model.train(was_training)
    return total / count


def rng_state(device: Device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device.torch_device)
    return state


def set_rng_state(state: dict[str, Any], device: Device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device.torch_device)


def load_checkpoint(path: Path, fp: str) -> dict | None:
    """The checkpoint at path if it was written by a run with the same fingerprint."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:160]}); "
                        "`llm train --restart` starts over (or delete the file)") from None
    if ckpt.get("fingerprint") != fp:
        log.info("train: %s belongs to other params, data or code; starting from scratch", path)
        return None
    return ckpt


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where it is, and what a checkpoint holds."""

    model: GPT
    optimizer: Optimizers
    data: TokenBlocks
    fingerprint: str
    step: int = 0
    elapsed: float = 0.0
    """Training seconds before this process started (resumed runs) plus this process's."""
    history: list[dict] = field(default_factory=list)
    """One row per evaluation: HISTORY_FIELDS (metrics/loss.csv)."""
    initial_val_loss: float = math.nan
    """Measured before the first step: an initialisation bug shows up here, not as ln(vocab)."""

    def state_dict(self, device: Device) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": self.data.state_dict(),
            "rng": rng_state(device),
            "fingerprint": self.fingerprint,
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history,
            "initial_val_loss": self.initial_val_loss,
        }

    def load_state_dict(self, ckpt: dict[str, Any], device: Device) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.data.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"], device)
        self.step, self.elapsed, self.history = ckpt["step"], ckpt["elapsed"], ckpt["history"]
        self.initial_val_loss = ckpt.get("initial_val_loss", math.nan)

    def save(self, path: Path, device: Device) -> None:
        """Written atomically: tensors and plain data only, loadable with weights_only=True."""
        with atomic_file(path, "wb") as f:
            torch.save(self.state_dict(device), f)
        kill_point(f"train.checkpoint.{self.step}")


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean over the micro-batches and over all processes."""
    grad_norm: float


def train_step(model: torch.nn.Module, state: TrainState, batches: Iterator, accum: int, lr_factor: float, grad_clip: float,
               device: Device, dist: Dist) -> StepResult:
    """One optimizer step over `accum` micro-batches. `model` is what runs the batches (the
    compiled or DDP-wrapped model); gradients are synchronised on the last micro-batch only. The
    finite-loss decision is taken on the all-reduced loss, before the optimizer steps, so every
    rank raises NonFiniteLoss together and the weights stay as they were."""
    state.optimizer.set_lr(lr_factor)
    loss_sum = torch.zeros((), device=device.torch_device)
    for micro in range(accum):
        x, y = next(batches)
        x, y = x.to(device.torch_device, non_blocking=True), y.to(device.torch_device, non_blocking=True)
        last = micro == accum - 1
        sync = model.no_sync() if (dist.world_size > 1 and not last) else contextlib.nullcontext()
        with sync, device.autocast():
            _, loss = model(x, y)
        if poisoned(dist.rank, state.step + 1):
            loss = loss * float("nan")
        (loss / accum).backward()
        loss_sum += loss.detach()
    step_loss = dist.mean(loss_sum / accum).item()  # one device sync per step, not per micro-batch
    if not math.isfinite(step_loss):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(step_loss)
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return StepResult(step_loss, float(norm))


def record_evaluation(state: TrainState, val: TokenBlocks, tp: TrainParams, device: Device, train_losses: list[float],
                      lr: float) -> float:
    """Measure the val loss now and append the history row (with the mean train loss since
    the last row); returns the val loss."""
    val_loss = evaluate_loss(state.model, val, tp.eval_tokens, tp.batch_size, device)
    state.history.append({"step": state.step, "tokens": state.step * tp.tokens_per_step,
                          "train_loss": round(sum(train_losses) / max(1, len(train_losses)), 5),
                          "val_loss": round(val_loss, 5), "lr": lr})
    train_losses.clear()
    return val_loss


class Throughput:
    """Tokens per second and MFU over the steps since the last report."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.steps, self.t0 = 0, time.perf_counter()

    def tick(self) -> None:
        self.steps += 1

    def report(self, device: Device) -> dict[str, float]:
        device.synchronize()
        tok_s = self.steps * self.tokens_per_step / max(time.perf_counter() - self.t0, 1e-9)
        self.steps, self.t0 = 0, time.perf_counter()
        return {"tokens_per_sec": tok_s, "mfu": tok_s * self.flops_per_token / self.peak if self.peak else 0.0}


def build(params: Params, layout: Layout, device: Device, dist: Dist) -> tuple[TrainState, TokenBlocks, dict]:
    """The model, optimizer and data of this run, from scratch (the checkpoint comes after)."""
    tp, mp = params.train, params.model
    manifest = read_manifest(layout.shards)
    verify_shards(layout.shards)
    torch.manual_seed(params.seed)
    cfg = GPTConfig(vocab_size=manifest["tokenizer"]["vocab_size"], **mp.model_dump())
    model = GPT(cfg).to(device.torch_device)
    train_data = TokenBlocks(layout.shards, "train", mp.block_size, seed=params.seed, rank=dist.rank, world_size=dist.world_size)
    val_data = TokenBlocks(layout.shards, "val", mp.block_size, shuffle=False)
    opt = build_optimizer(model, tp, device)
    return TrainState(model, opt, train_data, fingerprint(params, manifest)), val_data, manifest


def train(params: Params, layout: Layout, resume: str = "auto", tags: dict[str, str] | None = None) -> dict:
    """Train into layout.final. resume: auto (continue a checkpoint of the same params and
    data), always (fail if there is none), never (start from scratch). tags: extra MLflow tags."""
    tp = params.train
    device = pick_device(tp.device, int(os.environ.get("LOCAL_RANK", "0")), tp.precision)
    with deterministic_on_cpu(device):
        dist = init_distributed(device.type)
        try:
            return _train(params, layout, resume, tags or {}, device, dist)
        finally:
            dist.close()


@contextlib.contextmanager
def deterministic_on_cpu(device: Device) -> Iterator[None]:
    """On a CPU, torch's deterministic algorithms for the duration; then as the caller had them.
    Compiled kernels otherwise sum some gradients (most likely the embedding's scatter-add) in an
    order that depends on thread timing: two runs would part in the fourth digit within 100 steps."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _train(params: Params, layout: Layout, resume: str, tags: dict[str, str], device: Device, dist: Dist) -> dict:
    tp = params.train
    threads = set_threads(tp.threads) if device.type == "cpu" else torch.get_num_threads()
    state, val_data, manifest = build(params, layout, device, dist)
    model, cfg = state.model, state.model.config
    accum = accumulation_steps(tp, cfg.block_size, dist.world_size)
    ckpt_path = layout.checkpoints / CHECKPOINT
    ckpt = None if resume == "never" else load_checkpoint(ckpt_path, state.fingerprint)
    if resume == "always" and ckpt is None:
        raise UserError(f"train --resume: no checkpoint of these params and data at {ckpt_path}")
    saved_step = None
    if ckpt is not None:
        state.load_state_dict(ckpt, device)
        saved_step = state.step
        log.info("train: resuming %s at step %d", ckpt_path, state.step)
    start_step = state.step

    runner = torch.compile(model) if tp.compile and can_compile(device) else model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(runner, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    flops_per_token = model.flops_per_token()
    peak, peak_source = peak_flops(device) if dist.main else (0.0, "")
    log.info(
        "train: %.2f M params, %d layers x %d wide, block %d, vocab %d on %s (%s); %d tokens/step = %d x %d x %d x %d processes; "
        "peak %.1f GFLOP/s (%s)",
        model.num_params() / 1e6, cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size, device.name,
        str(device.dtype).replace("torch.", ""), tp.tokens_per_step, tp.batch_size, cfg.block_size, accum, dist.world_size,
        peak / 1e9, peak_source,
    )
    if start_step == 0:
        state.initial_val_loss = evaluate_loss(model, val_data, tp.eval_tokens, tp.batch_size, device)
    tracker = Tracker(params, layout.root, {"device": device.name, "torch": torch.__version__, "threads": str(threads),
                                            "stage": "train", **tags}) if dist.main else NullTracker()
    batches = state.data.batches(tp.batch_size)
    model.train()
    t_start, elapsed_before = time.perf_counter(), state.elapsed
    budget = tp.time_budget_minutes * 60 if tp.time_budget_minutes > 0 else math.inf
    stopped_by = "max_steps"
    bar = tqdm(total=tp.max_steps, initial=start_step, desc="train", unit="step",
               disable=not (dist.main and progress_enabled()), mininterval=1.0)
    speed = Throughput(tp.tokens_per_step, flops_per_token, peak)
    train_losses: list[float] = []
    lr = lr_at(max(0, state.step - 1), tp)
    with tracker, contextlib.closing(bar):
        while state.step < tp.max_steps:
            lr = lr_at(state.step, tp)
            try:
                result = train_step(runner, state, batches, accum, lr / tp.learning_rate, tp.grad_clip, device, dist)
            except NonFiniteLoss as e:
                where = f"; the last good checkpoint is {ckpt_path} (step {saved_step})" if saved_step is not None else ""
                raise TrainingDiverged(
                    f"train: loss is {e.loss} at step {state.step + 1}{where}; lower train.learning_rate or raise train.warmup_steps"
                ) from None
            done = state.step
            kill_point(f"train.rank{dist.rank}.step{done}")
            speed.tick()
            train_losses.append(result.loss)
            metrics = {"train_loss": result.loss, "lr": lr, "grad_norm": result.grad_norm}
            state.elapsed = elapsed_before + time.perf_counter() - t_start
            if done % tp.log_interval == 0 or done == tp.max_steps:
                metrics.update(speed.report(device))
                eta = (tp.max_steps - done) * (state.elapsed - elapsed_before) / max(1, done - start_step)
                metrics["eta_seconds"] = eta
                bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tokens_per_sec']:,.0f}",
                                mfu=f"{metrics['mfu']:.0%}")
                if bar.disable and dist.main:  # no bar (not a terminal): a log line instead
                    log.info("step %d/%d loss %.4f lr %.2e grad %.2f %.0f tok/s mfu %.1f%% eta %.0fs", done, tp.max_steps,
                             result.loss, lr, result.grad_norm, metrics["tokens_per_sec"], 100 * metrics["mfu"], eta)
            if done % tp.eval_interval == 0 or done == tp.max_steps:
                metrics["val_loss"] = record_evaluation(state, val_data, tp, device, train_losses, lr)
                if dist.main:
                    log.info("step %d: val loss %.4f", done, metrics["val_loss"])
            tracker.log(metrics, done)
            bar.update(1)
            over_budget = dist.any(state.elapsed > budget) and done < tp.max_steps
            if done % tp.checkpoint_interval == 0 or done == tp.max_steps or over_budget:
                if dist.main:
                    state.save(ckpt_path, device)
                saved_step = done  # every rank knows it, for the error line
            if over_budget:
                stopped_by = "time_budget"
                log.warning("train: time budget of %.1f min reached at step %d of %d", tp.time_budget_minutes, done, tp.max_steps)
                break
        if not state.history or state.history[-1]["step"] != state.step:  # stopped by the budget between evals
            record_evaluation(state, val_data, tp, device, train_losses, lr)
        summary = _summary(state, tp, stopped_by, flops_per_token, peak, device, dist)
        if dist.main:
            _write_outputs(layout, state, summary, params, manifest, tracker)
    return summary


def can_compile(device: Device) -> bool:
    """torch.compile on CPU builds C++ kernels: without a compiler, train eagerly and say so."""
    if device.type != "cpu" or any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return True
    log.warning("train: train.compile is on but no C++ compiler is installed (apt-get install g++); training uncompiled")
    return False


def _summary(state: TrainState, tp: TrainParams, stopped_by: str, flops_per_token: float,
             peak: float, device: Device, dist: Dist) -> dict:
    tokens_per_sec = state.step * tp.tokens_per_step / max(state.elapsed, 1e-9)
    return {
        "steps": state.step,
        "stopped_by": stopped_by,
        "tokens_seen": state.step * tp.tokens_per_step,
        "train_seconds": round(state.elapsed, 1),
        "tokens_per_sec": round(tokens_per_sec),
        "final_train_loss": state.history[-1]["train_loss"],
        "final_val_loss": state.history[-1]["val_loss"],
        "initial_val_loss": round(state.initial_val_loss, 5),
        "params": state.model.num_params(),
        "flops_per_token": flops_per_token,
        "mfu": round(tokens_per_sec * flops_per_token / peak, 4) if peak else 0.0,
        "peak_flops": peak,
        "device": device.name,
        "processes": dist.world_size,
    }


def _write_outputs(layout: Layout, state: TrainState, summary: dict, params: Params, manifest: dict, tracker) -> None:
    # Only what the weights depend on goes beside them, so the same params and data give the
    # same bytes; timing, device and the MLflow run id go to metrics/train.json.
    info = {"tokenizer_sha256": manifest["tokenizer"]["sha256"], "seed": params.seed,
            "steps": summary["steps"], "tokens_seen": summary["tokens_seen"]}
    with atomic_dir(layout.final) as tmp:
        save_final(state.model, tmp, layout.tokenizer / MODEL_FILE, info)
    summary.update(tracker.finish(layout.final, summary))
    write_json(layout.metrics("train"), summary)
    with atomic_file(layout.loss_csv) as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(state.history)
    log.info(
        "train: %d steps, %s tokens in %.0f s (%.0f tok/s, MFU %.1f%%); val loss %.3f -> %.3f",
        summary["steps"], f"{summary['tokens_seen']:,}", summary["train_seconds"], summary["tokens_per_sec"],
        100 * summary["mfu"], summary["initial_val_loss"], summary["final_val_loss"],
    )
