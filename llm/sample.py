"""Text generation: temperature, top-k and top-p sampling with a KV cache.

    llm sample --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1

Without --prompt it runs interactively: one prompt per line, an empty line or Ctrl-D ends it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from llm.config import SampleParams
from llm.errors import UserError
from llm.model import GPT, KVCache


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top_k most likely tokens and the smallest set whose probability reaches top_p;
    the rest get -inf. logits: (vocab,)."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is full
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def pick(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator) -> int:
    if sp.temperature == 0:
        return int(torch.argmax(logits))
    logits = filter_logits(logits.float() / sp.temperature, sp.top_k, sp.top_p)
    return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: GPT, prompt: list[int], sp: SamplingParams, eos_id: int | None = None, use_cache: bool = True
) -> list[int]:
    """New token ids after `prompt` (not including it); stops at eos (not included) or
    max_new_tokens. The same seed gives the same tokens, with or without the cache."""
    return generate_many(model, prompt, [sp], eos_id, use_cache)[0]


@torch.no_grad()
def generate_many(
    model: GPT, prompt: list[int], sps: list[SamplingParams], eos_id: int | None = None, use_cache: bool = True
) -> list[list[int]]:
    """`generate` for several sampling settings of one prompt at once: one forward pass a token
    for all of them (the report's samples), each row drawing from its own seeded generator."""
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    generators = [torch.Generator().manual_seed(sp.seed) for sp in sps]
    start = list(prompt) or ([eos_id] if eos_id is not None and eos_id >= 0 else [0])
    tokens = [list(start) for _ in sps]  # every row grows by one token a step, finished or not
    past: KVCache | None = None
    out: list[list[int]] = [[] for _ in sps]
    done = [sp.max_new_tokens <= 0 for sp in sps]
    for _ in range(max((sp.max_new_tokens for sp in sps), default=0)):
        if all(done):
            break
        if use_cache and past is not None and len(tokens[0]) <= block:
            logits, past = model.forward_cached(torch.tensor([row[-1:] for row in tokens], device=device), past)
        else:
            # No cache yet, or the context outgrew the block: recompute on the last block tokens.
            logits, past = model.forward_cached(torch.tensor([row[-block:] for row in tokens], device=device))
            if len(tokens[0]) >= block:
                past = None  # absolute positions: a cropped window cannot reuse the old cache
        for i, sp in enumerate(sps):
            if done[i]:
                tokens[i].append(tokens[i][-1])  # a finished row keeps pace with the others
                continue
            nxt = pick(logits[i, -1], sp, generators[i])
            tokens[i].append(nxt)
            if eos_id is not None and nxt == eos_id:
                done[i] = True
            else:
                out[i].append(nxt)
                done[i] = len(out[i]) >= sp.max_new_tokens
    return out


def complete(model: GPT, tokenizer, text: str, sp: SamplingParams) -> str:
    return complete_many(model, tokenizer, text, [sp])[0]


def complete_many(model: GPT, tokenizer, text: str, sps: list[SamplingParams]) -> list[str]:
    return [tokenizer.decode(ids) for ids in generate_many(model, tokenizer.encode(text), sps, tokenizer.eos_id)]


def sample_flags(defaults: SampleParams, flags: dict) -> dict:
    """The sampling settings: each flag given over params.yaml's sample group, checked against that
    group's ranges; a bad flag is one line naming it and the value params.yaml gives."""
    given = {name: flags[name] for name in SampleParams.model_fields if flags.get(name) is not None}
    try:
        return SampleParams.model_validate({**defaults.model_dump(), **given}).model_dump()
    except ValidationError as e:
        problems = [f"--{(name := err['loc'][0]).replace('_', '-')} {given[name]}: {err['msg'].lower()} "
                    f"(params.yaml's sample.{name} is {getattr(defaults, name)})" for err in e.errors()]
        raise UserError(f"llm sample: {'; '.join(problems)}") from None


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    from llm.artifacts import load_final
    from llm.config import load_params
    from llm.device import pick_device
    from llm.layout import Layout

    ap = argparse.ArgumentParser(prog="llm sample", description="Generate text with the trained model.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prompt", default=None, help="text to continue; omit for interactive mode")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--model", default=None, help="model directory (default models/final)")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    sp = SamplingParams(**sample_flags(params.sample, vars(args)))
    root = Path(args.params).resolve().parent
    device = pick_device(params.train.device)
    model, tok, _ = load_final(args.model or Layout(root).final, device.torch_device)
    if args.prompt is not None:
        prompt = args.prompt.replace("\\n", "\n")  # a literal \n on the command line is a newline
        print(prompt + complete(model, tok, prompt, sp))
        return 0
    print("Interactive sampling: type a prompt and press Enter; an empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            break
        if not prompt:
            break
        print(prompt + complete(model, tok, prompt, sp), flush=True)
    return 0
