"""Make presets/gpu.yaml from params.yaml: the same file, comments included, with the GPU values
in tokenizer/model/train/evaluate. Run it after changing params.yaml (a test checks they agree):

    python presets/make_gpu_preset.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GPU = {
    "tokenizer": {"vocab_size": "50304"},
    "model": {"n_layer": "12", "n_head": "12", "n_embd": "768", "block_size": "1024", "dropout": "0.0"},
    "train": {
        "batch_size": "32", "tokens_per_step": "524288", "max_steps": "5000", "time_budget_minutes": "0",
        "learning_rate": "0.0006", "warmup_steps": "200", "eval_interval": "250", "eval_tokens": "1048576",
        "checkpoint_interval": "500", "compile": "true", "muon_learning_rate": "0.0018",
    },
    "evaluate": {"batch_size": "32"},
    "ladder": {"max_steps": "2000", "warmup_steps": "100"},
}
# The scaling ladder on a GPU: GPT-2 small and three narrower, shallower rungs (1 B tokens each).
GPU_RUNGS = {
    "xs": "{n_layer: 4, n_head: 4, n_embd: 256}",
    "s": "{n_layer: 6, n_head: 6, n_embd: 384}",
    "m": "{n_layer: 8, n_head: 8, n_embd: 512}",
    "l": "{n_layer: 12, n_head: 12, n_embd: 768}",
}

HEADER = """\
# GPU preset: GPT-2 small (12 layers, 12 heads, width 768, context 1024, vocab 50304:
# 124 M parameters), bf16 autocast, Muon + fused AdamW, flash attention, torch.compile.
# Use it with a corpus of a few hundred MB or more (a 50 k vocabulary needs the text):
#   cp presets/gpu.yaml params.yaml && dvc repro
# Several GPUs: torchrun --standalone --nproc_per_node 8 -m llm.cli train
# (tokens_per_step stays 0.5 M: gradient accumulation shrinks as processes are added).
# Made from params.yaml by presets/make_gpu_preset.py.
"""


def render(src: str) -> str:
    out, group = [], None
    for line in src.splitlines():
        if line.startswith("#") and group is None:
            continue  # params.yaml's own header
        if re.match(r"^# (The CPU preset|presets/gpu.yaml)", line):
            continue
        top = re.match(r"^(\w+):", line)
        if top:
            group = top.group(1)
        rung = re.match(r"^    (\w+): \{.*\}$", line)
        if rung and group == "ladder" and rung.group(1) in GPU_RUNGS:
            line = f"    {rung.group(1)}: {GPU_RUNGS[rung.group(1)]}"
        m = re.match(r"^  (\w+): (\S+)( +#.*)?$", line)
        if m and m.group(1) in GPU.get(group or "", {}):
            key, old, comment = m.group(1), m.group(2), m.group(3) or ""
            new = GPU[group][key]
            if comment:  # keep the comment's column
                comment = " " * max(1, len(comment) - len(comment.lstrip()) + len(old) - len(new)) + comment.lstrip()
            line = f"  {key}: {new}{comment}"
        out.append(line)
    return HEADER + "\n".join(out) + "\n"


if __name__ == "__main__":
    (ROOT / "presets" / "gpu.yaml").write_text(render((ROOT / "params.yaml").read_text()))
