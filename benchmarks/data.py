"""Throughput and memory of the four data stages on a generated corpus.

    python benchmarks/data.py --sizes 50,200                # MB of generated text per run
    python benchmarks/data.py --sizes 50 --engine ray       # the units as Ray tasks (compute.data_engine)
    python benchmarks/data.py --sizes 250,1000 --engine local,ray   # the 1 GB targets, both engines in one run

The corpus is made of unique documents: lines of the default corpus (Shakespeare's plays,
markdown stripped) resampled with a seed into documents of 2-20 KB, written as JSONL files.
Each stage runs as `llm <stage>` in a subprocess, exactly as `dvc repro` runs it; the peak
resident memory of the stage's whole process tree (main process plus workers) is sampled
every 50 ms (with Ray's local cluster, its raylet and workers are in that tree). Prints a table,
the targets at the largest size, and writes benchmarks/out/data.json (data-ray.json for
--engine ray). A corpus is generated once per size and seed (benchmarks/out/data/corpora/).

With --engine ray and no --ray-address, each stage starts a local Ray cluster of every core, as
`dvc repro` does; its start-up (seconds) is in the stage's time. --ray-address auto uses the
cluster that `ray start --head` runs on this machine instead.
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

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.common import table  # noqa: E402
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


def corpus(root: Path, megabytes: float, seed: int) -> Path:
    """The generated corpus of this size and seed, made once and shared by the engines and reruns."""
    dest = root / f"{megabytes:g}mb-seed{seed}"
    marker = dest / "generated.json"
    if marker.exists():
        return dest
    t0 = time.perf_counter()
    n_docs = generate(dest, megabytes, seed)
    marker.write_text(json.dumps({"megabytes": megabytes, "seed": seed, "documents": n_docs}))
    print(f"generated {n_docs} documents ({megabytes:g} MB) in {time.perf_counter() - t0:.1f} s", flush=True)
    return dest


def run_size(work: Path, source: Path, megabytes: float, llm_bin: str, engine: str, ray_address: str) -> list[dict]:
    if work.exists():
        shutil.rmtree(work)  # every stage runs from scratch
    work.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["sources"] = [str(source / "*.jsonl")]
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
            {"engine": engine, "size_mb": megabytes, "stage": stage, "seconds": round(seconds, 2),
             "mb_per_s": round(megabytes / seconds, 2),
             "peak_rss_tree_mb": round(tree / 2**20), "peak_rss_main_mb": round(main / 2**20)}
        )
        print(f"  {stage:<10} {seconds:7.1f} s", flush=True)
    total = sum(r["seconds"] for r in rows)
    rows.append(
        {"engine": engine, "size_mb": megabytes, "stage": "end-to-end", "seconds": round(total, 2),
         "mb_per_s": round(megabytes / total, 2),
         "peak_rss_tree_mb": max(r["peak_rss_tree_mb"] for r in rows),
         "peak_rss_main_mb": max(r["peak_rss_main_mb"] for r in rows)}
    )
    return rows


def print_table(rows: list[dict]) -> None:
    print(table(["engine", "size MB", "stage", "seconds", "MB/s", "peak RSS tree MB", "peak RSS main MB"],
                [[r["engine"], f"{r['size_mb']:g}", r["stage"], f"{r['seconds']:.1f}", f"{r['mb_per_s']:.2f}",
                  r["peak_rss_tree_mb"], r["peak_rss_main_mb"]] for r in rows], align="lrlrrrr"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="50,200", help="comma-separated corpus sizes in MB (default 50,200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="local",
                    help="compute.data_engine: local, ray, or both one after the other: local,ray")
    ap.add_argument("--ray-address", default="",
                    help='compute.ray_address with --engine ray ("" = a local cluster per stage)')
    ap.add_argument("--work", default=None, help="scratch directory (default benchmarks/out/data)")
    ap.add_argument("--out", default=None,
                    help="results file (default benchmarks/out/data.json, data-ray.json for --engine ray)")
    args = ap.parse_args()
    engines = args.engine.split(",")
    if not set(engines) <= {"local", "ray"}:
        ap.error(f"--engine: local, ray or local,ray, got {args.engine!r}")
    work = Path(args.work or REPO / "benchmarks" / "out" / "data")
    llm_bin = str(Path(sys.executable).parent / "llm")
    rows: list[dict] = []
    sizes = [float(s) for s in args.sizes.split(",")]
    for size in sizes:
        source = corpus(work / "corpora", size, args.seed)
        for engine in engines:
            print(f"{size:g} MB, engine {engine}", flush=True)
            rows += run_size(work / f"{size:g}mb-{engine}", source, size, llm_bin, engine, args.ray_address)
    print()
    print_table(rows)
    print_targets(rows, sizes)
    suffix = "-ray" if engines == ["ray"] else ""
    out = Path(args.out or REPO / "benchmarks" / "out" / f"data{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "engines": engines, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


def print_targets(rows: list[dict], sizes: list[float]) -> None:
    """The data half's targets (issue: 1 GB on 2 cores): >= 10 MB/s end to end on the local
    engine, peak RSS of the process tree <= 2 GB, and at the largest size within 1.25x of the
    peak RSS at a quarter of it."""
    ends = {(r["engine"], r["size_mb"]): r for r in rows if r["stage"] == "end-to-end"}
    big = max(sizes)
    print()
    for (engine, size), r in sorted(ends.items()):
        if size != big:
            continue
        checks = [f"peak RSS {r['peak_rss_tree_mb']} MB (<= 2048: {'yes' if r['peak_rss_tree_mb'] <= 2048 else 'NO'})"]
        if engine == "local":
            checks.insert(0, f"{r['mb_per_s']:.1f} MB/s (>= 10: {'yes' if r['mb_per_s'] >= 10 else 'NO'})")
        quarter = ends.get((engine, big / 4))
        if quarter:
            ratio = r["peak_rss_tree_mb"] / quarter["peak_rss_tree_mb"]
            checks.append(f"RSS {ratio:.2f}x the {big / 4:g} MB run's (<= 1.25: {'yes' if ratio <= 1.25 else 'NO'})")
        print(f"{engine:<6} {size:g} MB: " + "; ".join(checks))


if __name__ == "__main__":
    main()
