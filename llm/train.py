"""Stage `train`: shards -> models/checkpoints/last.pt and models/final/.

The shape is torchtitan's: a `TrainState` that is exactly what a checkpoint holds, and a loop
that is a list of calls to components that each decide one thing: `train_step` (one optimizer
step), the `Checkpointer` (when to save, what to resume), the `Evaluator` (the periodic val
loss), the `Meter` (throughput, MFU, ETA, progress), the tracker (MLflow, or nothing) and the
`StopRule` (max_steps, time budget). The same loop runs on one CPU, one GPU, or N processes
(DDP; gloo on CPU, NCCL on GPU) started by torch's elastic launcher (llm/distributed.py).
AdamW (or Muon for the blocks' matrices and AdamW for the rest: llm/optim.py), warmup then cosine
or warmup-stable-decay, gradient accumulation to `train.tokens_per_step`, global-norm clipping.
A checkpoint continues bit-identically on CPU: weights, optimizer, step, RNG state and the data
loader's position.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import logging
import math
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from llm.artifacts import save_final
from llm.checkpoint import CHECKPOINT, Checkpointer, fingerprint, rng_state, set_rng_state
from llm.config import Params, TrainParams
from llm.dataset import DeviceBatches, TokenBlocks
from llm.device import Device, peak_flops, pick_device, require_torch, set_threads
from llm.distributed import Dist, init_distributed
from llm.errors import UserError
from llm.faults import fault_point
from llm.io import atomic_dir, atomic_file, text_size, write_json
from llm.layout import Layout
from llm.model import GPT, GPTConfig
from llm.optim import Optimizers, build_optimizer
from llm.progress import progress_enabled
from llm.shards import read_manifest, verify_shards
from llm.tokenizer import MODEL_FILE

log = logging.getLogger(__name__)
HISTORY_FIELDS = ["step", "tokens", "train_loss", "val_loss", "lr"]


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
        if tp.decay_shape == "sqrt":
            progress = math.sqrt(progress)
        return tp.learning_rate - (tp.learning_rate - low) * progress
    span = max(1, tp.max_steps - tp.warmup_steps)
    progress = min(1.0, (step - tp.warmup_steps) / span)
    return low + 0.5 * (tp.learning_rate - low) * (1 + math.cos(math.pi * progress))


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
            loss = model(x, y)
        total += loss.item() * len(blocks)
        count += len(blocks)
    model.train(was_training)
    return total / count


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where it is, and what a checkpoint holds."""

    model: GPT
    optimizer: Optimizers
    data: DeviceBatches
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



@dataclass(frozen=True)
class StepResult:
    loss: float
    """Mean over the micro-batches and over all processes."""
    grad_norm: float


def train_step(model: torch.nn.Module, state: TrainState, batches: Iterator, accum: int, lr_factor: float,
               grad_clip: float, device: Device, dist: Dist) -> StepResult:
    """One optimizer step over `accum` micro-batches (already on the device). `model` is what runs
    the batches (the compiled or DDP-wrapped model); gradients are synchronised on the last
    micro-batch only. The finite-loss decision is taken on the all-reduced loss, before the
    optimizer steps, so every rank raises NonFiniteLoss together and the weights stay as they were."""
    state.optimizer.set_lr(lr_factor)
    loss_sum = torch.zeros((), device=device.torch_device)
    for micro in range(accum):
        x, y = next(batches)
        sync = model.no_sync() if (dist.world_size > 1 and micro < accum - 1) else contextlib.nullcontext()
        with sync, device.autocast():
            loss = model(x, y)
        (loss / accum).backward()
        loss_sum += loss.detach()
    step_loss = dist.mean(loss_sum / accum).item()  # the one host sync of a step
    if not math.isfinite(step_loss):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(step_loss)
    norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return StepResult(step_loss, float(norm))


