"""The GGUF half of stage `export`: models/gguf/, the model in llama.cpp's file format (llama.cpp,
llama-cpp-python, ollama, LM Studio), written with `gguf`, llama.cpp's own Python library.

- Architecture: llama.cpp's `qwen3` or `llama`, the same ones the Hugging Face export uses, named
  through gguf's own map from Hugging Face tensor names. llama.cpp's `llama` rotates channel pairs
  (2i, 2i+1) where ours (and Hugging Face's) rotate (i, i + d/2): the query and key rows are
  permuted as llama.cpp's converter does. Its `gpt2` computes GELU with the tanh approximation,
  so a GPT-2 recipe gets no GGUF (one line says why; the Hugging Face export still happens).
- Tokenizer: sentencepiece's own representation (`tokenizer.ggml.model = llama`): the pieces,
  their scores and types straight from the sentencepiece model, no space prefix, no BOS added.
  llama.cpp then merges by score as sentencepiece's BPE does (tested on every val document).
- Files: `model-f32.gguf` (the weights as trained), `model-q8_0.gguf` (matrices in llama.cpp's
  8-bit blocks: 8.5 bits per weight instead of 32), `Modelfile` (ollama) and
  `export.json` (what was written, with sizes, or why nothing was).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from llm.config import Params
from llm.errors import UserError
from llm.model import NORM_EPS, GPTConfig
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

F32, Q8_0 = "f32", "q8_0"
TYPES = (F32, Q8_0)
MANIFEST = "export.json"
MODELFILE = "Modelfile"


def file_name(kind: str) -> str:
    return f"model-{kind}.gguf"


def gguf_architecture(hf_arch: str, cfg: GPTConfig) -> str:
    """llama.cpp's architecture for this recipe, or a one-line UserError saying why there is none."""
    if hf_arch in ("llama", "qwen3"):
        return hf_arch
    raise UserError(f"export: no GGUF for model.mlp={cfg.mlp} with position={cfg.position}: llama.cpp's gpt2 computes "
                    "GELU with the tanh approximation (not this model's function); set model.position: rope, "
                    "model.norm: rmsnorm, model.mlp: swiglu for a GGUF (models/hf is written either way)")


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a query or key projection (or its bias) reordered so that llama.cpp's pairwise
    rotation (2i, 2i+1) computes our rotate-half one (i, i + d/2): llama.cpp's converter's permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(arch: str, cfg: GPTConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The Hugging Face export's tensors under llama.cpp's names, as float32 arrays."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN3,
                                     cfg.n_layer)
    out = {}
    for hf_name, t in hf_state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RuntimeError(f"export: gguf has no name for {hf_name} in {arch}")
        t = t.detach().float().cpu()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            t = permute_rotary(t, cfg.n_head)
        out[name] = t.contiguous().numpy()
    return out


def _tokenizer(writer, tok: Tokenizer) -> None:
    """sentencepiece's pieces, scores and types (sentencepiece's type numbers are gguf's)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece.encode("utf-8") for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([int(p.type) for p in proto.pieces])
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    for i, add in ((tok.bos_id, writer.add_bos_token_id), (tok.eos_id, writer.add_eos_token_id),
                   (tok.unk_id, writer.add_unk_token_id), (tok.pad_id, writer.add_pad_token_id)):
        if i >= 0:
            add(i)


def write_gguf(path: Path, arch: str, cfg: GPTConfig, tok: Tokenizer, tensors: dict[str, np.ndarray], kind: str,
               meta: dict[str, str]) -> None:
    """One GGUF file: hyperparameters, metadata, tokenizer, tensors (kind f32, or q8_0 for every
    matrix whose rows are whole 32-value blocks; norms stay f32, as llama.cpp's converter keeps them)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(meta["name"])
    w.add_license(meta["license"])
    w.add_description(meta["description"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if kind == F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, value in meta.items():
        if key.startswith("llm_pipeline."):
            w.add_string(key, value)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(NORM_EPS)
    w.add_vocab_size(cfg.vocab_size)
    _tokenizer(w, tok)
    if kind == Q8_0:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for name, t in tensors.items():
        if kind == Q8_0 and t.ndim == 2 and t.shape[-1] % block == 0:
            w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def modelfile(params: Params, cfg: GPTConfig, gguf_file: str) -> str:
    """ollama's recipe for the model: the GGUF, the prompt passed as it is (a base model has no
    chat template), the context length and the `llm sample` defaults."""
    s = params.sample
    return (f"# ollama create my-model -f Modelfile   (in this folder), then: ollama run my-model \"ROMEO:\"\n"
            f"FROM ./{gguf_file}\n"
            'TEMPLATE """{{ .Prompt }}"""\n'
            f"PARAMETER num_ctx {cfg.block_size}\n"
            f"PARAMETER temperature {s.temperature}\n"
            f"PARAMETER top_k {s.top_k}\n"
            f"PARAMETER top_p {s.top_p}\n")


def export_gguf(params: Params, out: Path, hf_arch: str, cfg: GPTConfig, tok: Tokenizer,
                hf_state: dict[str, torch.Tensor], data_hashes: dict[str, str]) -> dict:
    """Write models/gguf's files into `out` (the caller's temporary directory) and return the
    manifest (also written as export.json). A recipe llama.cpp cannot express gives a manifest
    with the reason and no model files."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        arch = gguf_architecture(hf_arch, cfg)
    except UserError as e:
        log.warning("%s", e)
        return {"architecture": None, "reason": str(e), "files": {}}
    tensors = gguf_tensors(arch, cfg, hf_state)
    n_params = sum(int(t.size) for t in tensors.values())
    meta = {"name": f"llm-pipeline {arch} {n_params / 1e6:.2f}M", "license": params.export.license,
            "description": "A GPT-style language model trained from scratch with llm-pipeline",
            **{f"llm_pipeline.dvc.{k}.md5": v for k, v in sorted(data_hashes.items())}}
    files = {}
    for kind in TYPES:
        write_gguf(out / file_name(kind), arch, cfg, tok, tensors, kind, meta)
        files[file_name(kind)] = (out / file_name(kind)).stat().st_size
    (out / MODELFILE).write_text(modelfile(params, cfg, file_name(Q8_0)), encoding="utf-8")
    files[MODELFILE] = (out / MODELFILE).stat().st_size
    log.info("export: GGUF (%s) %s", arch, ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in files.items()))
    return {"architecture": arch, "reason": None, "files": files, "metadata": meta}
