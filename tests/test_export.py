"""`llm export`: the trained model as a Hugging Face model and tokenizer that transformers loads
offline, with no custom code, and that computes what the project's model computes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llm.artifacts import load_final
from llm.errors import UserError
from llm.evaluate import cover_val
from llm.export import architecture, export
from llm.layout import Layout
from llm.sample import SamplingParams, generate
from llm.split import holdout_of
from llm.tokenizer import units_of
from llm.train import train
from tests.conftest import GPT2_RECIPE, deep_merge, gpt_config, load
from tests.devices import DEVICES, on_device
from tests.test_train import CLASSIC, MODERN, project_from

RECIPES = {
    "gpt2": CLASSIC,
    # Two recipes with a head of their own (model.tie_embeddings: false): lm_head.weight in the export.
    "gpt2-relu2": deep_merge(CLASSIC, {"model": {"mlp": "relu2", "bias": False, "tie_embeddings": False}}),
    "llama": deep_merge(MODERN, {"model": {"qk_norm": False, "bias": True, "tie_embeddings": False}}),
    "qwen3": MODERN,
}
LOGIT_TOL = {"cpu": 1e-4, "cuda": 1e-3}  # max |HF logits - ours|, both in fp32


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_the_exported_model_loads_in_transformers_and_computes_the_same(built, tmp_path: Path, recipe: str,
                                                                         device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, params = project_from(built, tmp_path, **deep_merge(RECIPES[recipe], on_device(device)))
    layout = Layout(root)
    train(params, layout)
    result = export(load(root), layout)
    assert result["architecture"] == recipe.split("-")[0]
    hf = AutoModelForCausalLM.from_pretrained(layout.hf, trust_remote_code=False).to(device).eval()
    tok = AutoTokenizer.from_pretrained(layout.hf, trust_remote_code=False)
    ours, sp, _ = load_final(layout.final, device=device)
    with pytest.raises(UserError, match=r"a Hugging Face model \(llm export's models/hf\): load it with transformers"):
        load_final(layout.hf)  # `llm sample --model models/hf`

    # Logits on val blocks: within LOGIT_TOL in fp32 (training on CUDA turned TF32 on: off again).
    torch.set_float32_matmul_precision("highest")
    docs = cover_val(layout.shards, 4096)
    block = ours.config.block_size
    x = torch.from_numpy(docs.stream[: 4 * block].reshape(4, block)).to(device)
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < LOGIT_TOL[device]

    # The tokenizer: the same ids as sentencepiece on every val document, and the text back.
    clean = Layout(built[0]).clean
    val = [text for _, text, _ in units_of(clean, holdout_of(clean, params.split), "val")]
    assert val
    for text in val:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text

    # Greedy generation: transformers' generate equals `llm sample` at temperature 0.
    prompt = sp.encode("ROMEO:")
    ours_ids = generate(ours, prompt, SamplingParams(max_new_tokens=20, temperature=0.0), sp.eos_id)
    out = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=20, do_sample=False,
                      eos_token_id=sp.eos_id, pad_token_id=sp.pad_id)[0, len(prompt):].tolist()
    if sp.eos_id in out:
        out = out[: out.index(sp.eos_id)]
    if device == "cpu":  # on CUDA a near-tie can flip an argmax between two fp32 computations, both right
        assert out == ours_ids


@pytest.mark.parametrize("options", [{"mlp": "relu2", "position": "rope", "norm": "rmsnorm"},
                                     {"position": "rope", "norm": "layernorm"},
                                     {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True,
                                      "bias": True}])
def test_a_recipe_with_no_exact_hugging_face_architecture_fails_with_one_line(options):
    with pytest.raises(UserError, match="export: no Hugging Face architecture computes this model exactly"):
        architecture(gpt_config(64, **{**GPT2_RECIPE, **options}))


def test_export_is_logged_to_the_training_run(built, tmp_path: Path):
    import mlflow

    from llm.io import read_json

    root, params = project_from(built, tmp_path)
    train(params, Layout(root))
    export(params, Layout(root))
    run_id = read_json(Layout(root).metrics("train"))["mlflow_run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(run_id, "hf")}
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"} <= names
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
