"""Time and memory of `llm evaluate` as the val split grows past evaluate.max_tokens.

    python benchmarks/evaluate.py                      # the default corpus's val split, then 1x and 10x the cap
    python benchmarks/evaluate.py --scales 1,10,30
    python benchmarks/evaluate.py --max-tokens 500000  # another cap (written into the project's params)

A project with the default params but a short training (--train-steps, uncompiled) is built
once in the work directory by `llm ingest`, `clean`, `tokenizer`, `shards` and `train`: the
model has the default shape, which is what evaluation's speed depends on, not its quality.
The val splits are made of unique documents (lines of the default corpus resampled with a seed
into 2-20 KB documents, as benchmarks/data.py makes them), tokenized with the project's
tokenizer and written as val shards by llm.shards' writer, beside the project's own train
shards. Each split is evaluated by `llm evaluate` in a subprocess, as `dvc repro` runs it (with
MLflow tracking on, as by default); the peak resident memory of its process tree is sampled
every 50 ms. Prints a table with the ratios to the 1x run and writes benchmarks/out/evaluate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from data import corpus_lines, peak_tree_rss  # noqa: E402
from llm.common import table  # noqa: E402
from llm.config import EvaluateParams  # noqa: E402
from llm.io import read_json, write_json  # noqa: E402
from llm.shards import _Split, read_manifest, shard_schema  # noqa: E402
from llm.tokenizer import Tokenizer  # noqa: E402

BUILD = ("ingest", "clean", "tokenizer", "shards", "train")
ENV = {**os.environ, "LLM_PROGRESS": "0"}


def llm(stage: str, cwd: Path) -> tuple[float, int]:
    """Run `llm <stage>` in cwd; returns (seconds, peak RSS of its process tree in bytes)."""
    with open(cwd / f"{stage}.log", "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "llm"), stage], cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, env=ENV)
        tree, _, seconds = peak_tree_rss(proc)
    if proc.returncode != 0:
        sys.exit(f"llm {stage} failed, see {cwd / f'{stage}.log'}")
    return seconds, tree


def build_project(base: Path, train_steps: int, max_tokens: int | None) -> None:
    """The default params with a short uncompiled training, built once and reused while they
    match; evaluate.max_tokens is set afterwards and needs no rebuild."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(max_steps=train_steps, compile=False)
    built = yaml.safe_dump(params, sort_keys=False)
    marker = base / "built.yaml"
    if not (marker.is_file() and marker.read_text() == built):
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        (base / "params.yaml").write_text(built)
        for stage in BUILD:
            seconds, _ = llm(stage, base)
            print(f"  built {stage:<10} {seconds:6.1f} s", flush=True)
        (base / "data" / "shards").rename(base / "data" / "shards-default")
        marker.write_text(built)
    params["evaluate"] = {} if max_tokens is None else {"max_tokens": max_tokens}
    (base / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def documents(seed: int):
    """Unique documents: lines of the default corpus resampled into 2-20 KB texts."""
    lines = corpus_lines()
    rng = random.Random(seed)
    while True:
        size, body, n = rng.randint(2_000, 20_000), [], 0
        while n < size:
            line = lines[rng.randrange(len(lines))]
            body.append(line)
            n += len(line) + 1
        yield "\n".join(body)


def generate_val(dest: Path, tok: Tokenizer, n_tokens: int, seed: int, default_shards: Path) -> None:
    """Val shards of unique documents, at least n_tokens in all, beside the project's train shards."""
    marker = dest / "generated.json"
    key = {"tokens": n_tokens, "seed": seed, "tokenizer": tok.sha256()}
    if marker.is_file() and read_json(marker) == key:
        return
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "val").mkdir(parents=True)
    t0 = time.perf_counter()
    template = read_manifest(default_shards)
    dtype = np.dtype(template["dtype"])
    writer = _Split(dest / "val", shard_schema(dtype), template["params"]["shards"]["shard_tokens"])
    eos = [tok.eos_id] if template["params"]["shards"]["append_eos"] and tok.eos_id >= 0 else []
    texts = documents(seed)
    total = index = 0
    while total < n_tokens:
        batch = [next(texts) for _ in range(256)]
        for text, ids in zip(batch, tok.encode_batch(batch)):
            if total >= n_tokens:
                break
            ids = np.asarray(ids + eos, dtype)
            writer.add([f"bench-{seed}-{index}"], ["bench"], [len(text.encode("utf-8"))], [ids])
            total += len(ids)
            index += 1
    splits = {"train": template["splits"]["train"], "val": writer.finish()}
    write_json(dest / "manifest.json", {**template, "splits": splits})
    (dest / "train").symlink_to((default_shards / "train").resolve())
    write_json(marker, key)
    print(f"  generated {index:,} val documents, {total:,} tokens in {time.perf_counter() - t0:.1f} s", flush=True)


