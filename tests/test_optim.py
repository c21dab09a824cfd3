from __future__ import annotations

import copy

import torch
from torch.optim._muon import _zeropower_via_newtonschulz

from llm.model import GPT
from llm.optim import GroupedMuon, orthogonalize
from tests.conftest import gpt_config

MODERN = {"position": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "zero_init": False, "bias": False}
NS = ((3.4445, -4.7750, 2.0315), 5, 1e-7)  # torch.optim.Muon's defaults


def test_orthogonalize_equals_torch_newton_schulz_matrix_by_matrix():
    torch.manual_seed(0)
    # Wide, tall, square; two of a shape and a tall one that groups with a wide one.
    shapes = [(32, 96), (32, 96), (96, 32), (48, 48), (80, 16)]
    updates = [torch.randn(s) for s in shapes]
    ours = orthogonalize(updates, *NS)
    for u, o in zip(updates, ours):
        assert o.shape == u.shape
        torch.testing.assert_close(o.float(), _zeropower_via_newtonschulz(u, *NS).float(), rtol=0, atol=1e-2)
    # ... and is an orthogonalization: singular values near 1 (Newton-Schulz lands in about 0.5-1.5).
    s = torch.linalg.svdvals(ours[0].float())
    assert s.min() > 0.4 and s.max() < 1.6


def test_grouped_muon_trains_a_model_as_torch_muon_does():
    torch.manual_seed(0)
    model = GPT(gpt_config(64, block_size=16, n_layer=2, n_head=2, n_embd=32, **MODERN))
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    ours, theirs = GroupedMuon(model.hidden_matrices(), **kw), torch.optim.Muon(twin.hidden_matrices(), **kw)
    x = torch.randint(0, 64, (4, 16))
    for _ in range(5):
        for m, opt in ((model, ours), (twin, theirs)):
            loss = m(x, torch.roll(x, -1, dims=1))
            loss.backward()
            opt.step()
            opt.zero_grad()
    for p, q, p0 in zip(model.hidden_matrices(), twin.hidden_matrices(), start.hidden_matrices()):
        assert (p - p0).abs().max() > 1e-3  # it moved ...
        # ... and as torch's Muon moved it: bf16 rounding in another matmul order would be ~1e-6.
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    # Same state format: our state dict loads into torch's Muon and the momenta are equal.
    theirs.load_state_dict(ours.state_dict())
    for p, q in zip(model.hidden_matrices(), twin.hidden_matrices()):
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], rtol=0, atol=0)


def test_grouped_muon_skips_matrices_without_gradients():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(8, 16))
    before = b.detach().clone()
    opt = GroupedMuon([a, b], lr=0.1, weight_decay=0.0)
    a.grad = torch.randn(8, 16)
    opt.step()
    assert torch.equal(b, before) and not torch.equal(a, before)


def test_orthogonalize_in_fp32_is_nearer_the_exact_iteration_than_in_bf16():
    """`llm train` runs Newton-Schulz in fp32 off CUDA: the same iteration, closer to exact."""
    for seed in range(5):
        torch.manual_seed(seed)
        updates = [torch.randn(s) for s in [(24, 72), (24, 72), (72, 24), (40, 40)]]
        exact = orthogonalize([u.double() for u in updates], *NS, dtype=torch.float64)
        fp32 = orthogonalize(updates, *NS, dtype=torch.float32)
        bf16 = orthogonalize(updates, *NS)
        for e, a, b in zip(exact, fp32, bf16):
            assert a.dtype == torch.float32
            err32, err16 = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
            assert err32 < 1e-4 and err32 < err16 / 10, (seed, err32, err16)


def test_llm_train_orthogonalizes_in_bf16_on_cuda_only():
    from llm.config import TrainParams
    from llm.device import Device
    from llm.optim import build_optimizer

    model = GPT(gpt_config(64, block_size=16, n_layer=2, n_head=2, n_embd=32, **MODERN))
    for kind, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
        device = Device(kind, torch.device("cpu"), torch.float32, kind)  # build_optimizer reads .type only
        opt = build_optimizer(model, TrainParams(optimizer="muon"), device)
        assert opt.optimizers["muon"].ns_dtype == dtype, kind
