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


def _gpt2(model: GPT, tok: Tokenizer) -> tuple[object, dict[str, torch.Tensor]]:
    from transformers import GPT2Config

    cfg = model.config
    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                    n_head=cfg.n_head, n_inner=cfg.mlp_hidden, activation_function=cfg.mlp, resid_pdrop=0.0,
                    embd_pdrop=0.0,
                    attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True, **_ids(tok))
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
    return hf, out


def _llama_family(model: GPT, tok: Tokenizer, arch: str) -> tuple[object, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, Qwen3Config

    cfg = model.config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                  head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=NORM_EPS,
                  hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=cfg.bias,
                  attention_dropout=0.0, tie_word_embeddings=True, **_ids(tok))
    hf = Qwen3Config(**common) if arch == "qwen3" else LlamaConfig(**common, mlp_bias=cfg.bias)
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
    return hf, out


def _ids(tok: Tokenizer) -> dict[str, int | None]:
    def known(i: int) -> int | None:
        return i if i >= 0 else None

    return {"bos_token_id": known(tok.bos_id), "eos_token_id": known(tok.eos_id), "pad_token_id": known(tok.pad_id)}


def hf_tokenizer(tok: Tokenizer):
    """The sentencepiece model as a `tokenizers` BPE wrapped for transformers: whitespace as
    `▁`, digits one by one, newline an atomic piece, unknown bytes as <0xNN> pieces."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    sp = tok.sp
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    special = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    atomic = [i for i, p in enumerate(pieces) if p == "\n"]  # the user-defined piece of llm/tokenizer.py
    skip = {pieces[i] for i in special + atomic} | {p for i, p in enumerate(pieces) if sp.is_byte(i)}
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, [(p, sp.get_score(i)) for i, p in enumerate(pieces)], skip_tokens=skip)
    bpe = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=pieces[sp.unk_id()],
                                 fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", behavior="merged_with_next"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bpe.add_tokens([AddedToken(pieces[i], normalized=False, special=False) for i in atomic])
    bpe.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])

    def name(i: int) -> str | None:
        return pieces[i] if i >= 0 else None

    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token=name(sp.unk_id()), bos_token=name(tok.bos_id),
                                   eos_token=name(tok.eos_id), pad_token=name(tok.pad_id), add_bos_token=False,
                                   add_eos_token=False, clean_up_tokenization_spaces=False)


def export(params: Params, layout: Layout) -> dict:
    """models/final as a Hugging Face model directory (models/hf), logged to the MLflow run."""
    from transformers import AutoModelForCausalLM

    model, tok, _ = load_final(layout.final)
    arch = architecture(model.config)
    hf_config, state = _gpt2(model, tok) if arch == "gpt2" else _llama_family(model, tok, arch)
    hf_model = AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = hf_model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"export: weights do not map onto {arch}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    hf_model.tie_weights()
    with atomic_dir(layout.hf) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer(tok).save_pretrained(tmp)
    files = sorted(p.name for p in layout.hf.iterdir())
    log.info("export: %s model in %s (%s)", arch, layout.hf, ", ".join(files))
    with atomic_dir(layout.gguf) as tmp:
        gguf = export_gguf(params, tmp, arch, model.config, tok, state, training_data_hashes(layout.root))
        write_json(tmp / GGUF_MANIFEST, gguf)
    if params.tracking.enabled:
        _track(params, layout)
    return {"architecture": arch, "path": str(layout.hf), "files": files, "gguf": gguf}


def _track(params: Params, layout: Layout) -> None:
    import mlflow

    from llm.tracking import resume_run

    with resume_run(layout.metrics("train"), layout.root, params) as run:
        mlflow.log_artifacts(str(layout.hf), artifact_path="hf")
        mlflow.log_artifacts(str(layout.gguf), artifact_path="gguf")
        log.info("export: logged to MLflow run %s", run.info.run_id)