def evaluate_on(base: Path, shards: Path, label: str) -> dict:
    link = base / "data" / "shards"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(shards.resolve())
    seconds, peak = llm("evaluate", base)
    shutil.copy(base / "evaluate.log", base.parent / f"evaluate-{label}.log")
    result = read_json(base / "metrics" / "eval.json")
    covered, split = result["covered"], result["val_split"]
    return {"split": label, "val_tokens": split["tokens"], "val_bytes": split["bytes"],
            "covered_tokens": covered["tokens"], "covered_documents": covered["documents"], "capped": covered["capped"],
            "seconds": round(seconds, 2), "peak_rss_tree_mb": round(peak / 2**20), "val_bpb": result["val_bpb"],
            "baseline_bpb": result["baseline_bpb"]}


def print_table(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["split"] == "1x"), None)
    print(table(["val split", "val tokens", "covered tokens", "capped", "seconds", "x 1x", "peak RSS MB", "x 1x",
                 "val_bpb"],
                [[r["split"], f"{r['val_tokens']:,}", f"{r['covered_tokens']:,}", "yes" if r["capped"] else "no",
                  f"{r['seconds']:.1f}", f"{r['seconds'] / ref['seconds']:.2f}" if ref else "", r["peak_rss_tree_mb"],
                  f"{r['peak_rss_tree_mb'] / ref['peak_rss_tree_mb']:.2f}" if ref else "", f"{r['val_bpb']:.4f}"]
                 for r in rows], align="lrrrrrrrr"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,10", help="val split sizes as multiples of the cap (default 1,10)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help=f"evaluate.max_tokens (default: the code default, {EvaluateParams().max_tokens:,})")
    ap.add_argument("--train-steps", type=int, default=50, help="steps of the model's short training (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch directory (default benchmarks/out/evaluate)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/out/evaluate.json)")
    args = ap.parse_args()
    work = Path(args.work or REPO / "benchmarks" / "out" / "evaluate").resolve()
    cap = args.max_tokens if args.max_tokens is not None else EvaluateParams().max_tokens
    if cap <= 0:
        ap.error("the cap is 0 (the whole split): pass --max-tokens")
    print(f"project with the default model, {args.train_steps} training steps", flush=True)
    build_project(work / "base", args.train_steps, args.max_tokens)
    default_shards = work / "base" / "data" / "shards-default"
    tok = Tokenizer.load(work / "base" / "data" / "tokenizer")
    rows = [evaluate_on(work / "base", default_shards, "default")]
    print(f"  default   {rows[-1]['seconds']:6.1f} s", flush=True)
    for scale in (float(s) for s in args.scales.split(",")):
        label = f"{scale:g}x"
        shards = work / f"val-{label}"
        generate_val(shards, tok, int(scale * cap), args.seed, default_shards)
        rows.append(evaluate_on(work / "base", shards, label))
        print(f"  {label:<9} {rows[-1]['seconds']:6.1f} s", flush=True)
    print()
    print_table(rows)
    out = Path(args.out or REPO / "benchmarks" / "out" / "evaluate.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "max_tokens": cap, "train_steps": args.train_steps,
                               "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
