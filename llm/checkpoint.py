"""A run's checkpoint: what it must match to be resumed (the fingerprint), how it is written
(atomically, tensors and plain data only) and read back, and the `Checkpointer` that decides
when `llm train` saves and what it resumes."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any, Protocol

import torch

from llm.codedeps import code_version
from llm.config import Params
from llm.device import Device
from llm.distributed import Dist
from llm.errors import UserError
from llm.faults import fault_point
from llm.io import atomic_file

log = logging.getLogger("llm.train")  # its lines are the train stage's


class Resumable(Protocol):
    """What the Checkpointer saves and restores (llm.train's TrainState)."""

    step: int
    fingerprint: str

    def state_dict(self, device: Device) -> dict[str, Any]: ...

    def load_state_dict(self, ckpt: dict[str, Any], device: Device) -> None: ...

CHECKPOINT = "last.pt"
# Params that do not change the numbers a run computes: changing them keeps its checkpoint.
_NOT_IN_FINGERPRINT = {"time_budget_minutes", "checkpoint_interval", "log_interval", "eval_interval", "eval_tokens",
                       "threads", "compile", "device", "rdzv_endpoint", "max_epochs"}


def fingerprint(params: Params, manifest: dict) -> str:
    """What a checkpoint must match to be resumed: the model, the math of training, the data and
    the code that computes it (the files of `llm train`'s import closure, as dvc.yaml lists them:
    DVC reruns train for an edit to any, and resuming would hand back the old code's model).
    The values themselves (JSON), not a hash of them, so that a checkpoint of other ones can say
    which differ."""
    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT}
    data = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    return json.dumps({"seed": params.seed, "model": params.model.model_dump(mode="json"), "train": train, "data": data,
                       "tokenizer": manifest["tokenizer"]["sha256"], "code": code_version("train")}, sort_keys=True)


def fingerprint_difference(old: Any, new: str, most: int = 3) -> str:
    """What differs between a checkpoint's fingerprint and this run's, as a person reads it:
    `train.learning_rate 0.002 -> 0.001`, `the train shards`, `the code of llm train`."""
    try:
        a, b = json.loads(old), json.loads(new)
    except (TypeError, ValueError):  # a checkpoint from before fingerprints were readable
        return "other params, data or code"
    named = {"data": "the train shards", "tokenizer": "the tokenizer", "code": "the code of `llm train`"}
    diffs = [named[k] for k in named if a.get(k) != b.get(k)]
    for group in ("seed", "model", "train"):
        x, y = a.get(group), b.get(group)
        if not isinstance(y, dict):
            diffs += [f"{group} {x} -> {y}"] if x != y else []
            continue
        x = x if isinstance(x, dict) else {}
        diffs += [f"{group}.{k} {x.get(k, '(unset)')} -> {y.get(k, '(unset)')}" for k in sorted({*x, *y})
                  if x.get(k) != y.get(k)]
    return ", ".join(diffs[:most]) + (f" and {len(diffs) - most} more" if len(diffs) > most else "")


def rng_state(device: Device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device.torch_device)
    return state


def set_rng_state(state: dict[str, Any], device: Device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device.torch_device)


def load_checkpoint(path: Path, fp: str, required: bool = False) -> dict | None:
    """The checkpoint at path if it was written by a run with the same fingerprint. required
    (`llm train --resume`): no such checkpoint is one line saying why."""
    if not path.is_file():
        if required:
            raise UserError(f"train --resume: no checkpoint at {path}")
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0][:160]}); "
                        "`llm train --restart` starts over (or delete the file)") from None
    if ckpt.get("fingerprint") != fp:
        differs = fingerprint_difference(ckpt.get("fingerprint"), fp)
        other = f"{path} (step {ckpt.get('step', '?')}) is of a run with {differs}"
        if required:
            raise UserError(f"train --resume: {other}; put those back to resume it, or drop --resume to start over")
        log.warning("train: %s; starting from scratch (`llm train --resume` refuses instead)", other)
        return None
    return ckpt


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Written atomically: tensors and plain data only, loadable with weights_only=True."""
    with atomic_file(path, "wb") as f:
        torch.save(state, f)
    fault_point(f"train.checkpoint.{state['step']}")


class Checkpointer:
    """What a run resumes from, and when it saves: every checkpoint_interval steps and when the run
    stops. Local rank 0 writes (one copy per node); every rank knows the last step saved, for the
    divergence error."""

    def __init__(self, path: Path, interval: int, device: Device, dist: Dist):
        self.path, self.interval, self.device, self.dist = path, interval, device, dist
        self.saved_step: int | None = None

    def restore(self, state: Resumable, resume: str) -> None:
        """resume: auto (a checkpoint of the same fingerprint, if any), always (fail without one), never."""
        ckpt = None if resume == "never" else load_checkpoint(self.path, state.fingerprint, resume == "always")
        if ckpt is not None:
            state.load_state_dict(ckpt, self.device)
            self.saved_step = state.step
            log.info("train: resuming %s at step %d", self.path, state.step)

    def save_if_due(self, state: Resumable, stopping: bool) -> None:
        if stopping or state.step % self.interval == 0:
            if self.dist.node_main:
                save_checkpoint(state.state_dict(self.device), self.path)
            self.saved_step = state.step

    def last_good(self) -> str:
        """Where a run that stops now can be taken up again, for its error line ("" if nowhere)."""
        if self.saved_step is None:
            return ""
        return f"; the last good checkpoint is {self.path} (step {self.saved_step})"
