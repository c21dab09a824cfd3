"""The whole pipeline, ingest to export, as `dvc repro` runs it, on generated corpora of two sizes.

    python benchmarks/pipeline.py                            # 100 MB and 1 GB: issue 20's targets
    python benchmarks/pipeline.py --sizes 5MB,50MB           # a quick run
    python benchmarks/pipeline.py --sizes 2MB --generate-only

The corpus: paragraphs of the default corpus (Shakespeare's plays, markdown stripped) drawn with
a seed into documents of about 1-100 KB (lognormal, mean near 15 KB), about one word in 12
replaced by another word of the corpus, one document per .txt file, 1000 files per folder.
No two documents are near-duplicates, so clean keeps nearly all of them. The smallest size also
runs as a few big files (--big-files, --big-file-mb), cut into documents by ingest. A corpus is
generated once per size, seed and layout under benchmarks/out/pipeline/corpora/.

Each size gets a scratch git + DVC project (the repo's dvc.yaml, llm/ and params.yaml, as
tests/conftest.py's make_dvc_project makes one) with ingest.sources pointing at the corpus and a
short fixed training (--max-steps, compile off); every other param keeps the project's default.
The code is copied once at the start (benchmarks/out/pipeline/code/) and the stages import the
project's copy of llm/, so every size runs the same code even while llm/ is being edited.
Each stage runs as `dvc repro -s STAGE`, one after the other in dvc.yaml's order: its time is
what `dvc repro` spends on it, DVC's hashing and caching of its deps and outputs included
(`dvc s` in the table; `cmd s` is the `llm STAGE` process alone; `cpu s` its whole tree's CPU
seconds, steadier than wall time on a shared machine, beside the load average at its end). The
peak resident memory of the whole process tree (dvc, `llm STAGE`, its worker processes) and of
the `llm STAGE` subtree alone is sampled every --interval seconds: peaks shorter than that can be
missed, and pages shared by forked workers count once per process.

Prints per stage the time, the peak RSS and the ratio between the largest and the smallest size,
the total without training and its seconds per GB, and issue 20's targets at the largest size as
PASS/FAIL (it reports, it does not assert); writes benchmarks/out/pipeline.json. A stage whose
tree passes --max-rss-gb or --stage-timeout is killed and reported; the stages after it at that
size are skipped. `--show FILE` prints the tables and targets of a results file again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.common import deep_merge, dvc_command, git_commit, table  # noqa: E402
from llm.corpus.clean import normalize_whitespace, strip_markdown  # noqa: E402
from tests.conftest import plays_dir  # noqa: E402

OUT = REPO / "benchmarks" / "out"
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
FILES_PER_DIR = 1000
# What a scratch project holds from the repository (tests/conftest.py's make_dvc_project), plus params.yaml;
# .dvc/config last: it is copied after `dvc init`.
SNAPSHOT = ("llm", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "data/inbox/.gitkeep", ".dvc/config")
SUBSTITUTE_EVERY = 12  # about one word in this many is replaced
WORD = re.compile(r"\b[A-Za-z][a-z]+(?:'[a-z]+)?\b")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:8.1f} s] {msg}", flush=True)


def parse_size(text: str) -> tuple[str, int]:
    """'100MB' -> ('100MB', 100_000_000); a bare number is MB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]B)?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"a size like 100MB or 1GB, got {text!r}")
    value, unit = float(m.group(1)), m.group(2) or "MB"
    return f"{value:g}{unit}", int(value * UNITS[unit])


# ---------------------------------------------------------------- corpus generation

_PARAS: list[tuple[str, array]] = []  # (paragraph, word spans start0, end0, start1, ...): set before forking
_VOCAB: list[str] = []


def load_paragraphs() -> None:
    words = set()
    for path in sorted(plays_dir().rglob("*.md")):
        text = normalize_whitespace(strip_markdown(path.read_text(encoding="utf-8")))
        for para in text.split("\n\n"):
            para = para.strip()
            if not para:
                continue
            spans = array("I")
            for m in WORD.finditer(para):  # not the speakers' names in capitals: they stay
                spans.extend(m.span())
                words.add(m.group().lower())
            _PARAS.append((para, spans))
    _VOCAB.extend(sorted(w for w in words if len(w) > 1))


