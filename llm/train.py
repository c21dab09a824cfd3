"""Stage `train`: shards -> models/checkpoints/last.pt and models/final/.

The same loop runs on one CPU, one GPU, or N processes under torchrun (DDP; gloo on CPU,
NCCL on GPU). AdamW with decay/no-decay groups, linear warmup then cosine decay, gradient
accumulation to `train.tokens_per_step`, global-norm clipping. Checkpoints hold everything
needed to continue bit-identically on CPU: weights, optimizer, step, RNG state and the data
loader's position.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llm.config import Params, TrainParams
from llm.dataset import TokenBlocks
from llm.device import Device, peak_flops, pick_device, set_threads
from llm.errors import UserError
from llm.io import atomic_dir, atomic_file, write_json
from llm.model import GPT, GPTConfig
from llm.progress import progress_enabled
from llm.shards import read_manifest

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"
# Params that do not change the numbers a run computes: changing them keeps its checkpoint.
_NOT_IN_FINGERPRINT = {"time_budget_minutes", "checkpoint_interval", "log_interval", "eval_interval", "eval_tokens", "threads", "compile", "device"}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """torchrun sets RANK/WORLD_SIZE; without it this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)


def lr_at(step: int, tp: TrainParams) -> float:
    """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio."""
    if step < tp.warmup_steps:
        return tp.learning_rate * (step + 1) / tp.warmup_steps
    span = max(1, tp.max_steps - tp.warmup_steps)
    progress = min(1.0, (step - tp.warmup_steps) / span)
    low = tp.learning_rate * tp.min_lr_ratio
    return low + 0.5 * (tp.learning_rate - low) * (1 + math.cos(math.pi * progress))


def fingerprint(params: Params, manifest: dict) -> str:
    """What a checkpoint must match to be resumed: the model, the math of training, the data."""
    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT}
    data = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    blob = json.dumps({"seed": params.seed, "model": params.model.model_dump(mode="json"), "train": train, "data": data,
                       "tokenizer": manifest["tokenizer"]["sha256"]}, sort_keys=True)
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
            _, loss, _, _ = model(x, y)
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
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    if ckpt.get("fingerprint") != fp:
        log.info("train: %s belongs to other params or data; starting from scratch", path)
        return None
    return ckpt