class Evaluator:
    """The periodic val loss on a fixed prefix of the val stream, and the history row it adds
    (metrics/loss.csv) with the mean train loss since the row before."""

    def __init__(self, val: TokenBlocks, tp: TrainParams, device: Device):
        self.val, self.tp, self.device = val, tp, device
        self.train_losses: list[float] = []
        self.seconds = 0.0
        """Time spent evaluating, which the throughput leaves out."""

    def loss(self, model: GPT) -> float:
        t0 = time.perf_counter()
        value = evaluate_loss(model, self.val, self.tp.eval_tokens, self.tp.batch_size, self.device)
        self.seconds += time.perf_counter() - t0
        return value

    def after_step(self, state: TrainState, train_loss: float, lr: float, stopping: bool) -> dict[str, float]:
        self.train_losses.append(train_loss)
        if not (stopping or state.step % self.tp.eval_interval == 0):
            return {}
        val_loss = self.loss(state.model)
        state.history.append({"step": state.step, "tokens": state.step * self.tp.tokens_per_step,
                              "train_loss": round(sum(self.train_losses) / len(self.train_losses), 5),
                              "val_loss": round(val_loss, 5), "lr": lr})
        self.train_losses.clear()
        log.info("step %d: val loss %.4f", state.step, val_loss)
        return {"val_loss": val_loss}


class Meter:
    """Time, throughput and progress. Tokens/s in all and per device; MFU per device, against that
    device's peak (a global rate over one device's peak would count every device as the first).
    Evaluation time is left out of both; the first step's compile time is in them."""

    def __init__(self, tp: TrainParams, state: TrainState, flops_per_token: float, peak: float, device: Device,
                 dist: Dist, evaluator: Evaluator):
        self.tp, self.flops_per_token, self.peak, self.device, self.dist = tp, flops_per_token, peak, device, dist
        self.evaluator = evaluator
        self.start_step, self.elapsed_before = state.step, state.elapsed
        self.t_start = self.t_window = time.perf_counter()
        # the evaluation before the first step is not in a window
        self.eval_before = self.window_eval = self.eval_in_elapsed = evaluator.seconds
        self.window_steps = 0
        self.step_times: list[float] = []
        self.t_last = self.t_start
        self.bar = tqdm(total=tp.max_steps, initial=state.step, desc="train", unit="step",
                        disable=not (dist.main and progress_enabled()), mininterval=1.0)

    def rates(self, tokens: int, seconds: float) -> dict[str, float]:
        tok_s = tokens / max(seconds, 1e-9)
        per_device = tok_s / self.dist.world_size
        return {"tokens_per_sec": tok_s, "tokens_per_sec_per_device": per_device,
                "mfu": per_device * self.flops_per_token / self.peak if self.peak else 0.0}

    def after_step(self, state: TrainState, result: StepResult, lr: float, stopping: bool) -> dict[str, float]:
        now = time.perf_counter()
        self.step_times.append(now - self.t_last)  # host time: the step's loss.item() waited for the device
        self.t_last = now
        state.elapsed = self.elapsed_before + now - self.t_start
        self.eval_in_elapsed = self.evaluator.seconds  # the last step's evaluation comes after its time
        self.window_steps += 1
        self.bar.update(1)
        if not (stopping or state.step % self.tp.log_interval == 0):
            return {}
        self.device.synchronize()
        seconds = time.perf_counter() - self.t_window - (self.evaluator.seconds - self.window_eval)
        metrics = self.rates(self.window_steps * self.tp.tokens_per_step, seconds)
        self.t_window, self.window_steps, self.window_eval = time.perf_counter(), 0, self.evaluator.seconds
        done = state.step - self.start_step
        metrics["eta_seconds"] = (self.tp.max_steps - state.step) * (state.elapsed - self.elapsed_before) / max(1, done)
        self.bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tokens_per_sec']:,.0f}",
                             mfu=f"{metrics['mfu']:.0%}")
        if self.bar.disable and self.dist.main:  # no bar (not a terminal): a log line instead
            log.info("step %d/%d loss %.4f lr %.2e grad %.2f %.0f tok/s (%.0f per device) mfu %.1f%% eta %.0fs",
                     state.step, self.tp.max_steps, result.loss, lr, result.grad_norm, metrics["tokens_per_sec"],
                     metrics["tokens_per_sec_per_device"], 100 * metrics["mfu"], metrics["eta_seconds"])
        return metrics

    def summary(self, state: TrainState) -> dict[str, Any]:
        """This process's totals: step time (compile included, evaluation left out) and memory."""
        eval_seconds = self.eval_in_elapsed - self.eval_before
        seconds = max(1e-9, state.elapsed - self.elapsed_before - eval_seconds)
        rates = self.rates((state.step - self.start_step) * self.tp.tokens_per_step, seconds)
        later = self.step_times[1:]
        compile_s = self.step_times[0] - statistics.median(later) if later and self.tp.compile else 0.0
        if self.device.type == "cuda":
            peak_memory = torch.cuda.max_memory_allocated(self.device.torch_device)
        else:  # the process's peak resident memory (Linux reports KiB)
            peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"tokens_per_sec": round(rates["tokens_per_sec"]),
                "tokens_per_sec_per_device": round(rates["tokens_per_sec_per_device"]),
                "mfu": round(rates["mfu"], 6), "throughput_counts": "step time incl. compile, excl. evaluation",
                "compile_seconds": round(max(0.0, compile_s), 1),
                "graph_breaks": graph_breaks() if self.tp.compile else None,
                "eval_seconds": round(eval_seconds, 1), "peak_memory_bytes": int(peak_memory)}

    def close(self) -> None:
        self.bar.close()


