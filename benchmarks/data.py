"""Throughput and memory of the four data stages on a generated corpus.

    python benchmarks/data.py --sizes 50,200                # MB of generated text per run
    python benchmarks/data.py --sizes 50 --engine ray       # the units as Ray tasks (compute.data_engine)

The corpus is made of unique documents: lines of the default corpus (Shakespeare's plays,
markdown stripped) resampled with a seed into documents of 2-20 KB, written as JSONL files.
Each stage runs as `llm <stage>` in a subprocess, exactly as `dvc repro` runs it; the peak
resident memory of the stage's whole process tree (main process plus workers) is sampled
every 50 ms (with Ray's local cluster, its raylet and workers are in that tree). Prints a table
per size and writes benchmarks/out/data.json (data-ray.json for --engine ray).

With --engine ray and no --ray-address, each stage starts a local Ray cluster of every core, as
`dvc repro` does; its start-up (seconds) is in the stage's time. --ray-address auto uses the
cluster that `ray start --head` runs on this machine instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.corpus.clean import normalize_whitespace, strip_markdown  # noqa: E402
from tests.conftest import plays_dir  # noqa: E402

STAGES = ("ingest", "clean", "tokenizer", "shards")


def corpus_lines() -> list[str]:
    lines: list[str] = []
    for path in sorted(plays_dir().rglob("*.md")):
        text = normalize_whitespace(strip_markdown(path.read_text(encoding="utf-8")))
        lines.extend(line for line in text.split("\n") if line.strip())
    return lines


def generate(dest: Path, megabytes: float, seed: int, file_mb: int = 64) -> int:
    """JSONL files of unique documents; returns the number of documents."""
    dest.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines()
    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    written = docs = index = 0
    out = None
    file_bytes = 0
    while written < target:
        if out is None or file_bytes >= file_mb * 1e6:
            if out:
                out.close()
            out = open(dest / f"part-{index:04d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115 - one file after another
            index += 1
            file_bytes = 0
        size = rng.randint(2_000, 20_000)
        body, n = [], 0
        while n < size:
            line = lines[rng.randrange(len(lines))]
            body.append(line)
            n += len(line) + 1
        text = "\n".join(body)
        record = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        out.write(record)
        file_bytes += len(record)
        written += len(text.encode("utf-8"))
        docs += 1
    if out:
        out.close()
    return docs


def peak_tree_rss(proc: subprocess.Popen, interval: float = 0.05) -> tuple[int, int, float]:
    """Wait for proc; return (peak RSS of the process tree, peak RSS of the main process, seconds)."""
    ps = psutil.Process(proc.pid)
    peak_tree = peak_main = 0
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            main = ps.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(interval)
    proc.wait()
    return peak_tree, peak_main, time.perf_counter() - t0


def run_size(work: Path, megabytes: float, seed: int, llm_bin: str, engine: str, ray_address: str) -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_docs = generate(work / "corpus", megabytes, seed)
    print(f"generated {n_docs} documents ({megabytes:g} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["sources"] = ["corpus/*.jsonl"]
    params["compute"].update(data_engine=engine, ray_address=ray_address)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rows = []
    env = {**os.environ, "LLM_PROGRESS": "0"}
    for stage in STAGES:
        with open(work / f"{stage}.log", "w") as log:
            proc = subprocess.Popen([llm_bin, stage], cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
            tree, main, seconds = peak_tree_rss(proc)
        if proc.returncode != 0:
            sys.exit(f"{stage} failed, see {work / f'{stage}.log'}")
        rows.append(
            {"engine": engine, "size_mb": megabytes, "stage": stage, "seconds": round(seconds, 2), "mb_per_s": round(megabytes / seconds, 2),
             "peak_rss_tree_mb": round(tree / 2**20), "peak_rss_main_mb": round(main / 2**20)}
        )
        print(f"  {stage:<10} {seconds:7.1f} s", flush=True)
    total = sum(r["seconds"] for r in rows)
    rows.append(
        {"engine": engine, "size_mb": megabytes, "stage": "end-to-end", "seconds": round(total, 2), "mb_per_s": round(megabytes / total, 2),
         "peak_rss_tree_mb": max(r["peak_rss_tree_mb"] for r in rows), "peak_rss_main_mb": max(r["peak_rss_main_mb"] for r in rows)}
    )
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'engine':<7} {'size MB':>8} {'stage':<11} {'seconds':>8} {'MB/s':>7} {'peak RSS tree MB':>17} {'peak RSS main MB':>17}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['engine']:<7} {r['size_mb']:>8g} {r['stage']:<11} {r['seconds']:>8.1f} {r['mb_per_s']:>7.2f} "
              f"{r['peak_rss_tree_mb']:>17} {r['peak_rss_main_mb']:>17}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50,200", help="comma-separated corpus sizes in MB (default 50,200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", choices=["local", "ray"], default="local", help="compute.data_engine (default local)")
    ap.add_argument("--ray-address", default="", help='compute.ray_address with --engine ray ("" = a local cluster per stage)')
    ap.add_argument("--work", default=None, help="scratch directory (default benchmarks/out/data[-ray])")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/out/data[-ray].json)")
    args = ap.parse_args()
    suffix = "" if args.engine == "local" else f"-{args.engine}"
    work = Path(args.work or REPO / "benchmarks" / "out" / f"data{suffix}")
    llm_bin = str(Path(sys.executable).parent / "llm")
    rows: list[dict] = []
    for size in [float(s) for s in args.sizes.split(",")]:
        rows += run_size(work / f"{size:g}mb", size, args.seed, llm_bin, args.engine, args.ray_address)
    print()
    print_table(rows)
    out = Path(args.out or REPO / "benchmarks" / "out" / f"data{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "engine": args.engine, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
