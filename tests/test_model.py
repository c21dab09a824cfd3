from __future__ import annotations

import math

import pytest
import torch

from llm.model import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(**{"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, **kw})
    return GPT(cfg).eval()


def test_changing_a_future_token_never_changes_earlier_logits():
    model = tiny()
    x = torch.randint(0, 64, (2, 20))
    logits, *_ = model(x)
    for k in (0, 7, 19):
        y = x.clone()
        y[:, k] = (y[:, k] + 1) % 64
        changed, *_ = model(y)
        assert torch.equal(logits[:, :k], changed[:, :k])
        assert not torch.allclose(logits[:, k:], changed[:, k:])


def test_sdpa_equals_the_explicit_masked_softmax_path():
    model = tiny()
    x = torch.randint(0, 64, (3, 32))
    fast, *_ = model(x)
    model.set_attention(sdpa=False)
    slow, *_ = model(x)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)


def test_sdpa_equals_explicit_with_a_kv_cache_and_several_new_tokens():
    model = tiny()
    x = torch.randint(0, 64, (1, 24))
    _, past = model.forward_cached(x[:, :16])
    fast, _ = model.forward_cached(x[:, 16:], past)
    model.set_attention(sdpa=False)
    slow, _ = model.forward_cached(x[:, 16:], past)
    full, _ = model(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(fast, full[:, 16:], atol=1e-5)


def test_attention_weights_are_causal_distributions():
    model = tiny()
    weights = model.attention_weights(torch.randint(0, 64, (1, 10)))
    assert len(weights) == 2 and weights[0].shape == (1, 4, 10, 10)
    for w in weights:
        assert torch.allclose(w.sum(-1), torch.ones(1, 4, 10), atol=1e-6)
        assert torch.count_nonzero(torch.triu(w[0, 0], diagonal=1)) == 0


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny().train()
    x = torch.randint(0, 64, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05


def test_initial_loss_is_near_uniform():
    model = tiny()
    x = torch.randint(0, 64, (8, 32))
    _, loss = model(x, torch.randint(0, 64, (8, 32)))
    assert abs(loss.item() - math.log(64)) < 0.1


def test_lm_head_is_tied_and_counted_once():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 32 * 32  # position embedding left out


def test_flops_per_token_formula():
    model = tiny()
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 32 * 32


def test_residual_projections_are_scaled_by_depth():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=8, n_head=4, n_embd=256, block_size=16))
    plain = model.blocks[0].attn.qkv.weight.std().item()
    scaled = model.blocks[0].attn.proj.weight.std().item()
    assert abs(plain - 0.02) < 0.002
    assert abs(scaled - 0.02 / math.sqrt(16)) < 0.001


def test_decay_groups_split_matrices_from_vectors():
    groups = tiny().optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_too_long_a_sequence_is_refused():
    with pytest.raises(ValueError, match="longer than block_size 32"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_width_must_divide_into_heads():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(vocab_size=10, n_embd=30, n_head=4)
