"""A GPT decoder, read top to bottom in the order it runs: config, attention, MLP, block, model.

Token + learned position embeddings, pre-LayerNorm blocks (attention and a 4x GELU MLP, each
added to the residual stream), a final LayerNorm, and an LM head tied to the token embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)


KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True  # scaled at init, see GPT._init_weights
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
        if past is not None:  # generation: attend to the cached keys and values too
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        S = k.size(2)  # keys: past + new
        weights = None
        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa and not need_weights:
            # Query i (at absolute position S-T+i) may see keys 0..S-T+i. With no past, that
            # is the plain causal mask; with a past, T == 1 in generation and it sees everything.
            if past is None or T == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=past is None)
            else:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
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
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
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
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: the output projection is the input embedding. Fewer parameters, and
        # rare tokens learn from both ends.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; projections into the residual stream scaled by
        # 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
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
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        present: KVCache = []
        weights: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, kv, w = block(x, None if past is None else past[i], need_weights)
            present.append(kv)
            if w is not None:
                weights.append(w)
        return self.ln_f(x), present, weights

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, if targets are given, the mean cross-entropy."""
        x, _, _ = self._trunk(idx)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss

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
        """Parameters; the position embedding is left out by default (it costs no FLOPs), the
        token embedding counts once, as the tied LM head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N for the weights
        plus 12 * layers * width * context for attention scores and values."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices (weights of Linear and Embedding); not biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