def train(params: Params, root: Path, resume: str = "auto", layout=None, tags: dict[str, str] | None = None) -> dict:
    """resume: auto (continue a checkpoint of the same params and data), always (fail if there is
    none), never (start from scratch). layout: where outputs go (default: the project's); tags:
    extra MLflow tags of the run."""
    from llm.stages import Layout

    lay = layout or Layout(root)
    tp, mp = params.train, params.model
    manifest = read_manifest(lay.shards)
    device = pick_device(tp.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device.type)
    threads = set_threads(tp.threads) if device.type == "cpu" else torch.get_num_threads()
    torch.manual_seed(params.seed)
    cfg = GPTConfig(vocab_size=manifest["tokenizer"]["vocab_size"], **mp.model_dump())
    model = GPT(cfg).to(device.torch_device)
    accum = accumulation_steps(tp, mp.block_size, dist.world_size)
    train_data = TokenBlocks(lay.shards, "train", mp.block_size, seed=params.seed, rank=dist.rank, world_size=dist.world_size)
    val_data = TokenBlocks(lay.shards, "val", mp.block_size, shuffle=False)
    groups = model.optimizer_groups(tp.weight_decay)
    opt = torch.optim.AdamW(groups, lr=tp.learning_rate, betas=(tp.beta1, tp.beta2), fused=device.type == "cuda")

    fp = fingerprint(params, manifest)
    ckpt_path = lay.checkpoints / CHECKPOINT
    ckpt = None if resume == "never" else load_checkpoint(ckpt_path, fp)
    if resume == "always" and ckpt is None:
        raise UserError(f"train --resume: no checkpoint of these params and data at {ckpt_path}")
    start_step, elapsed_before, history = 0, 0.0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        train_data.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"], device)
        start_step, elapsed_before, history = ckpt["step"], ckpt["elapsed"], ckpt["history"]
        log.info("train: resuming %s at step %d", ckpt_path, start_step)

    compiled = torch.compile(model) if tp.compile else model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        compiled = DDP(compiled, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    flops_per_token = model.flops_per_token()
    peak, peak_source = peak_flops(device) if dist.main else (0.0, "")
    log.info(
        "train: %.2f M params, %d layers x %d wide, block %d, vocab %d on %s (%s); %d tokens/step = %d x %d x %d x %d processes; "
        "peak %.1f GFLOP/s (%s)",
        model.num_params() / 1e6, cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.vocab_size, device.name,
        str(device.dtype).replace("torch.", ""), tp.tokens_per_step, tp.batch_size, mp.block_size, accum, dist.world_size,
        peak / 1e9, peak_source,
    )

    tracker = _Tracker(params, root, device, threads, dist.main, tags or {})
    batches = train_data.batches(tp.batch_size)
    model.train()
    t_start = time.perf_counter()
    budget = tp.time_budget_minutes * 60 if tp.time_budget_minutes > 0 else math.inf
    stopped_by = "max_steps"
    bar = tqdm(total=tp.max_steps, initial=start_step, desc="train", unit="step",
               disable=not (dist.main and progress_enabled()), mininterval=1.0)
    done = start_step
    window_tokens, window_t0, train_loss_sum, train_loss_n = 0, time.perf_counter(), 0.0, 0
    try:
        with tracker:
            for step in range(start_step, tp.max_steps):
                lr = lr_at(step, tp)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss_sum = torch.zeros((), device=device.torch_device)
                for micro in range(accum):
                    x, y = next(batches)
                    x, y = x.to(device.torch_device, non_blocking=True), y.to(device.torch_device, non_blocking=True)
                    sync = micro == accum - 1 or dist.world_size == 1
                    ctx = compiled.no_sync() if (dist.world_size > 1 and not sync) else contextlib.nullcontext()
                    with ctx, device.autocast():
                        _, loss, _, _ = compiled(x, y)
                    (loss / accum).backward()
                    loss_sum += loss.detach()
                step_loss = (loss_sum / accum).item()  # one device sync per step, not per micro-batch
                if not math.isfinite(step_loss):
                    where = f"; the last good checkpoint is {ckpt_path} (step {ckpt['step']})" if ckpt_path.is_file() and ckpt else ""
                    raise TrainingDiverged(
                        f"train: loss is {step_loss} at step {step + 1}{where}; lower train.learning_rate or raise train.warmup_steps"
                    )
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip if tp.grad_clip > 0 else float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
                done = step + 1
                window_tokens += tp.tokens_per_step
                train_loss_sum += step_loss
                train_loss_n += 1
                metrics = {"train_loss": step_loss, "lr": lr, "grad_norm": float(norm)}
                if done % tp.log_interval == 0 or done == tp.max_steps:
                    device.synchronize()
                    dt = time.perf_counter() - window_t0
                    tok_s = window_tokens / dt
                    metrics.update(tokens_per_sec=tok_s, mfu=tok_s * flops_per_token / peak if peak else 0.0)
                    window_tokens, window_t0 = 0, time.perf_counter()
                    elapsed = elapsed_before + time.perf_counter() - t_start
                    eta = (tp.max_steps - done) * elapsed / max(1, done - start_step) if done > start_step else 0.0
                    bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{metrics['mfu']:.0%}")
                    if bar.disable and dist.main:  # no bar (not a terminal): a log line instead
                        log.info("step %d/%d loss %.4f lr %.2e grad %.2f %.0f tok/s mfu %.1f%% eta %.0fs",
                                 done, tp.max_steps, step_loss, lr, float(norm), tok_s, 100 * metrics["mfu"], eta)
                if done % tp.eval_interval == 0 or done == tp.max_steps:
                    last_val = evaluate_loss(model, val_data, tp.eval_tokens, tp.batch_size, device)
                    metrics["val_loss"] = last_val
                    history.append({"step": done, "tokens": done * tp.tokens_per_step,
                                    "train_loss": round(train_loss_sum / train_loss_n, 5), "val_loss": round(last_val, 5), "lr": lr})
                    train_loss_sum, train_loss_n = 0.0, 0
                    if dist.main:
                        log.info("step %d: val loss %.4f", done, last_val)
                tracker.log(metrics, done)
                bar.update(1)
                elapsed = elapsed_before + time.perf_counter() - t_start
                if dist.main and (done % tp.checkpoint_interval == 0 or done == tp.max_steps):
                    ckpt = save_checkpoint(ckpt_path, model, opt, done, train_data, device, fp, elapsed, history)
                if elapsed > budget and done < tp.max_steps:
                    stopped_by = "time_budget"
                    log.warning("train: time budget of %.1f min reached at step %d of %d", tp.time_budget_minutes, done, tp.max_steps)
                    if dist.main:
                        ckpt = save_checkpoint(ckpt_path, model, opt, done, train_data, device, fp, elapsed, history)
                    break
            bar.close()
            step = done
            elapsed = elapsed_before + time.perf_counter() - t_start
            if not history or history[-1]["step"] != step:  # stopped by the budget between evals
                last_val = evaluate_loss(model, val_data, tp.eval_tokens, tp.batch_size, device)
                history.append({"step": step, "tokens": step * tp.tokens_per_step,
                                "train_loss": round(train_loss_sum / max(1, train_loss_n), 5),
                                "val_loss": round(last_val, 5), "lr": lr_at(max(0, step - 1), tp)})
            summary = {
                "steps": step,
                "stopped_by": stopped_by,
                "tokens_seen": step * tp.tokens_per_step,
                "train_seconds": round(elapsed, 1),
                "tokens_per_sec": round(step * tp.tokens_per_step / max(elapsed, 1e-9)),
                "final_train_loss": history[-1]["train_loss"],
                "final_val_loss": history[-1]["val_loss"],
                "initial_val_loss": round(math.log(cfg.vocab_size), 5),
                "params": model.num_params(),
                "flops_per_token": flops_per_token,
                "mfu": round(step * tp.tokens_per_step / max(elapsed, 1e-9) * flops_per_token / peak, 4) if peak else 0.0,
                "peak_flops": peak,
                "device": device.name,
                "processes": dist.world_size,
            }
            if dist.main:
                _write_outputs(lay, model, history, summary, params, manifest, tracker)
    finally:
        bar.close()
        if dist.world_size > 1:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return summary


def save_checkpoint(path: Path, model: GPT, opt, step: int, data: TokenBlocks, device: Device, fp: str,
                    elapsed: float, history: list[dict]) -> dict:
    """Everything to continue exactly here, written atomically (tensors and plain data only)."""
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "data": data.state_dict(),
        "rng": rng_state(device),
        "fingerprint": fp,
        "elapsed": elapsed,
        "history": history,
    }
    with atomic_file(path, "wb") as f:
        torch.save(ckpt, f)
    return ckpt


