"""The optimizers of `llm train`: AdamW, or torch.optim.Muon for the blocks' 2-D matrices and
AdamW for the rest, behind one interface.

`GroupedMuon` is torch.optim.Muon with one change in how it runs, not in what it computes: the
Newton-Schulz iterations that orthogonalize each update run once per group of same-shaped
matrices (a batched matmul) instead of once per matrix. A 4-layer model has 20 hidden matrices
of 3 shapes, so a step runs 45 batched matmuls instead of 300 small ones. Same hyperparameters,
same state dict (it loads into torch.optim.Muon and back), and the same updates: the
Newton-Schulz arithmetic is torch's, step for step (tests/test_optim.py holds the two equal).

One choice is ours: the dtype of that arithmetic. torch runs it in bf16, which tensor cores want;
a CPU's batched bf16 matmuls at these small shapes run far slower than its fp32 ones
(benchmarks/train.py), so `llm train` runs it in fp32 off CUDA: more precise, not less.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim._muon import _adjust_lr

from llm.config import TrainParams
from llm.device import Device
from llm.model import GPT


def orthogonalize(updates: list[Tensor], coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype = torch.bfloat16) -> list[Tensor]:
    """torch.optim.Muon's quintic Newton-Schulz iteration (`_zeropower_via_newtonschulz`, in bf16
    unless `dtype` says otherwise), for a list of matrices: the ones of the same shape (tall ones
    transposed to wide first, as torch does) go through it together, stacked."""
    a, b, c = coefficients
    out: dict[int, Tensor] = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for i, u in enumerate(updates):
        rows, cols = u.shape
        groups.setdefault((min(rows, cols), max(rows, cols)), []).append(i)
    for members in groups.values():
        tall = [updates[i].size(0) > updates[i].size(1) for i in members]
        x = torch.stack([updates[i].mT if t else updates[i] for i, t in zip(members, tall)]).to(dtype)
        x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm at most 1
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for j, (i, t) in enumerate(zip(members, tall)):
            out[i] = x[j].mT if t else x[j]
    return [out[i] for i in range(len(updates))]


class GroupedMuon(torch.optim.Muon):
    """torch.optim.Muon whose step orthogonalizes same-shaped matrices together, in `ns_dtype`
    (see above)."""

    def __init__(self, params: Any, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momenta: list[Tensor] = []
            self._init_group(group, params, grads, momenta)
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            torch._foreach_lerp_(momenta, grads, 1 - momentum)
            updates = [g.lerp(m, momentum) for g, m in zip(grads, momenta)] if group["nesterov"] else momenta
            updates = orthogonalize(updates, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for p, u in zip(params, updates):
                p.add_(u, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


class Optimizers:
    """One optimizer or several (Muon for the blocks' matrices, AdamW for the rest) behind one
    interface: step, zero_grad, param_groups (each with its peak `base_lr`) and a state dict."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr(self, factor: float) -> None:
        """Every group at `factor` times its peak (the schedule's shape, shared)."""
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizer(model: GPT, tp: TrainParams, device: Device) -> Optimizers:
    """AdamW with decay for matrices and embeddings, none for biases and gains; with
    optimizer: muon, Muon takes the blocks' 2-D matrices (its updates scaled to AdamW's RMS, so
    learning rates compare)."""
    adamw = dict(betas=(tp.beta1, tp.beta2), fused=device.type == "cuda")
    if tp.optimizer == "adamw":
        groups = [{**g, "base_lr": tp.learning_rate} for g in model.optimizer_groups(tp.weight_decay)]
        return Optimizers(adamw=torch.optim.AdamW(groups, lr=tp.learning_rate, **adamw))
    hidden = model.hidden_matrices()
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": tp.weight_decay,
               "base_lr": tp.learning_rate},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "base_lr": tp.learning_rate}]
    muon = GroupedMuon([{"params": hidden, "base_lr": tp.muon_learning_rate}], lr=tp.muon_learning_rate,
                       weight_decay=tp.weight_decay, momentum=tp.muon_momentum, nesterov=True,
                       adjust_lr_fn="match_rms_adamw",
                       ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    return Optimizers(adamw=torch.optim.AdamW(groups, lr=tp.learning_rate, **adamw), muon=muon)
