"""Stage `export`: models/final -> models/hf/, a Hugging Face model and tokenizer, and
models/gguf/, the same model for llama.cpp (llm/gguf_export.py).

`transformers.AutoModelForCausalLM.from_pretrained("models/hf")` and
`AutoTokenizer.from_pretrained("models/hf")` load it offline with no custom code. Every recipe is
written as the architecture that computes exactly the same function:

| model.position | model.norm | model.mlp     | model.qk_norm | architecture |
| learned        | layernorm  | gelu or relu2 | false         | GPT-2        |
| rope           | rmsnorm    | swiglu        | false         | Llama        |
| rope           | rmsnorm    | swiglu        | true          | Qwen3        |

Any other combination has no exact equivalent and stops with one line. The tokenizer becomes a
`tokenizers` BPE with the sentencepiece model's pieces, merges (in score order) and byte
fallback: the same ids as sentencepiece (tested on the val text).
"""

from __future__ import annotations

import logging

import torch

from llm.artifacts import load_final
from llm.config import Params
from llm.dvclock import training_data_hashes
from llm.errors import UserError
from llm.gguf_export import MANIFEST as GGUF_MANIFEST
from llm.gguf_export import export_gguf
from llm.io import atomic_dir, write_json
from llm.layout import Layout
from llm.model import GPT, NORM_EPS, GPTConfig
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def architecture(cfg: GPTConfig) -> str:
    """The Hugging Face architecture that expresses this recipe exactly, or a one-line error."""
    recipe = f"position={cfg.position}, norm={cfg.norm}, mlp={cfg.mlp}, qk_norm={cfg.qk_norm}, bias={cfg.bias}"
    if cfg.position == "learned" and cfg.norm == "layernorm" and cfg.mlp in ("gelu", "relu2") and not cfg.qk_norm:
        return "gpt2"
    if cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        if not cfg.qk_norm:
            return "llama"
        if not cfg.bias:
            return "qwen3"
    raise UserError(f"export: no Hugging Face architecture computes this model exactly ({recipe}); exportable: "
                    "learned+layernorm+gelu|relu2 (GPT-2), rope+rmsnorm+swiglu (Llama), and with qk_norm and no bias "
                    "(Qwen3)")


def _gpt2(model: GPT, tok: Tokenizer) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = model.config
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
          "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
          "n_inner": cfg.mlp_hidden, "activation_function": cfg.mlp, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
          "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5, **_common(tok, cfg)}
    sd = model.state_dict()

    def linear(name: str) -> dict[str, torch.Tensor]:  # GPT-2's Conv1D stores (in, out)
        w = sd[f"{name}.weight"]
        b = sd.get(f"{name}.bias", torch.zeros(w.shape[0]))
        return {"weight": w.t().contiguous(), "bias": b}

    def norm(name: str) -> dict[str, torch.Tensor]:
        w = sd[f"{name}.weight"]
        return {"weight": w, "bias": sd.get(f"{name}.bias", torch.zeros_like(w))}

    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}
    for i in range(cfg.n_layer):
        parts = {"ln_1": norm(f"blocks.{i}.ln1"), "attn.c_attn": linear(f"blocks.{i}.attn.qkv"),
                 "attn.c_proj": linear(f"blocks.{i}.attn.proj"), "ln_2": norm(f"blocks.{i}.ln2"),
                 "mlp.c_fc": linear(f"blocks.{i}.mlp.fc"), "mlp.c_proj": linear(f"blocks.{i}.mlp.proj")}
        out.update({f"transformer.h.{i}.{k}.{p}": t for k, d in parts.items() for p, t in d.items()})
    out.update({f"transformer.ln_f.{p}": t for p, t in norm("ln_f").items()})
    return hf, out | _head(model)


def _llama_family(model: GPT, tok: Tokenizer, arch: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = model.config
    hf = {"architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"], "model_type": arch,
          "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden,
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
          "head_dim": cfg.head_dim, "max_position_embeddings": cfg.block_size, "rms_norm_eps": NORM_EPS,
          "hidden_act": "silu", "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "attention_bias": cfg.bias, "attention_dropout": 0.0, **_common(tok, cfg),
          **({} if arch == "qwen3" else {"mlp_bias": cfg.bias})}
    sd = model.state_dict()
    C = cfg.n_embd
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}", f"model.layers.{i}"
        for p in ("weight", "bias") if cfg.bias else ("weight",):
            q, k, v = sd[f"{src}.attn.qkv.{p}"].split(C, dim=0)
            out |= {f"{dst}.self_attn.q_proj.{p}": q, f"{dst}.self_attn.k_proj.{p}": k,
                    f"{dst}.self_attn.v_proj.{p}": v,
                    f"{dst}.self_attn.o_proj.{p}": sd[f"{src}.attn.proj.{p}"],
                    f"{dst}.mlp.gate_proj.{p}": sd[f"{src}.mlp.gate.{p}"],
                    f"{dst}.mlp.up_proj.{p}": sd[f"{src}.mlp.fc.{p}"],
                    f"{dst}.mlp.down_proj.{p}": sd[f"{src}.mlp.proj.{p}"]}
        out[f"{dst}.input_layernorm.weight"] = sd[f"{src}.ln1.weight"]
        out[f"{dst}.post_attention_layernorm.weight"] = sd[f"{src}.ln2.weight"]
        if cfg.qk_norm:
            out[f"{dst}.self_attn.q_norm.weight"] = sd[f"{src}.attn.q_norm.weight"]
            out[f"{dst}.self_attn.k_norm.weight"] = sd[f"{src}.attn.k_norm.weight"]
    return hf, out | _head(model)


