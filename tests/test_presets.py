from __future__ import annotations

import yaml

from llm.config import load_params
from llm.model import GPT, GPTConfig
from tests.conftest import REPO


def test_gpu_preset_is_gpt2_small():
    params = load_params(REPO / "presets" / "gpu.yaml")
    cfg = GPTConfig(vocab_size=params.tokenizer.vocab_size, **params.model.model_dump())
    n = GPT(cfg).num_params()
    assert 123e6 < n < 125e6
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    assert params.train.compile and params.train.device == "auto"
    assert params.train.tokens_per_step % (params.train.batch_size * cfg.block_size * 8) == 0  # fits 1, 2, 4 or 8 GPUs


def test_gpu_preset_changes_only_the_model_side():
    cpu = yaml.safe_load((REPO / "params.yaml").read_text())
    gpu = yaml.safe_load((REPO / "presets" / "gpu.yaml").read_text())
    assert cpu.keys() == gpu.keys()
    changed = {k for k in cpu if cpu[k] != gpu[k]}
    assert changed == {"tokenizer", "model", "train", "evaluate", "ladder"}
    assert cpu["ladder"]["rungs"].keys() == gpu["ladder"]["rungs"].keys()
    assert gpu["ladder"]["rungs"]["l"] == {k: gpu["model"][k] for k in ("n_layer", "n_head", "n_embd")}  # the top rung is the model


def test_gpu_preset_is_in_sync_with_params_yaml():
    import runpy

    render = runpy.run_path(str(REPO / "presets" / "make_gpu_preset.py"))["render"]
    assert (REPO / "presets" / "gpu.yaml").read_text() == render((REPO / "params.yaml").read_text())