def document(rng: random.Random, target: int) -> str:
    out, n = [], 0
    paras, vocab = _PARAS, _VOCAB
    while n < target:
        text, spans = paras[rng.randrange(len(paras))]
        n_words = len(spans) // 2
        k = int(n_words / SUBSTITUTE_EVERY + rng.random())
        if k:
            pieces, pos = [], 0
            for j in sorted(rng.sample(range(n_words), k)):
                start, end = spans[2 * j], spans[2 * j + 1]
                word = vocab[rng.randrange(len(vocab))]
                pieces += [text[pos:start], word.capitalize() if text[start].isupper() else word]
                pos = end
            pieces.append(text[pos:])
            text = "".join(pieces)
        out.append(text)
        n += len(text) + 2
    return "\n\n".join(out) + "\n"


def _write_dir(args: tuple[Path, int, list[int], int]) -> int:
    """Files first..first+len(sizes)-1 into folder `dest`; each file's text depends only on (seed, index)."""
    dest, first, sizes, seed = args
    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, size in enumerate(sizes, first):
        data = document(random.Random(f"{seed}:{i}"), size).encode("utf-8")
        (dest / f"{i:07d}.txt").write_bytes(data)
        written += len(data)
    return written


def generate(dest: Path, n_bytes: int, seed: int, workers: int) -> dict:
    """Many files of one document each; returns what was written."""
    rng = random.Random(seed)
    sizes, total = [], 0
    while total < n_bytes:  # lognormal document sizes: median 9 KB, mean about 15 KB, 1-100 KB
        size = min(100_000, max(1_000, int(rng.lognormvariate(9.1, 1.0))))
        sizes.append(size)
        total += size
    tasks = [(dest / f"{d:04d}", d * FILES_PER_DIR, sizes[d * FILES_PER_DIR : (d + 1) * FILES_PER_DIR], seed)
             for d in range((len(sizes) + FILES_PER_DIR - 1) // FILES_PER_DIR)]
    if not _PARAS:
        load_paragraphs()
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        written = sum(pool.map(_write_dir, tasks))
    return {"files": len(sizes), "bytes": written}


def concatenate(src: Path, dest: Path, file_bytes: int) -> dict:
    """The same documents as few big files (blank line between documents): ingest cuts them."""
    dest.mkdir(parents=True, exist_ok=True)
    index, out, n, written = 0, None, 0, 0
    for path in sorted(src.rglob("*.txt")):
        if out is None or n >= file_bytes:
            if out:
                out.close()
            out = open(dest / f"big-{index:03d}.txt", "wb")  # noqa: SIM115 - one file after another
            index, n = index + 1, 0
        data = path.read_bytes() + b"\n"
        out.write(data)
        n += len(data)
        written += len(data)
    if out:
        out.close()
    return {"files": index, "bytes": written}


def corpus(label: str, n_bytes: int, seed: int, layout: str, big_file_bytes: int, workers: int) -> tuple[Path, dict]:
    """The corpus folder (made once per size, seed and layout) and what it holds."""
    root = OUT / "pipeline" / "corpora"
    many = root / f"{label}-seed{seed}"
    dest = many if layout == "many" else root / f"{label}-seed{seed}-big{big_file_bytes // 10**6}MB"
    marker = dest.with_name(dest.name + ".json")
    if marker.exists():
        return dest, json.loads(marker.read_text())
    if dest.exists():
        shutil.rmtree(dest)  # an interrupted generation
    t0 = time.perf_counter()
    if layout == "many":
        info = generate(dest, n_bytes, seed, workers)
    else:
        corpus(label, n_bytes, seed, "many", big_file_bytes, workers)
        info = concatenate(many, dest, big_file_bytes)
    info.update(size=label, seed=seed, layout=layout, seconds=round(time.perf_counter() - t0, 1))
    marker.write_text(json.dumps(info))
    log(f"generated {label} ({layout}): {info['files']} files, {info['bytes'] / 1e6:.1f} MB in {info['seconds']} s")
    return dest, info


# ---------------------------------------------------------------- the scratch project and the stages


def dvc_bin() -> str:
    found = dvc_command()
    if found is None:
        sys.exit("dvc is not installed: run `make setup` (it links dvc into .venv/bin)")
    return found


def stage_env(root: Path) -> dict:
    # PYTHONPATH: `llm STAGE` imports the project's copy of llm/ (the one DVC hashes), not the
    # editable install, which others may be editing while a long run goes on.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "LLM_PROGRESS": "0",
           "PYTHONPATH": str(root.resolve())}
    env.pop("MLFLOW_TRACKING_URI", None)  # the scratch project's own mlflow.db, as a fresh checkout has
    return env


def snapshot(dest: Path) -> dict:
    """The pipeline's files as they are now, copied once: every size runs the same code."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    digest = hashlib.sha256()
    for name in SNAPSHOT:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    return {**git_state(), "snapshot_sha256": digest.hexdigest()}


def make_project(root: Path, code: Path, source: Path, override: dict) -> None:
    if root.exists():
        shutil.rmtree(root)  # every stage runs from scratch
    root.mkdir(parents=True)
    for name in SNAPSHOT[:-1]:  # .dvc/config after `dvc init`
        src, dst = code / name, root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((code / "params.yaml").read_text())
    params = deep_merge(params, {"ingest": {"sources": [str(source.resolve())]}, **override})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env(root)
    for cmd in (["git", "init", "-q"], [dvc_bin(), "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    shutil.copy2(code / ".dvc" / "config", root / ".dvc" / "config")  # the project's DVC settings (analytics off)


def _is_stage_cmd(p: psutil.Process, stage: str) -> bool:
    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return stage in cmd and any(Path(c).name == "llm" for c in cmd[:2])


def run_stage(root: Path, stage: str, interval: float, max_rss: int, timeout: float) -> dict:
    """`dvc repro -s STAGE` in root, watched: seconds, the stage command's seconds, peak RSS."""
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / f"{stage}.log", "w") as out:
        # its own process group: a kill reaches the workers
        proc = subprocess.Popen([dvc_bin(), "repro", "-s", stage], cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                env=stage_env(root), start_new_session=True)
        t0 = time.perf_counter()
        cpu0 = _children_cpu()
        top = psutil.Process(proc.pid)
        peak_tree = peak_stage = 0
        cmd_proc, cmd_start, cmd_last = None, None, None
        killed = ""
        while proc.poll() is None:
            try:
                procs = [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = {}
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    rss[p.pid] = p.memory_info().rss
            now = time.perf_counter()
            if cmd_proc is None:
                # the topmost `llm STAGE` process (workers forked from it have the same command line)
                cmd_proc = next((p for p in procs if _is_stage_cmd(p, stage) and not _is_stage_cmd_parent(p, stage)),
                                None)
                if cmd_proc is not None:
                    cmd_start = now - (time.time() - cmd_proc.create_time())
            if cmd_proc is not None:
                try:
                    if cmd_proc.is_running() and cmd_proc.status() != psutil.STATUS_ZOMBIE:
                        sub = [cmd_proc.pid, *(c.pid for c in cmd_proc.children(recursive=True))]
                        peak_stage = max(peak_stage, sum(rss.get(pid, 0) for pid in sub))
                        cmd_last = now
                except psutil.NoSuchProcess:
                    pass
            tree = sum(rss.values())
            peak_tree = max(peak_tree, tree)
            if tree > max_rss:
                killed = f"killed: the tree's RSS passed {max_rss / 2**30:g} GB"
            elif now - t0 > timeout:
                killed = f"killed: ran past {timeout:g} s"
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(interval)
        proc.wait()
        seconds = time.perf_counter() - t0
    row = {"stage": stage, "seconds": round(seconds, 2), "cpu_seconds": round(_children_cpu() - cpu0, 1),
           "load_average": round(os.getloadavg()[0], 1), "peak_rss_tree_mb": round(peak_tree / 2**20),
           "peak_rss_stage_mb": round(peak_stage / 2**20), "returncode": proc.returncode}
    if cmd_start is not None and cmd_last is not None:
        row["cmd_seconds"] = round(max(0.0, cmd_last - max(cmd_start, t0)), 2)
        row["dvc_seconds"] = round(seconds - row["cmd_seconds"], 2)
    if killed or proc.returncode != 0:
        row["error"] = killed or f"exit {proc.returncode}, see {logs / f'{stage}.log'}"
    return row


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished descendants (each reaped by its parent:
    dvc waits for `llm STAGE`, which joins its workers): a stage's CPU time, steadier than its wall
    time on a shared machine."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _is_stage_cmd_parent(p: psutil.Process, stage: str) -> bool:
    try:
        parent = p.parent()
    except psutil.NoSuchProcess:
        return False
    return parent is not None and _is_stage_cmd(parent, stage)


def read_metrics(root: Path) -> dict:
    out = {}
    for path in sorted((root / "metrics").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            out[path.stem] = json.loads(path.read_text())
    return out


def run_size(label: str, layout: str, source: Path, corpus_info: dict, args, override: dict, stages: list[str],
             code: Path) -> dict:
    root = OUT / "pipeline" / "work" / f"{label}-{layout}"
    make_project(root, code, source, override)
    log(f"{label} ({layout}, {corpus_info['files']} files): project {root.relative_to(REPO)}")
    rows = []
    for stage in stages:
        log(f"{label} {stage}: started")
        row = run_stage(root, stage, args.interval, int(args.max_rss_gb * 2**30), args.stage_timeout)
        rows.append(row)
        cmd = f", llm {row['cmd_seconds']:.1f} s" if "cmd_seconds" in row else ""
        state = "FAILED " + row["error"] if "error" in row else "finished"
        log(f"{label} {stage}: {state} in {row['seconds']:.1f} s{cmd}, "
            f"peak RSS {row['peak_rss_tree_mb']} MB (stage {row['peak_rss_stage_mb']} MB)")
        if "error" in row:
            tail = (root / "logs" / f"{stage}.log").read_text(errors="replace").splitlines()[-15:]
            print("\n".join("    " + line for line in tail), flush=True)
            break
    metrics = read_metrics(root)
    if not args.keep:  # the artifacts (several GB at 1 GB), not the logs and metrics
        for name in ("data", "models", ".dvc/cache", "mlartifacts"):
            shutil.rmtree(root / name, ignore_errors=True)
    done = [r for r in rows if "error" not in r]
    no_train = [r for r in done if r["stage"] != "train"]
    result = {"size": label, "bytes": corpus_info["bytes"], "layout": layout, "files": corpus_info["files"],
              "stages": rows, "complete": len(done) == len(stages), "metrics": metrics}
    if result["complete"]:
        total = sum(r["seconds"] for r in no_train)
        result.update(total_seconds=round(sum(r["seconds"] for r in done), 1),
                      total_without_train_seconds=round(total, 1),
                      seconds_per_gb_without_train=round(total / (corpus_info["bytes"] / 1e9), 1))
    return result


# ---------------------------------------------------------------- tables and targets


def print_tables(results: list[dict]) -> None:
    def one(value: float | None, spec: str = ".1f") -> str | None:
        return None if value is None else format(value, spec)

    for res in results:
        rows = [[res["size"], res["layout"], r["stage"], f"{r['seconds']:.1f}", one(r.get("cmd_seconds")),
                 one(r.get("dvc_seconds")), one(r.get("cpu_seconds")), one(r.get("load_average")),
                 r["peak_rss_tree_mb"], r["peak_rss_stage_mb"], r.get("error", "")] for r in res["stages"]]
        print(table(["size", "layout", "stage", "seconds", "cmd s", "dvc s", "cpu s", "load", "peak RSS tree MB",
                     "stage MB", "note"], rows, align="rllrrrrrrrl"))
        if res["complete"]:
            print(f"{res['size']} {res['layout']}: all but train {res['total_without_train_seconds']:.1f} s "
                  f"= {res['seconds_per_gb_without_train']:.0f} s per GB ({res['bytes'] / 1e6:.0f} MB, "
                  f"{res['files']} files); with train {res['total_seconds']:.1f} s")
        print()
    pair = ratio_pair(results)
    if pair:
        small, big = pair
        print(f"ratios {big['size']} / {small['size']} (many files):")
        print(table(["stage", "seconds", "cpu s", "peak RSS tree", "stage RSS"],
                    [[stage, f"{r['seconds']:.2f}x", one(r.get("cpu"), ".2f") and f"{r['cpu']:.2f}x",
                      f"{r['peak_rss_tree']:.2f}x", f"{r['peak_rss_stage']:.2f}x"]
                     for stage, r in ratios(small, big).items()], align="lrrrr"))
        print()


def ratio_pair(results: list[dict]) -> tuple[dict, dict] | None:
    many = sorted((r for r in results if r["layout"] == "many"), key=lambda r: r["bytes"])
    return (many[0], many[-1]) if len(many) >= 2 else None


def ratios(small: dict, big: dict) -> dict:
    a = {r["stage"]: r for r in small["stages"] if "error" not in r}
    out = {}
    for r in big["stages"]:
        s = a.get(r["stage"])
        if s is None or "error" in r:
            continue
        keys = (("seconds", "seconds"), ("peak_rss_tree", "peak_rss_tree_mb"), ("peak_rss_stage", "peak_rss_stage_mb"),
                ("cpu", "cpu_seconds"))
        out[r["stage"]] = {k: round(r[k2] / max(s[k2], 1e-9), 2) for k, k2 in keys if k2 in r and k2 in s}
    return out


def targets(results: list[dict], cpu_count: int) -> list[dict]:
    """Issue 20's targets at the largest size (many files): each a dict with name, pass, detail."""
    pair = ratio_pair(results)
    many = [r for r in results if r["layout"] == "many"]
    if not many:
        return []
    big = max(many, key=lambda r: r["bytes"])
    rows = {r["stage"]: r for r in big["stages"]}
    everyone = "all stages" if big["complete"] else "not every stage ran"
    out = []
    over = [f"{s} {r['peak_rss_tree_mb']} MB" for s, r in rows.items() if r["peak_rss_tree_mb"] > 2048]
    out.append({"name": f"every stage's peak RSS <= 2 GB at {big['size']}", "pass": not over and big["complete"],
                "detail": ", ".join(over) if over else everyone})
    if pair:
        small = pair[0]
        rat = ratios(small, big)
        over = [f"{s} {r['peak_rss_tree']:.2f}x" for s, r in rat.items() if r["peak_rss_tree"] > 1.25]
        out.append({"name": f"every stage's peak RSS within 1.25x of the {small['size']} run",
                    "pass": not over and big["complete"],
                    "detail": ", ".join(over) if over else everyone})
        ev = rat.get("evaluate")
        cover = []
        for res in (small, big):  # what evaluate covered (metrics/eval.json)
            e = res["metrics"].get("eval", {})
            covered = e.get("covered", {})
            tokens = covered.get("tokens", e.get("val_tokens"))
            if tokens is not None:
                split = e.get("val_split", {}).get("tokens")
                of = f" of {split:,}" if split else ""
                capped = "" if "capped" not in covered else (", capped" if covered["capped"] else ", not capped")
                cover.append(f"{res['size']}: {tokens:,}{of} val tokens{capped}")
        out.append({"name": "evaluate's time flat (<= 1.25x) once the val cap is reached",
                    "pass": ev is not None and ev["seconds"] <= 1.25,
                    "detail": "; ".join([f"{ev['seconds']:.2f}x" if ev else "evaluate did not run at both sizes",
                                         *cover])})
    if big["complete"]:
        spg = big["seconds_per_gb_without_train"]
        cores = "" if cpu_count == 2 else f" (measured on {cpu_count} cores, not 2)"
        slowest = max((r for r in big["stages"] if r["stage"] != "train"), key=lambda r: r["seconds"])
        out.append({"name": "the pipeline without training <= 180 s per GB on 2 cores", "pass": spg <= 180,
                    "detail": f"{spg:.0f} s per GB at {big['size']}{cores}; slowest stage {slowest['stage']} "
                              f"{slowest['seconds']:.0f} s"})
    else:
        out.append({"name": "the pipeline without training <= 180 s per GB on 2 cores", "pass": False,
                    "detail": f"not every stage ran at {big['size']}"})
    return out


def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--", *SNAPSHOT)
    return {"commit": git_commit(REPO).removesuffix("-dirty"), "dirty": dirty.splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100MB,1GB",
                    help="comma-separated corpus sizes (default 100MB,1GB; a bare number is MB)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated corpora")
    ap.add_argument("--big-files", default="smallest",
                    help="sizes also run as a few big files: 'smallest' (default), 'none', or sizes like 100MB")
    ap.add_argument("--big-file-mb", type=int, default=25, help="bytes per big file in MB (default 25)")
    ap.add_argument("--max-steps", type=int, default=50,
                    help="train.max_steps of the short fixed training (default 50)")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples (default 0.2)")
    ap.add_argument("--max-rss-gb", type=float, default=12, help="kill a stage whose tree passes this RSS (default 12)")
    ap.add_argument("--stage-timeout", type=float, default=3 * 3600, help="kill a stage after this many seconds")
    ap.add_argument("--generate-only", action="store_true", help="make the corpora and stop")
    ap.add_argument("--keep", action="store_true", help="keep each project's data/, models/ and DVC cache")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/out/pipeline.json)")
    ap.add_argument("--show", metavar="FILE", help="print the tables and targets of a results file, run nothing")
    args = ap.parse_args()
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        print_tables(saved["runs"])
        for c in targets(saved["runs"], saved["cpu_count"]):
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['name']}: {c['detail']}")
        return
    sizes = sorted((parse_size(s) for s in args.sizes.split(",") if s.strip()), key=lambda s: s[1])
    if args.big_files == "smallest":
        big_sizes = {sizes[0][0]}
    elif args.big_files == "none":
        big_sizes = set()
    else:
        big_sizes = {parse_size(s)[0] for s in args.big_files.split(",")}
    runs = [(label, n, "many") for label, n in sizes]
    runs += [(label, n, "big") for label, n in sizes if label in big_sizes]
    workers = os.cpu_count() or 1
    override = {"train": {"max_steps": args.max_steps, "warmup_steps": min(10, args.max_steps), "compile": False}}
    log(f"sizes {', '.join(label for label, _ in sizes)}; {workers} cores; load average {os.getloadavg()[0]:.1f}")

    sources = {}
    for label, n, layout in runs:
        sources[label, layout] = corpus(label, n, args.seed, layout, args.big_file_mb * 10**6, workers)
    if args.generate_only:
        for (label, layout), (path, info) in sources.items():
            log(f"{label} {layout}: {info['files']} files, {info['bytes']:,} bytes in {path.relative_to(REPO)}")
        return

    code = OUT / "pipeline" / "code"
    state = snapshot(code)
    log(f"code: {code.relative_to(REPO)}, a copy of llm/, dvc.yaml and params.yaml at {state['commit'][:10]}"
        f"{' with uncommitted changes' if state['dirty'] else ''}")
    stages = list(yaml.safe_load((code / "dvc.yaml").read_text())["stages"])  # dvc.yaml's order is the DAG's
    log(f"stages {', '.join(stages)}")
    results = []
    for label, _, layout in runs:
        path, info = sources[label, layout]
        results.append(run_size(label, layout, path, info, args, override, stages, code))
    print()
    print_tables(results)
    checks = targets(results, workers)
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['name']}: {c['detail']}")
    out = Path(args.out or OUT / "pipeline.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    pair = ratio_pair(results)
    out.write_text(json.dumps({
        "cpu_count": workers, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_end": os.getloadavg(), "code": state, "seed": args.seed, "params_override": override,
        "runs": results, "ratios": ratios(*pair) if pair else {}, "targets": checks,
    }, indent=2))
    print(f"\nwrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
