"""The CUDA path: bf16 autocast, fused AdamW, flash attention, torch.compile. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from llm.device import pick_device
from llm.model import GPT
from tests.conftest import GPT2_RECIPE, gpt_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def model_and_batch():
    torch.manual_seed(0)
    model = GPT(gpt_config(512, block_size=128, n_layer=2, n_head=4, n_embd=128, **GPT2_RECIPE)).cuda()
    x = torch.randint(0, 512, (8, 128), device="cuda")
    return model, x, torch.roll(x, -1, 1)


def test_auto_device_is_cuda_with_bf16():
    device = pick_device("auto")
    assert device.type == "cuda" and device.dtype == torch.bfloat16


def test_bf16_autocast_trains_close_to_fp32():
    model, x, y = model_and_batch()
    ref = model(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        loss = model(x, y)
    assert logits.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) < 0.05
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_flash_sdpa_equals_explicit_attention_in_bf16():
    model, x, _ = model_and_batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = model(x)
        model.set_attention(sdpa=False)
        slow = model(x)
    assert torch.allclose(fast.float(), slow.float(), atol=0.1)


def test_compiled_model_matches_eager():
    model, x, y = model_and_batch()
    eager = model(x, y)
    compiled = torch.compile(model)
    loss = compiled(x, y)
    assert abs(loss.item() - eager.item()) < 1e-3
