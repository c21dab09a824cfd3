from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llm.config import ModelParams
from llm.model import GPT, GPTConfig, attend
from tests.conftest import GPT2_RECIPE, gpt_config


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = gpt_config(64, **{"block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 32, **GPT2_RECIPE, **kw})
    return GPT(cfg).eval()


RECIPES = {
    "classic": {},
    "modern": {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "bias": False},
    "relu2": {"position": "rope", "norm": "rmsnorm", "mlp": "relu2", "bias": False},
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_changing_a_future_token_never_changes_earlier_logits(recipe):
    model = tiny(**RECIPES[recipe])
    x = torch.randint(0, 64, (2, 20))
    logits = model(x)
    for k in (0, 7, 19):
        y = x.clone()
        y[:, k] = (y[:, k] + 1) % 64
        changed = model(y)
        assert torch.equal(logits[:, :k], changed[:, :k])
        assert not torch.allclose(logits[:, k:], changed[:, k:])


@pytest.mark.parametrize("recipe", RECIPES)
def test_sdpa_equals_the_explicit_masked_softmax_path(recipe):
    model = tiny(**RECIPES[recipe])
    x = torch.randint(0, 64, (3, 32))
    fast = model(x)
    model.set_attention(sdpa=False)
    slow = model(x)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recipe", RECIPES)
def test_sdpa_equals_explicit_with_a_kv_cache_and_several_new_tokens(recipe):
    model = tiny(**RECIPES[recipe])
    x = torch.randint(0, 64, (1, 24))
    _, past = model.forward_cached(x[:, :16])
    fast, _ = model.forward_cached(x[:, 16:], past)
    model.set_attention(sdpa=False)
    slow, _ = model.forward_cached(x[:, 16:], past)
    full = model(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(fast, full[:, 16:], atol=1e-5)


def test_attention_under_cpu_bf16_autocast_runs_in_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attend(q, k, v, True, None, 0.0)
    assert y.dtype == torch.float32  # torch's bf16 flash backward on a CPU is the slow one
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True))
    # Outside autocast, the inputs' dtype is kept.
    assert attend(q, k, v, True, None, 0.0).dtype == torch.bfloat16


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
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05


def test_initial_loss_is_near_uniform():
    model = tiny()
    x = torch.randint(0, 64, (8, 32))
    loss = model(x, torch.randint(0, 64, (8, 32)))
    assert abs(loss.item() - math.log(64)) < 0.1


def test_lm_head_is_tied_and_counted_once():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 32 * 32  # position embedding left out


def test_an_untied_head_is_its_own_zero_started_adamw_matrix_and_costs_the_flops_of_one(tmp_path):
    from safetensors.torch import load_model, save_model

    from llm.config import TrainParams
    from llm.device import pick_device
    from llm.optim import build_optimizer

    tied, untied = (tiny(**RECIPES["modern"], zero_init=True, tie_embeddings=tie) for tie in (True, False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.lm_head.weight.abs().max().item() == 0.0  # zero_init: uniform logits at the start
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + 64 * 32
    assert untied.flops_per_token() == tied.flops_per_token()  # the embedding's lookup costs nothing
    opt = build_optimizer(untied, TrainParams(optimizer="muon"), pick_device("cpu"))
    adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert id(untied.lm_head.weight) in adamw
    with torch.no_grad():
        untied.lm_head.weight.normal_()
    x = torch.randint(0, 64, (2, 16))
    save_model(untied, str(tmp_path / "m.safetensors"))  # as llm/artifacts.py saves and loads a model
    again = GPT(GPTConfig(**untied.config.to_dict()))
    load_model(again, str(tmp_path / "m.safetensors"))
    assert not again.config.tie_embeddings and torch.equal(again.eval()(x), untied.eval()(x))


def test_flops_per_token_formula():
    model = tiny()
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 32 * 32


def test_residual_projections_are_scaled_by_depth():
    torch.manual_seed(0)
    model = GPT(gpt_config(64, n_layer=8, n_head=4, n_embd=256, block_size=16, **GPT2_RECIPE))
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
        ModelParams(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="rope needs an even head size"):
        ModelParams(n_embd=30, n_head=10, position="rope")
    ModelParams(n_embd=30, n_head=10, position="learned")  # an odd head size is fine without rotary


def test_rotary_scores_depend_on_relative_position_only():
    from llm.model import Rotary

    rot = Rotary(gpt_config(8, block_size=64, n_head=1, n_embd=16, position="rope"))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    score = [(rot(q, a) * rot(k, a - 5)).sum().item() for a in (5, 17, 40)]
    assert score[0] == pytest.approx(score[1], abs=1e-4) and score[1] == pytest.approx(score[2], abs=1e-4)
    assert (rot(q, 0) * rot(k, 0)).sum().item() == pytest.approx((q * k).sum().item(), abs=1e-5)  # position 0: no turn


def test_swiglu_keeps_the_parameter_count_of_a_4x_mlp():
    classic, gated = tiny(n_embd=96), tiny(n_embd=96, mlp="swiglu")
    assert gated.config.mlp_hidden == 256 and gated.config.mlp_hidden % 8 == 0
    assert abs(gated.num_params() - classic.num_params()) / classic.num_params() < 0.02


def test_zero_init_makes_every_block_start_as_the_identity():
    model = tiny(zero_init=True, position="rope", norm="rmsnorm")
    x = torch.randn(2, 10, 32)
    for block in model.blocks:
        y, _, _ = block(x)
        assert torch.equal(y, x)
    assert all(not block.attn.proj.weight.any() and not block.mlp.proj.weight.any() for block in model.blocks)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from llm.config import TrainParams
    from llm.device import pick_device
    from llm.optim import build_optimizer

    model = tiny(**RECIPES["modern"])
    opt = build_optimizer(model, TrainParams(optimizer="muon"), pick_device("cpu"))
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert muon == {id(p) for p in model.hidden_matrices()} and not muon & adamw
    assert muon | adamw == {id(p) for p in model.parameters()}
    assert id(model.wte.weight) in adamw  # embedding and tied head: AdamW
    x = torch.randint(0, 64, (4, 16))
    losses = []
    model.train()
    for _ in range(80):
        opt.set_lr(1.0)
        loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