def _write_outputs(lay, model: GPT, history: list[dict], summary: dict, params: Params, manifest: dict, tracker: "_Tracker") -> None:
    from llm.artifacts import save_final
    from llm.tokenizer import MODEL_FILE

    # Only what the weights depend on goes beside them, so the same params and data give the
    # same bytes; timing, device and the MLflow run id go to metrics/train.json.
    info = {"tokenizer_sha256": manifest["tokenizer"]["sha256"], "seed": params.seed,
            "steps": summary["steps"], "tokens_seen": summary["tokens_seen"]}
    with atomic_dir(lay.final) as tmp:
        save_final(model, tmp, lay.tokenizer / MODEL_FILE, info)
    summary["mlflow_run_id"] = tracker.finish(lay.final, summary)
    write_json(lay.metrics("train"), summary)
    with atomic_file(lay.metrics_dir / "loss.csv") as f:
        w = csv.DictWriter(f, fieldnames=["step", "tokens", "train_loss", "val_loss", "lr"], lineterminator="\n")
        w.writeheader()
        w.writerows(history)
    log.info(
        "train: %d steps, %s tokens in %.0f s (%.0f tok/s, MFU %.1f%%); loss %.3f -> val %.3f",
        summary["steps"], f"{summary['tokens_seen']:,}", summary["train_seconds"], summary["tokens_per_sec"],
        100 * summary["mfu"], summary["initial_val_loss"], summary["final_val_loss"],
    )


class _Tracker:
    """Per-step metrics to MLflow in batches; the run id and artifacts at the end. Only the
    main process tracks."""

    def __init__(self, params: Params, root: Path, device: Device, threads: int, enabled: bool, tags: dict[str, str]):
        self.params, self.root, self.device, self.threads, self.enabled = params, root, device, threads, enabled
        self.tags = tags
        self.pending: list = []
        self._ctx = None
        self.run = None

    def __enter__(self) -> "_Tracker":
        if self.enabled:
            from llm.tracking import start_run

            self._ctx = start_run(self.params, self.root, {"device": self.device.name, "torch": torch.__version__,
                                                           "threads": str(self.threads), "stage": "train", **self.tags})
            self.run = self._ctx.__enter__()
        return self

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.pending and self.run is not None:
            import mlflow

            mlflow.MlflowClient().log_batch(self.run.info.run_id, metrics=self.pending)
            self.pending = []

    def finish(self, final_dir: Path, summary: dict) -> str | None:
        """Summary metrics and the final model into the run; returns the run id."""
        if self.run is None:
            return None
        import mlflow

        self.flush()
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_artifacts(str(final_dir), artifact_path="model")
        summary["mlflow_experiment_id"] = self.run.info.experiment_id  # for links to the run (Dagster UI)
        return self.run.info.run_id

    def __exit__(self, exc_type, *exc) -> None:
        if self._ctx is not None:
            self.flush()
            self._ctx.__exit__(exc_type, *exc)