def graph_breaks() -> int | None:
    """The graph breaks torch.compile has taken in this process; None when it compiled nothing."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return sum(dynamo.counters["graph_break"].values()) if dynamo else None


class StopRule:
    """When the run ends: at max_steps, or at the time budget (checked every log_interval steps,
    decided by all ranks together). Runs stopped by the budget are not reproducible step for step."""

    def __init__(self, tp: TrainParams, dist: Dist):
        self.tp, self.dist = tp, dist
        self.budget = tp.time_budget_minutes * 60 if tp.time_budget_minutes > 0 else math.inf
        self.reason: str | None = None

    def __call__(self, state: TrainState) -> str | None:
        if self.reason is None:
            self.reason = self._decide(state)
        return self.reason

    def _decide(self, state: TrainState) -> str | None:
        if state.step >= self.tp.max_steps:
            return "max_steps"
        if (self.budget < math.inf and state.step % self.tp.log_interval == 0
                and self.dist.any(state.elapsed > self.budget)):
            log.warning("train: time budget of %.1f min reached at step %d of %d", self.tp.time_budget_minutes,
                        state.step, self.tp.max_steps)
            return "time_budget"
        return None


def plan_fits_data(params: Params, n_params: int, manifest: dict) -> None:
    """States the run's plan before any step (parameters, tokens, passes over the data, tokens per
    parameter) and refuses a plan that would pass over the train tokens more than train.max_epochs
    times, naming the corpus size it needs."""
    tp = params.train
    train = manifest["splits"]["train"]
    planned = tp.max_steps * tp.tokens_per_step
    epochs = planned / max(1, train["tokens"])
    log.info("train: %.2f M parameters; %s train tokens (%s of text); %s planned tokens = %.1f passes over the "
             "data; %.1f tokens per parameter (compute-optimal is about 20)", n_params / 1e6, f"{train['tokens']:,}",
             text_size(train["bytes"]), f"{planned:,}", epochs, planned / n_params)
    if epochs <= tp.max_epochs:
        return
    bytes_per_token = train["bytes"] / max(1, train["tokens"])
    needed_mb = planned / tp.max_epochs * bytes_per_token / 1e6
    fitting_steps = max(1, int(tp.max_epochs * train["tokens"] // tp.tokens_per_step))
    name = f"preset {params.preset!r}" if params.preset else "these params"
    raise UserError(f"train: {name} plan {planned:,} tokens, {epochs:,.0f} passes over this corpus's "
                    f"{train['tokens']:,} train tokens ({text_size(train['bytes'])}); "
                    f"they need about {needed_mb:,.0f} MB of train text "
                    f"for train.max_epochs: {tp.max_epochs:g} (or train.max_steps: {fitting_steps} here)")


def blocks_fit(params: Params, manifest: dict, world_size: int) -> None:
    """Each process needs one train block of block_size + 1 tokens, and evaluation one val block:
    a split too small for them is one line naming model.block_size and a size that fits both."""
    block = params.model.block_size
    per = {"train": world_size, "val": 1}
    tokens = {split: manifest["splits"][split]["tokens"] for split in per}
    largest = {split: (tokens[split] - 1) // per[split] for split in per}
    short = [split for split in per if block > largest[split]]
    if short:
        split, most = short[0], min(largest.values())
        each = f" for each of the {per[split]} processes" if per[split] > 1 else ""
        # the largest power of two that both splits serve
        advice = (f"use model.block_size: {1 << (most.bit_length() - 1)} or less, or a bigger corpus" if most >= 1
                  else "no block size fits: add text to the corpus (ingest.sources)")
        raise UserError(f"train: model.block_size {block} needs {block + 1:,} tokens of the {split} split{each}; "
                        f"it has {tokens[split]:,}: {advice}")


def build(params: Params, layout: Layout, device: Device, dist: Dist) -> tuple[TrainState, TokenBlocks, dict]:
    """The model, optimizer and data of this run, from scratch (the checkpoint comes after)."""
    tp, mp = params.train, params.model
    manifest = read_manifest(layout.shards)
    verify_shards(layout.shards)
    blocks_fit(params, manifest, dist.world_size)
    torch.manual_seed(params.seed)
    model = GPT(GPTConfig.from_params(mp, manifest["tokenizer"]["vocab_size"])).to(device.torch_device)
    plan_fits_data(params, model.num_params(), manifest)
    train_data = TokenBlocks(layout.shards, "train", mp.block_size, seed=params.seed, rank=dist.rank,
                             world_size=dist.world_size)
    val_data = TokenBlocks(layout.shards, "val", mp.block_size, shuffle=False)
    batches = DeviceBatches(train_data, tp.batch_size, device.torch_device)
    opt = build_optimizer(model, tp, device)
    return TrainState(model, opt, batches, fingerprint(params, manifest)), val_data, manifest


def train(params: Params, layout: Layout, resume: str = "auto", tags: dict[str, str] | None = None) -> dict:
    """Train into layout.final. resume: auto (continue a checkpoint of the same params and
    data), always (fail if there is none), never (start from scratch). tags: extra MLflow tags."""
    tp = params.train
    require_torch()
    device = pick_device(tp.device, int(os.environ.get("LOCAL_RANK", "0")), tp.precision)
    with deterministic_on_cpu(device, compiling=tp.compile and can_compile(device)):
        dist = init_distributed(device)
        try:
            return _train(params, layout, resume, tags or {}, device, dist)
        finally:
            dist.close()


@contextlib.contextmanager
def deterministic_on_cpu(device: Device, compiling: bool = True) -> Iterator[None]:
    """On a CPU, torch's deterministic algorithms for the duration; then as the caller had them.
    Compiled kernels otherwise sum some gradients (most likely the embedding's scatter-add) in an
    order that depends on thread timing: two runs would part in the fourth digit within 100 steps.
    Without `compiling`, only the eager flag is set: torch.use_deterministic_algorithms also sets
    inductor's, and importing inductor for it costs seconds of start-up in a run that never compiles."""
    def use(mode: bool, warn_only: bool) -> None:
        if compiling or "torch._inductor.config" in sys.modules:
            torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        else:
            torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cpu":
        use(True, warn_only=True)
    try:
        yield
    finally:
        use(before[0], warn_only=before[1])


def _train(params: Params, layout: Layout, resume: str, tags: dict[str, str], device: Device, dist: Dist) -> dict:
    tp = params.train
    threads = set_threads(tp.threads) if device.type == "cpu" else torch.get_num_threads()
    state, val_data, manifest = build(params, layout, device, dist)
    checkpointer = Checkpointer(layout.checkpoints / CHECKPOINT, tp.checkpoint_interval, device, dist)
    checkpointer.restore(state, resume)
    runner = wrap_model(state.model, tp, device, dist)
    accum = accumulation_steps(tp, state.model.config.block_size, dist.world_size)
    peak, peak_source = peak_flops(device) if dist.node_main else (0.0, "")
    describe_run(state.model, tp, device, dist, accum, peak, peak_source)
    evaluator = Evaluator(val_data, tp, device)
    if state.step == 0:
        state.initial_val_loss = evaluator.loss(state.model)
    tracker = open_tracker(params, layout, device, dist, {"threads": str(threads), **tags})
    meter = Meter(tp, state, state.model.flops_per_token(), peak, device, dist, evaluator)
    stop = StopRule(tp, dist)
    state.model.train()
    with tracker, contextlib.closing(meter):
        while not stop(state):
            lr = lr_at(state.step, tp)
            try:
                result = train_step(runner, state, state.data, accum, lr / tp.learning_rate, tp.grad_clip, device, dist)
            except NonFiniteLoss as e:
                raise TrainingDiverged(f"train: loss is {e.loss} at step {state.step + 1}{checkpointer.last_good()}; "
                                       "lower train.learning_rate or raise train.warmup_steps") from None
            stopping = stop(state) is not None
            metrics = {"train_loss": result.loss, "lr": lr, "grad_norm": result.grad_norm}
            metrics |= meter.after_step(state, result, lr, stopping)
            metrics |= evaluator.after_step(state, result.loss, lr, stopping)
            tracker.log(metrics, state.step)
            checkpointer.save_if_due(state, stopping)
            fault_point(f"train.rank{dist.rank}.step{state.step}", model=state.model)
        summary = _summary(state, stop.reason or "max_steps", meter, peak, peak_source, device, dist)
        if dist.node_main:
            _write_outputs(layout, state, summary, params, manifest, tracker)
    return summary


def wrap_model(model: GPT, tp: TrainParams, device: Device, dist: Dist) -> torch.nn.Module:
    """What runs the batches. DDP first and torch.compile around it, so the compiled graph is split
    at DDP's bucket boundaries and gradient all-reduces overlap the backward pass. No buffer
    broadcast: the only buffers are the rotary tables, the same on every rank by construction."""
    runner: torch.nn.Module = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # torch 2.13 renames broadcast_buffers=False to forward_sync_buffers=False (which also syncs
        # the buffers once at the start, the same tables here); older torch has only the first.
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers")
        runner = DDP(model, device_ids=[dist.local_rank] if device.type == "cuda" else None, **{no_sync: False})
    if tp.compile and can_compile(device):
        runner = torch.compile(runner)
    return runner


def describe_run(model: GPT, tp: TrainParams, device: Device, dist: Dist, accum: int, peak: float,
                 peak_source: str) -> None:
    cfg = model.config
    log.info("train: %d layers x %d wide, block %d, vocab %d on %s (%s); %d tokens/step = %d x %d x %d x %d processes; "
             "peak %.1f GFLOP/s per device (%s)", cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size, device.name,
             str(device.dtype).replace("torch.", ""), tp.tokens_per_step, tp.batch_size, cfg.block_size, accum,
             dist.world_size, peak / 1e9, peak_source)


def open_tracker(params: Params, layout: Layout, device: Device, dist: Dist, tags: dict[str, str]):
    """MLflow on rank 0 when tracking is on; otherwise a tracker that records nothing (and imports
    no MLflow: a bare GPU node trains without it)."""
    from llm.tracking import NullTracker, Tracker

    if not (dist.main and params.tracking.enabled):
        return NullTracker()
    return Tracker(params, layout.root, {"device": device.name, "torch": torch.__version__, "stage": "train",
                                         "preset": params.preset or "default", **tags})


def can_compile(device: Device) -> bool:
    """torch.compile on CPU builds C++ kernels: without a compiler, train eagerly and say so."""
    if device.type != "cpu" or any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return True
    log.warning("train: train.compile is on but no C++ compiler is installed (apt-get install g++); "
                "training uncompiled")
    return False


def _summary(state: TrainState, stopped_by: str, meter: Meter, peak: float, peak_source: str, device: Device,
             dist: Dist) -> dict:
    return {
        "steps": state.step,
        "stopped_by": stopped_by,
        "tokens_seen": state.step * meter.tp.tokens_per_step,
        "train_seconds": round(state.elapsed, 1),
        **meter.summary(state),
        "final_train_loss": state.history[-1]["train_loss"],
        "final_val_loss": state.history[-1]["val_loss"],
        "initial_val_loss": round(state.initial_val_loss, 5),
        "params": state.model.num_params(),
        "flops_per_token": meter.flops_per_token,
        "peak_flops": peak,
        "peak_source": peak_source,
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
        "train: %d steps, %s tokens in %.0f s (%.0f tok/s, %.0f per device, MFU %.1f%%); val loss %.3f -> %.3f",
        summary["steps"], f"{summary['tokens_seen']:,}", summary["train_seconds"], summary["tokens_per_sec"],
        summary["tokens_per_sec_per_device"], 100 * summary["mfu"], summary["initial_val_loss"],
        summary["final_val_loss"],
    )
