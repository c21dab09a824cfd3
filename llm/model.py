"""A GPT decoder, read top to bottom in the order it runs: config, positions, attention, MLP,
block, model.

Pre-norm blocks (attention and an MLP, each added to the residual stream), a final norm, and an
LM head tied to the token embedding. The recipe is a set of switches, each a library call where
torch has one, and each expressed exactly by a Hugging Face architecture (llm/export.py):

- position: `learned` (GPT-2's table) or `rope` (rotary, the rotate-half convention of Llama);
- norm: `layernorm` or `rmsnorm` (nn.RMSNorm);
- qk_norm: RMSNorm of each head's queries and keys before the rotation (Qwen3);
- mlp: `gelu` (4x, GPT-2), `relu2` (4x ReLU squared, the speedrun's) or `swiglu` (gated SiLU,
  Llama's, with 8/3 x width so the parameter count stays that of a 4x MLP);
- zero_init: projections into the residual stream start at zero, so every block starts as
  the identity and the model as a bigram.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from llm.config import ModelParams

NORM_EPS = 1e-6


@dataclass(frozen=True)
class GPTConfig:
    """ModelParams (llm/config.py, where each field is documented and validated) plus the
    tokenizer's vocabulary size. No defaults of its own: a model is built from params
    (`from_params`) or from the config saved beside its weights."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool
    position: Literal["learned", "rope"]
    norm: Literal["layernorm", "rmsnorm"]
    qk_norm: bool
    mlp: Literal["gelu", "relu2", "swiglu"]
    zero_init: bool
    rope_theta: float
    tie_embeddings: bool = True  # a saved config without the field is a tied model

    @classmethod
    def from_params(cls, model: ModelParams, vocab_size: int) -> GPTConfig:
        return cls(vocab_size=vocab_size, **model.model_dump())

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """4x width; for the gated MLP 2/3 of that (three matrices instead of two), rounded up to
        a multiple of 8."""
        if self.mlp == "swiglu":
            return 8 * math.ceil(8 * self.n_embd / 3 / 8)
        return 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)


KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def make_norm(cfg: GPTConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=NORM_EPS)
    return nn.LayerNorm(dim, bias=cfg.bias)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding: each pair (i, i + d/2) of a head's channels is turned by an
    angle proportional to the position. Attention scores then depend on relative positions."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (block, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (B, heads, T, head_dim) at positions start..start+T-1."""
        T = x.size(2)
        cos, sin = self.cos[start : start + T].to(x.dtype), self.sin[start : start + T].to(x.dtype)
        return x * cos + rotate_half(x) * sin


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, mask: torch.Tensor | None,
           dropout: float) -> torch.Tensor:
    """F.scaled_dot_product_attention. Under bf16 autocast on a CPU it runs in fp32: torch's CPU
    flash-attention backward is 3-4x slower in bf16 than in fp32 (benchmarks/attention.py)."""
    if (q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled (or zeroed) at init, see GPT._init_weights
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=NORM_EPS) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=NORM_EPS) if cfg.qk_norm else None
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        # The explicit path (masked softmax) is the readable reference; SDPA is the fast path
        # (flash / memory-efficient kernels where the device has them). Tests hold them equal.
        self.use_sdpa = True

    def forward(
        self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        start = 0 if past is None else past[0].size(2)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if past is not None:  # generation: attend to the cached keys and values too
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        S = k.size(2)  # keys: past + new
        weights = None
        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa and not need_weights:
            # Query i (at absolute position S-T+i) may see keys 0..S-T+i. With no past, that
            # is the plain causal mask; with a past, T == 1 in generation and it sees everything.
            mask = (None if past is None or T == 1
                    else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T))
            y = attend(q, k, v, past is None, mask, dropout)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            weights = att
            y = F.dropout(att, dropout, self.training) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v), weights


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.mlp_hidden
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.fc(x)
        elif self.kind == "relu2":
            h = F.relu(self.fc(x)).square()
        else:
            h = F.gelu(self.fc(x))
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, past=None, need_weights=False):
        a, present, weights = self.attn(self.ln1(x), past, need_weights)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, present, weights


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: the output projection is the input embedding. Fewer parameters, and
        # rare tokens learn from both ends.
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        if not cfg.tie_embeddings and cfg.zero_init:
            nn.init.zeros_(self.lm_head.weight)  # uniform logits at the start, as modded-nanogpt's head

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections into the residual stream scaled by
        # 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth, or zero
        # (zero_init): each block starts as the identity and learns what to add.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual", False):
                std = 0.0 if self.config.zero_init else 0.02 / math.sqrt(2 * self.config.n_layer)
            if std:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            else:
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention(self, sdpa: bool) -> None:
        """True: F.scaled_dot_product_attention; False: the explicit masked-softmax reference."""
        for block in self.blocks:
            block.attn.use_sdpa = sdpa

    def _trunk(
        self, idx: torch.Tensor, past: KVCache | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, KVCache, list[torch.Tensor]]:
        """The final hidden states (B, T, C), the KV cache after them, and per-layer attention
        weights when need_weights."""
        B, T = idx.shape
        start = 0 if past is None else past[0][0].size(2)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        present: KVCache = []
        weights: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, kv, w = block(x, None if past is None else past[i], need_weights)
            present.append(kv)
            if w is not None:
                weights.append(w)
        return self.ln_f(x), present, weights

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The logits (B, T, vocab); given targets, only the mean cross-entropy: training keeps no
        logits alive beyond what the loss's backward needs (B x T x vocab is gigabytes on a GPU)."""
        x, _, _ = self._trunk(idx)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

    def forward_cached(self, idx: torch.Tensor, past: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Generation: logits of the new tokens idx, given the cache of the tokens before them,
        and the cache including them."""
        x, present, _ = self._trunk(idx, past)
        return self.lm_head(x), present

    def attention_weights(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the attention weights (B, heads, T, T), through the explicit path."""
        _, _, weights = self._trunk(idx, need_weights=True)
        return weights

    # -- accounting
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; by default without the tables that cost no FLOPs: the position table, and
        the token embedding where the head is its own (tied, it counts once, as the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N for the weights
        plus 12 * layers * width * context for attention scores and values."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (weights of Linear and Embedding); not biases and norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the blocks: what Muon orthogonalizes. Embeddings, the (tied)
        head, biases and gains stay with AdamW."""
        return [p for block in self.blocks for p in block.parameters() if p.dim() == 2]