def _head(model: GPT) -> dict[str, torch.Tensor]:
    """The LM head where it is not the embedding (model.tie_embeddings: false); llama.cpp's
    converter names it `output`."""
    return {} if model.config.tie_embeddings else {"lm_head.weight": model.state_dict()["lm_head.weight"]}


def _ids(tok: Tokenizer) -> dict[str, int | None]:
    def known(i: int) -> int | None:
        return i if i >= 0 else None

    return {"bos_token_id": known(tok.bos_id), "eos_token_id": known(tok.eos_id), "pad_token_id": known(tok.pad_id)}


def _common(tok: Tokenizer, cfg: GPTConfig) -> dict:
    """What every architecture's config.json says beside its shape: fp32, whether the embedding is
    the head, the special ids."""
    return {"dtype": "float32", "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, **_ids(tok)}


def merges_by_score(pieces: list[str], scores: list[float], skip: set[str]) -> list[tuple[str, str]]:
    """The BPE merges that rebuild sentencepiece's pieces, best score first: each piece's splits
    into two known pieces (transformers' convert_slow_tokenizer.generate_merges, as it orders them)."""
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        if piece in skip:
            continue
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab and piece[:i] not in skip and piece[i:] not in skip]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def hf_tokenizer(tok: Tokenizer):
    """The sentencepiece model as a `tokenizers` BPE: whitespace as `▁`, digits one by one,
    newline an atomic piece, unknown bytes as <0xNN> pieces."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    sp = tok.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    atomic = [i for i, p in enumerate(pieces) if p == "\n"]  # the user-defined piece of llm/tokenizer.py
    skip = {pieces[i] for i in special + atomic} | {p for i, p in enumerate(pieces) if sp.is_byte(i)}
    merges = merges_by_score(pieces, [sp.get_score(i) for i in range(len(pieces))], skip)
    bpe = HFTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True,
                                 unk_token=pieces[sp.unk_id()], fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", behavior="merged_with_next"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bpe.add_tokens([AddedToken(pieces[i], normalized=False, special=False) for i in atomic])
    bpe.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    return bpe


def tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json: transformers' fast tokenizer over tokenizer.json, adding no tokens."""
    def name(i: int) -> str | None:
        return tok.sp.id_to_piece(i) if i >= 0 else None

    return {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": name(tok.sp.unk_id()),
            "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}


def export(params: Params, layout: Layout) -> dict:
    """models/final as a Hugging Face model directory (models/hf) and a GGUF (models/gguf), logged
    to the MLflow run. Written with safetensors and tokenizers: transformers is not imported."""
    from safetensors.torch import save_file

    model, tok, _ = load_final(layout.final)
    arch = architecture(model.config)
    hf_config, state = _gpt2(model, tok) if arch == "gpt2" else _llama_family(model, tok, arch)
    with atomic_dir(layout.hf) as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config)
        write_json(tmp / "generation_config.json", _ids(tok))
        hf_tokenizer(tok).save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config(tok))
    files = sorted(p.name for p in layout.hf.iterdir())
    log.info("export: %s model in %s (%s)", arch, layout.hf, ", ".join(files))
    with atomic_dir(layout.gguf) as tmp:
        gguf = export_gguf(params, tmp, arch, model.config, tok, state, training_data_hashes(layout.root))
        write_json(tmp / GGUF_MANIFEST, gguf)
    if params.tracking.enabled:
        _track(params, layout)
    return {"architecture": arch, "path": str(layout.hf), "files": files, "gguf": gguf}


def _track(params: Params, layout: Layout) -> None:
    from llm.stage_log import RunLog, log_to_run

    run_id = log_to_run(RunLog(artifacts=[(str(layout.hf), "hf"), (str(layout.gguf), "gguf")]), params, layout)
    log.info("export: logged to MLflow run %s", run_id)
