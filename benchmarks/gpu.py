"""`make gpu-check`: one command that proves llm/'s GPU path on a CUDA machine (one H100 or H200).

    python benchmarks/gpu.py            check (the default mode). Without CUDA it prints one line,
                                        "gpu-check: no CUDA device (...)", and exits 0.
    python benchmarks/gpu.py prep       on the CPU machine, before a device run: the GPU presets' data
                                        and the wheels the GPU machine lacks, into .gpu-check/
                                        (gitignored; copy it along with the repository).

The check runs these parts, each in its own processes with its own timeout, inside one budget
(--budget, 440 s); a part that fails or times out is recorded and the others still run:

  env           torch, CUDA, NCCL, the GPU, bf16; which of the project's dependencies and modules
                import; the datasheet peak llm.device uses and a measured bf16 matmul peak.
  tests         pytest on tests/test_gpu.py and every test file marked for CUDA; pass/fail counts.
  train:PRESET  `python -m llm.cli train` on each GPU preset (presets/NAME.yaml) with a short-run
                overlay (max_steps cut, tracking off, time budget): metrics/train.json's tokens/s (all,
                per device), MFU against the datasheet peak and against the measured peak, steady
                tokens/s of the logged windows after the first, peak GPU memory, compile seconds,
                graph breaks and recompiles (TORCH_LOGS).
  resume        the first preset, 12 eager steps: a run SIGKILLed right after its step-6 checkpoint
                (LLM_FAULT_POINT=train.checkpoint.6), then `llm train --resume`, against an
                uninterrupted run: final val loss within 0.01 and weights within 1 % (relative L2
                over all weights; bf16 autocast and CUDA's non-deterministic kernels); a second
                uninterrupted run, when time allows, shows how far CUDA alone moves them.
  export        `llm export` of that model; Hugging Face logits against ours on CUDA in fp32, the
                HF tokenizer's ids against sentencepiece's, greedy generation of both.
  ddp           `llm train` steps with DDP over a one-rank NCCL group on the one GPU: llm.train is
                told there are 2 processes, so it wraps the model in DDP and all-reduces through
                Dist, and NCCL refuses any collective on a CPU tensor.
  graph_breaks  torch._dynamo.explain of each preset's model: graphs and graph breaks.

It writes $OUT/gpu_check.json when OUT is set, else benchmarks/results/gpu_check-<gpu>.json, and
prints a table. The exit code is 1 when any part failed, timed out or was skipped.

The GPU machine has torch but not pydantic (nor mlflow, dagster, dvc, ...) and no network: `prep`
downloads Python 3.12 manylinux wheels of pydantic and its dependencies (and pyyaml) into
.gpu-check/wheels/, the check installs them into a throwaway folder on PYTHONPATH and runs
`python -m llm.cli`. Every params file it writes sets `tracking: {enabled: false}`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import glob
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".gpu-check"  # gitignored; made by `prep`, carried to the GPU machine
WHEELS = STATE / "wheels"
PREPPED = STATE / "data"  # PREPPED/<preset>/{tokenizer,shards,prep.json}
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_PRESETS = ("gpu-small", "gpt2-small")
DEFAULT_BUDGET_S = 440  # the parts' budget; with start-up the check ends inside 8 minutes
RESULT_MARK = "GPU_CHECK_RESULT "

# ----------------------------------------------------------------------------------- overlays
# The GPU machine has no pydantic: these wheels travel (Python 3.12, manylinux, x86-64).
WHEEL_PACKAGES = ("pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection")
YAML_PACKAGE = "pyyaml"  # installed there only when `import yaml` fails
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# The params groups the data stages read: prepped data is stale when they change.
DATA_GROUPS = ("seed", "ingest", "clean", "split", "tokenizer", "shards")
# Prep of a preset's data for a short check run, not for quality: a 50 k vocabulary on the 5 MB
# default corpus would be refused by the tokenizer's bytes-per-piece guard.
PREP_OVERLAY: dict[str, dict] = {"gpt2-small": {"tokenizer": {"min_bytes_per_piece": 0}}}
TRACKING_OFF = {"tracking": {"enabled": False}}
# Every training run of the check: one process on the GPU, log lines every few steps.
RUN_OVERLAY = {"train": {"device": "cuda", "nproc_per_node": 1, "nnodes": 1}}
# The short run of each preset: its own model, batch and tokens per step, fewer steps. gpt2-small
# refuses the default corpus (too few tokens for its steps); max_epochs lets its 30 steps run.
SHORT_RUN: dict[str, dict] = {
    "gpu-small": {"train": {"max_steps": 200, "log_interval": 10, "time_budget_minutes": 1.25}},
    "gpt2-small": {"train": {"max_steps": 30, "log_interval": 5, "max_epochs": 1000.0, "time_budget_minutes": 1.5}},
}
SHORT_RUN_DEFAULT = {"train": {"max_steps": 30, "log_interval": 5, "time_budget_minutes": 1.25}}
# Kill and resume: eager (compiling three times would not fit), a checkpoint at step 6 of 12.
RESUME_RUN = {"train": {"max_steps": 12, "checkpoint_interval": 6, "eval_interval": 6, "log_interval": 2,
                        "warmup_steps": 3, "compile": False, "time_budget_minutes": 0, "eval_tokens": 65536}}
RESUME_ACCUM = 2  # micro-batches per step: the preset's micro-batch, not its whole step
KILL_STEP = 6
RESUME_LOSS_TOL = 0.01  # |final val loss, resumed - uninterrupted|, nats: bf16 + non-deterministic kernels
RESUME_WEIGHT_TOL = 0.01  # ||w_resumed - w_uninterrupted|| / ||w_uninterrupted|| over all weights
DDP_RUN = {"train": {"max_steps": 6, "checkpoint_interval": 6, "eval_interval": 6, "log_interval": 2, "warmup_steps": 2,
                     "compile": False, "time_budget_minutes": 0, "eval_tokens": 65536}}
DDP_ACCUM = 4  # one process's micro-batches; told of 2 processes, llm.train runs 2 per step (no_sync, then sync)
LOGIT_TOL = {"cuda": 1e-3, "cpu": 1e-4}  # HF vs ours, fp32, max |difference| of logits
# --rehearse-on-cpu: the same parts on this CPU with a tiny model, to prove the plumbing.
REHEARSAL = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
             "train": {"device": "cpu", "batch_size": 4, "tokens_per_step": 512, "compile": False, "precision": "fp32",
                       "threads": 2, "eval_tokens": 8192}}
REHEARSAL_STEPS = 10
# What the env part tries to import (import name -> distribution), and the project's modules.
DEPS = {"torch": "torch", "numpy": "numpy", "pyarrow": "pyarrow", "sentencepiece": "sentencepiece",
        "safetensors": "safetensors", "tokenizers": "tokenizers", "transformers": "transformers", "pandas": "pandas",
        "yaml": "pyyaml", "psutil": "psutil", "tqdm": "tqdm", "pytest": "pytest", "pydantic": "pydantic",
        "mlflow": "mlflow", "dagster": "dagster", "dvc": "dvc", "ftfy": "ftfy", "rensa": "rensa",
        "markdown_it_pyrs": "markdown-it-pyrs", "py3langid": "py3langid", "ray": "ray", "pandera": "pandera"}
LLM_MODULES = ("llm.config", "llm.cli", "llm.train", "llm.evaluate", "llm.export", "llm.distributed")
CUDA_TEST = re.compile(r"pytest\.mark\.(cuda|gpu)\b|skipif\([^)]*cuda\.is_available")


# ------------------------------------------------------------------------------------ helpers
def deep_merge(base: dict, overlay: dict) -> dict:
    """A copy of base with overlay merged in, mapping by mapping; a None in overlay deletes the key."""
    out = dict(base)
    for key, value in overlay.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: Path) -> dict:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data or {}


def write_params(run_dir: Path, data: dict) -> Path:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def effective(params: dict) -> dict:
    """params with llm.config's defaults filled in, as the CLI will read them; params as they are
    when llm.config does not import or rejects them (the run then fails with its own error line)."""
    try:
        from llm.config import parse_params

        return parse_params(params).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - any failure: the CLI reports it
        return params


def micro_batch(params: dict) -> int:
    """Tokens of one micro-batch of one process: batch_size x block_size."""
    full = effective(params)
    return int(full.get("train", {}).get("batch_size", 8)) * int(full.get("model", {}).get("block_size", 128))


def data_groups(params: dict) -> dict:
    return {k: params[k] for k in DATA_GROUPS if k in params}


def data_code() -> dict[str, str]:
    """The version of each data stage's code (llm.codedeps, as DVC sees it): prepped data made by
    other code is made again. Only `prep` asks, on the CPU machine."""
    from llm.codedeps import code_version

    return {stage: code_version(stage) for stage in ("ingest", "clean", "tokenizer", "shards")}


def preset_path(spec: str) -> Path:
    """A preset name (presets/NAME.yaml) or a path to a params file."""
    if spec.endswith((".yaml", ".yml")):
        return Path(spec).resolve()
    return REPO / "presets" / f"{spec}.yaml"


def preset_name(spec: str) -> str:
    return Path(spec).stem if spec.endswith((".yaml", ".yml")) else spec


def shown(path: Path) -> str:
    """path relative to the repository when it is inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain text table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class Proc:
    """How a subprocess ended, and its output lines with the second each arrived."""

    rc: int | None
    seconds: float
    timed_out: bool
    lines: list[tuple[float, str]] = field(default_factory=list)
    max_gpu_mib: float | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def error_line(self) -> str:
        """The stage's `error:` line, else the last exception line, else the last line."""
        lines = [line.strip() for _, line in self.lines if line.strip()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line[:500]
        for line in reversed(lines):
            if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line):
                return line[:500]
        tail = lines[-1][:300] if lines else "(no output)"
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s; last line: {tail}"
        return f"exit code {self.rc}; last line: {tail}"

    def result(self) -> dict | None:
        """The JSON a --worker printed last."""
        for _, line in reversed(self.lines):
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
        return None


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _gpu_memory_sampler(stop: threading.Event, peak: list[float]) -> None:
    """nvidia-smi's memory.used of GPU 0, sampled every second: the most a run held."""
    while not stop.wait(1.0):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            peak[0] = max(peak[0], float(out.splitlines()[0]))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            pass


def run(cmd: list[str], *, env: dict[str, str], timeout: float, log: Path, cwd: Path = REPO,
        sample_gpu: bool = False) -> Proc:
    """Run cmd in its own process group, its output into log; on timeout the whole group is killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lines: list[tuple[float, str]] = []
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append((time.monotonic() - t0, line.rstrip("\n")))
                f.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        stop, peak = threading.Event(), [0.0]
        sampler = None
        if sample_gpu and shutil.which("nvidia-smi"):
            sampler = threading.Thread(target=_gpu_memory_sampler, args=(stop, peak), daemon=True)
            sampler.start()
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
            rc = proc.wait()
        _kill_group(proc, signal.SIGKILL)  # what the command left running in its group (compile workers)
        reader.join(timeout=10)
        stop.set()
        if sampler:
            sampler.join(timeout=15)
        seconds = time.monotonic() - t0
        f.write(f"\n# exit code {rc}{' (timed out)' if timed_out else ''} after {seconds:.1f} s\n")
    return Proc(rc, round(seconds, 1), timed_out, lines, peak[0] or None)


# ------------------------------------------------------------------------- the no-CUDA decision
def no_cuda_reason() -> str | None:
    """Why this machine has no CUDA device, decided without importing torch; None = maybe one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    gpus = "/proc/driver/nvidia/gpus"
    if glob.glob("/dev/nvidia[0-9]*") or (os.path.isdir(gpus) and os.listdir(gpus)) or shutil.which("nvidia-smi"):
        return None
    return "no NVIDIA GPU or driver on this machine"


def torch_cuda_reason(python: str, env: dict[str, str]) -> str | None:
    """None when torch sees a CUDA device; else why not (a subprocess: this process never imports torch)."""
    code = "import torch; print('CUDA', torch.cuda.is_available(), torch.cuda.device_count(), torch.__version__)"
    try:
        out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "importing torch took over 180 s"
    found = re.search(r"^CUDA (True|False) (\d+) (\S+)", out.stdout, re.M)
    if not found:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"torch does not import: {last[:200]}"
    if found.group(1) != "True":
        return f"torch {found.group(3)} sees none"
    return None


def nvidia_smi() -> dict:
    if not shutil.which("nvidia-smi"):
        return {}
    query = "name,memory.total,driver_version,clocks.max.sm"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [dict(zip(query.split(","), (c.strip() for c in line.split(",")))) for line in out.splitlines() if line]
    return {"gpus": rows}


# ------------------------------------------------------------------------------------- wheels
def wheel_dist(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) of a wheel file."""
    name, version = path.name.split("-")[:2]
    return name.lower().replace("_", "-").replace(".", "-"), version


def install_wheels(site: Path) -> dict:
    """The carried wheels the interpreter lacks, into site (put on PYTHONPATH); never from the network."""
    wheels = sorted(WHEELS.glob("*.whl"))
    info: dict[str, Any] = {"carried": [w.name for w in wheels], "installed": [], "site": None}
    wanted = []
    if importlib.util.find_spec("pydantic") is None:
        wanted += [w for w in wheels if wheel_dist(w)[0] in WHEEL_PACKAGES]
    if importlib.util.find_spec("yaml") is None:
        wanted += [w for w in wheels if wheel_dist(w)[0] == YAML_PACKAGE]
    if not wanted:
        return info
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, wanted)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        pip_error = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.SubprocessError) as e:
        pip_error = f"{type(e).__name__}: {e}"
    if pip_error:  # no pip: a wheel is a zip of what goes into site-packages
        info.update(method="unzip", pip_error=pip_error[:300])
        for w in wanted:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
    info.update(installed=[w.name for w in wanted], site=str(site))
    return info


def download_wheels(python: str = sys.executable) -> tuple[bool, str]:
    """The versions installed here of WHEEL_PACKAGES and pyyaml, as cp312 manylinux wheels."""
    from importlib import metadata

    wanted = {}
    for name in (*WHEEL_PACKAGES, YAML_PACKAGE):
        try:
            wanted[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            wanted[name] = ""
    WHEELS.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *platforms, "-d", str(WHEELS),
           *(f"{n}=={v}" if v else n for n, v in wanted.items())]
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # the Makefile's torch pin is not for these
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = run(cmd, env=env, timeout=600, log=STATE / "logs" / "pip-download.log")
    for w in WHEELS.glob("*.whl"):  # two versions of one package would stop the install there
        name, version = wheel_dist(w)
        if name not in wanted or (wanted[name] and version != wanted[name]):
            w.unlink()
    have = {wheel_dist(w)[0] for w in WHEELS.glob("*.whl")}
    missing = sorted(set(wanted) - have)
    if not proc.ok or missing:
        return False, f"pip download: {proc.error_line()}; missing: {', '.join(missing) or 'none'}"
    return True, ", ".join(sorted(w.name for w in WHEELS.glob("*.whl")))


# --------------------------------------------------------------------------------------- prep
def prep(presets: list[str], overlay: dict, force: bool, wheels: bool) -> int:
    """Data for each preset (ingest, clean, tokenizer, shards in a scratch run folder; the tokenizer
    and shards kept in .gpu-check/data/<preset>/) and the wheels. Returns the exit code."""
    sys.path.insert(0, str(REPO))
    ok = True
    env = child_env(None)
    made: dict[str, Path] = {}  # ingest+clean params -> a run folder whose data/clean has them
    with tempfile.TemporaryDirectory(prefix="gpu-prep-") as scratch:
        for spec in presets:
            name, path = preset_name(spec), preset_path(spec)
            if not path.is_file():
                print(f"prep {name}: no preset file {shown(path)}")
                ok = False
                continue
            params = deep_merge(deep_merge(load_yaml(path), PREP_OVERLAY.get(name, {})), overlay)
            dest = PREPPED / name
            stamp = dest / "prep.json"
            have = stamp.is_file() and (dest / "shards").is_dir() and (dest / "tokenizer").is_dir()
            made_by = {"data_params": data_groups(params), "data_code": data_code()}
            if not force and have and {k: json.loads(stamp.read_text()).get(k) for k in made_by} == made_by:
                print(f"prep {name}: up to date in {dest.relative_to(REPO)}")
                continue
            run_dir = Path(scratch) / name
            params_file = write_params(run_dir, params)
            full = effective(params)  # defaults filled in: `ingest: {}` and the default sources are the same corpus
            key = json.dumps({k: full.get(k) for k in ("seed", "ingest", "clean")}, sort_keys=True, default=str)
            stages = ["ingest", "clean", "tokenizer", "shards"]
            if key in made:  # the same corpus and cleaning: reuse the cleaned text
                shutil.copytree(made[key] / "data" / "clean", run_dir / "data" / "clean")
                stages = ["tokenizer", "shards"]
            for stage in stages:
                t0 = time.monotonic()
                proc = run([sys.executable, "-m", "llm.cli", stage, "--params", str(params_file)], env=env,
                           timeout=1800, log=STATE / "logs" / f"prep-{name}-{stage}.log", cwd=run_dir)
                print(f"prep {name}: llm {stage} {'ok' if proc.ok else 'FAILED'} in {time.monotonic() - t0:.0f} s")
                if not proc.ok:
                    print(f"prep {name}: {proc.error_line()}")
                    ok = False
                    break
            else:
                made[key] = run_dir
                if dest.exists():
                    shutil.rmtree(dest)
                dest.mkdir(parents=True)
                for sub in ("tokenizer", "shards"):
                    shutil.copytree(run_dir / "data" / sub, dest / sub)
                manifest = json.loads((dest / "shards" / "manifest.json").read_text())
                splits = {k: v.get("tokens") for k, v in manifest.get("splits", {}).items()}
                stamp.write_text(json.dumps({"preset": name, "made": now_iso(), **made_by,
                                             "vocab_size": manifest.get("tokenizer", {}).get("vocab_size"),
                                             "tokens": splits}, indent=1, default=str))
                vocab = manifest.get("tokenizer", {}).get("vocab_size")
                print(f"prep {name}: {dest.relative_to(REPO)} (vocab {vocab}, tokens {splits})")
    if wheels:
        done, detail = download_wheels()
        print(f"prep wheels: {'ok' if done else 'FAILED'}: {detail}")
        ok = ok and done
    size = sum(p.stat().st_size for p in STATE.rglob("*") if p.is_file() and "logs" not in p.parts)
    print(f"prep: {STATE.relative_to(REPO)}/ holds {size / 2**20:.1f} MiB; carry it to the GPU machine "
          f"(it is gitignored) and run `make gpu-check` there")
    return 0 if ok else 1


# ------------------------------------------------------------------------------- the check
def child_env(site: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(site)] if site else []
    path += [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", LLM_PROGRESS="0", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


class PartFailed(Exception):
    """A part's failure: its one line, and what it measured before it failed."""

    def __init__(self, message: str, result: dict | None = None, timed_out: bool = False):
        super().__init__(message)
        self.result, self.timed_out = result or {}, timed_out


@dataclass
class Check:
    work: Path
    presets: list[str]
    deadline: float
    rehearsal: bool = False
    overlay: dict = field(default_factory=dict)
    site: Path | None = None
    parts: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, Path] = field(default_factory=dict)  # part -> its run folder
    measured_peak: float | None = None

    @property
    def device(self) -> str:
        return "cpu" if self.rehearsal else "cuda"

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(self.site, extra)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"

    # ------------------------------------------------------------------ run folders
    def new_run(self, name: str, spec: str, *overlays: dict, accum: int = 0) -> Path:
        """work/runs/NAME: the preset plus overlays as params.yaml, the prepped data in data/.
        accum > 0: tokens_per_step set to that many micro-batches of one process."""
        preset, path = preset_name(spec), preset_path(spec)
        if not path.is_file():
            raise PartFailed(f"no preset file {shown(path)}")
        params = deep_merge(load_yaml(path), PREP_OVERLAY.get(preset, {}))  # as its data was made
        for overlay in (*overlays, TRACKING_OFF, REHEARSAL if self.rehearsal else {}, self.overlay):
            params = deep_merge(params, overlay)
        if accum:
            params = deep_merge(params, {"train": {"tokens_per_step": accum * micro_batch(params)}})
        src = PREPPED / preset
        if not (src / "shards" / "manifest.json").is_file() or not (src / "tokenizer").is_dir():
            raise PartFailed(f"no prepped data in {shown(src)}: run `make gpu-prep` on the CPU machine and "
                             "carry .gpu-check/ along")
        run_dir = self.work / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        write_params(run_dir, params)
        for sub in ("tokenizer", "shards"):
            shutil.copytree(src / sub, run_dir / "data" / sub)
        return run_dir

    def stale(self, spec: str) -> bool:
        """The prepped data was made from other data params than the preset's now."""
        stamp = PREPPED / preset_name(spec) / "prep.json"
        if not stamp.is_file():
            return False
        params = deep_merge(load_yaml(preset_path(spec)), PREP_OVERLAY.get(preset_name(spec), {}))
        return json.loads(stamp.read_text()).get("data_params") != data_groups(params)

    def llm(self, args: list[str], run_dir: Path, timeout: float, log: Path, **kw: Any) -> Proc:
        env = self.env(**kw.pop("env", {}))
        return run([sys.executable, "-m", "llm.cli", *args, "--params", str(run_dir / "params.yaml")], env=env,
                   timeout=timeout, log=log, cwd=run_dir, **kw)

    def worker(self, name: str, args: dict, timeout: float, log: Path) -> dict:
        """benchmarks/gpu.py --worker NAME in a subprocess; its JSON result, or PartFailed."""
        proc = run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--args", json.dumps(args)],
                   env=self.env(), timeout=timeout, log=log)
        result = proc.result()
        if result is None:
            raise PartFailed(f"worker {name}: {proc.error_line()}", timed_out=proc.timed_out)
        return result

    # ------------------------------------------------------------------ running parts
    def run_part(self, name: str, cap: float, fn: Callable[[Check, float], dict]) -> dict:
        """fn(check, timeout) -> result; its failure or timeout is recorded, never raised."""
        timeout = min(cap, self.left())
        record: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "timeout_s": round(max(timeout, 0))}
        if timeout < 15:
            record["error"] = "skipped: the check's time budget is spent"
        else:
            t0 = time.monotonic()
            try:
                record.update(fn(self, timeout))
                record["status"] = "ok"
            except PartFailed as e:
                record.update(e.result)
                record.update(status="timeout" if e.timed_out else "failed", error=str(e))
            except Exception as e:  # noqa: BLE001 - a bug in one part must not stop the others
                record.update(status="failed", error=f"{type(e).__name__}: {e}",
                              traceback=traceback.format_exc()[-2000:])
            record["seconds"] = round(time.monotonic() - t0, 1)
        self.parts[name] = record
        line = f"== {name}: {record['status']} in {record['seconds']:.0f} s"
        print(line + (f": {record['error']}" if record.get("error") else ""), flush=True)
        return record


# ------------------------------------------------------------------------------------- parts
def part_env(check: Check, timeout: float) -> dict:
    result = check.worker("env", {"device": check.device}, timeout, check.log("env"))
    check.measured_peak = result.get("measured_matmul_peak")
    broken = [m for m, v in result.get("llm_modules", {}).items() if v != "ok"]
    if not result.get("ok"):
        raise PartFailed(result.get("error", "env worker failed"), result)
    if check.device == "cuda" and not result.get("cuda_available"):
        raise PartFailed("torch sees no CUDA device", result)
    if broken:
        raise PartFailed(f"project modules that do not import: {', '.join(broken)}", result)
    return result


def cuda_test_files() -> list[str]:
    files = {"tests/test_gpu.py"}
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if CUDA_TEST.search(path.read_text(encoding="utf-8", errors="replace")):
            files.add(str(path.relative_to(REPO)))
    return sorted(files)


def junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "not_passed": []}
    if not path.is_file():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        counts["tests"] += 1
        status = "passed"
        for tag, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            el = case.find(tag)
            if el is not None:
                status = key
                counts["not_passed"].append({"test": f"{case.get('classname')}::{case.get('name')}", "status": key,
                                             "message": (el.get("message") or "")[:300]})
                break
        counts[status] += 1
    return counts


def part_tests(check: Check, timeout: float) -> dict:
    files = cuda_test_files()
    junit = check.work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={junit}", *files]
    proc = run(cmd, env=check.env(), timeout=timeout, log=check.log("tests"))
    result = {"files": files, "rc": proc.rc, **junit_counts(junit)}
    if proc.timed_out:
        raise PartFailed(f"pytest timed out after {timeout:.0f} s", result, timed_out=True)
    if not check.rehearsal and result["tests"] and not result["passed"]:
        raise PartFailed(f"every CUDA test was skipped ({result['skipped']}): they did not see the GPU", result)
    if proc.rc != 0 or result["failed"] or result["errors"] or not result["tests"]:
        summary = next((line for _, line in reversed(proc.lines) if re.search(r"passed|failed|error", line)), "")
        raise PartFailed(f"pytest exit code {proc.rc}: {summary.strip()[:300] or proc.error_line()}", result)
    return result


STEP_LINE = re.compile(r"\bstep (\d+)(?:/\d+)?\b.*?(\d[\d,]*(?:\.\d+)?)\s*tok/s")


def throughput_windows(lines: list[tuple[float, str]]) -> list[tuple[float, int, float]]:
    """(second, step, tokens/s) of each logged window of a training run."""
    out = []
    for t, line in lines:
        found = STEP_LINE.search(line)
        if found:
            out.append((t, int(found.group(1)), float(found.group(2).replace(",", ""))))
    return out


def compile_estimate(lines: list[tuple[float, str]], windows: list[tuple[float, int, float]]) -> float | None:
    """Seconds from the line that announces the model to the first window's end, less that
    window's steps at the steady step time: compiling plus the initial val loss."""
    start = next((t for t, line in lines if re.search(r"M param", line)), None)
    if start is None or len(windows) < 3:
        return None
    steps = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(windows[1:], windows[2:]) if b[1] > a[1]]
    if not steps:
        return None
    return round(max(0.0, windows[0][0] - start - windows[0][1] * statistics.median(steps)), 1)


def summarize_train(metrics: dict, proc: Proc, measured_peak: float | None) -> dict:
    windows = throughput_windows(proc.lines)
    steady = statistics.median(w[2] for w in windows[1:]) if len(windows) > 1 else None
    tps, fpt, peak = metrics.get("tokens_per_sec"), metrics.get("flops_per_token"), metrics.get("peak_flops")
    processes = metrics.get("processes") or 1

    def mfu(rate: float | None, against: float | None) -> float | None:
        return round(rate * fpt / against, 4) if rate and fpt and against else None

    text = proc.text()
    return {
        **{k: metrics.get(k) for k in ("steps", "stopped_by", "tokens_seen", "train_seconds", "device", "params")},
        "processes": processes, "flops_per_token": fpt, "tokens_per_sec": tps,
        "tokens_per_sec_per_device": metrics.get("tokens_per_sec_per_device") or (tps and round(tps / processes)),
        "tokens_per_sec_steady": round(steady) if steady else None, "steady_windows": max(0, len(windows) - 1),
        "mfu": metrics.get("mfu"), "peak_flops": peak, "peak_source": metrics.get("peak_source"),
        "mfu_steady": mfu(steady, peak),
        "measured_matmul_peak": measured_peak,
        "mfu_vs_measured_peak": mfu(tps, measured_peak), "mfu_steady_vs_measured_peak": mfu(steady, measured_peak),
        "compile_seconds": metrics.get("compile_seconds"),
        "compile_seconds_estimate": compile_estimate(proc.lines, windows),
        "peak_memory_bytes": metrics.get("peak_memory_bytes"), "nvidia_smi_max_memory_mib": proc.max_gpu_mib,
        "graph_breaks_logged": len(re.findall(r"Graph break\b.*in user code", text)),
        "recompiles_logged": text.count("Recompiling function"),
        "initial_val_loss": metrics.get("initial_val_loss"), "final_val_loss": metrics.get("final_val_loss"),
    }


def part_train(spec: str) -> Callable[[Check, float], dict]:
    def part(check: Check, timeout: float) -> dict:
        name = preset_name(spec)
        short = SHORT_RUN.get(name, SHORT_RUN_DEFAULT)
        steps = REHEARSAL_STEPS if check.rehearsal else short["train"]["max_steps"]
        cut = {"train": {"max_steps": steps, "eval_interval": steps, "checkpoint_interval": steps,
                         "warmup_steps": max(1, steps // 5), "eval_tokens": 131072}}
        if check.rehearsal:
            cut["train"]["log_interval"] = 2
        run_dir = check.new_run(f"train-{name}", spec, RUN_OVERLAY, short, cut)
        check.runs[f"train:{name}"] = run_dir
        proc = check.llm(["train", "--restart"], run_dir, timeout, check.log(f"train-{name}"),
                         sample_gpu=not check.rehearsal, env={"TORCH_LOGS": "graph_breaks,recompiles"})
        base = {"run": str(run_dir), "data_stale": check.stale(spec)}
        metrics_file = run_dir / "metrics" / "train.json"
        if not proc.ok or not metrics_file.is_file():
            raise PartFailed(proc.error_line(), base, timed_out=proc.timed_out)
        result = {**base, **summarize_train(json.loads(metrics_file.read_text()), proc, check.measured_peak)}
        impossible = {k: result[k] for k in ("mfu", "mfu_steady", "mfu_vs_measured_peak") if (result[k] or 0) > 1}
        if impossible:  # more FLOP/s than the peak: a timer or a count is wrong
            raise PartFailed(f"MFU above 100 %: {impossible} (tokens_per_sec {result['tokens_per_sec']}, "
                             f"{result['tokens_seen']} tokens in {result['train_seconds']} s)", result)
        return result

    return part


def part_resume(check: Check, timeout: float) -> dict:
    spec = check.presets[0]
    deadline = time.monotonic() + timeout
    left = lambda: deadline - time.monotonic()
    result: dict[str, Any] = {"preset": preset_name(spec), "kill_step": KILL_STEP, "loss_tol": RESUME_LOSS_TOL,
                              "weight_tol": RESUME_WEIGHT_TOL}
    overlays = (RUN_OVERLAY, RESUME_RUN)
    a = check.new_run("resume-a", spec, *overlays, accum=RESUME_ACCUM)
    check.runs["resume"] = a
    proc = check.llm(["train", "--restart"], a, left(), check.log("resume-a"))
    if not proc.ok:
        raise PartFailed(f"uninterrupted run: {proc.error_line()}", result, timed_out=proc.timed_out)
    b = check.new_run("resume-b", spec, *overlays, accum=RESUME_ACCUM)
    proc = check.llm(["train", "--restart"], b, left(), check.log("resume-b-killed"),
                     env={"LLM_FAULT_POINT": f"train.checkpoint.{KILL_STEP}"})
    result["killed_rc"] = proc.rc
    if proc.timed_out or proc.rc != -signal.SIGKILL:
        raise PartFailed(f"the run to kill did not die by SIGKILL at its step-{KILL_STEP} checkpoint: "
                         f"{proc.error_line()}", result, timed_out=proc.timed_out)
    proc = check.llm(["train", "--resume"], b, left(), check.log("resume-b-resumed"))
    resumed = re.search(r"resum\w* .*? at step (\d+)", proc.text())  # --resume fails without a checkpoint
    result["resumed_at_step"] = int(resumed.group(1)) if resumed else None  # None: the log line was reworded
    if not proc.ok:
        raise PartFailed(f"resumed run: {proc.error_line()}", result, timed_out=proc.timed_out)
    dirs = {"uninterrupted": str(a), "resumed": str(b)}
    if left() > 60:  # a second uninterrupted run: how far CUDA alone moves the numbers
        c = check.new_run("resume-c", spec, *overlays, accum=RESUME_ACCUM)
        if check.llm(["train", "--restart"], c, left() - 30, check.log("resume-c")).ok:
            dirs["baseline"] = str(c)
    result.update(check.worker("compare", dirs, max(15.0, left()), check.log("resume-compare")))
    res = result.get("resumed", {})
    result["ok"] = bool(result.get("resumed_at_step") in (KILL_STEP, None) and res.get("same_steps")
                        and res.get("val_loss_diff") is not None and res["val_loss_diff"] <= RESUME_LOSS_TOL
                        and res.get("weight_rel_l2") is not None and res["weight_rel_l2"] <= RESUME_WEIGHT_TOL)
    if not result["ok"]:
        raise PartFailed(f"resumed run differs: resumed at step {result.get('resumed_at_step')}, val loss diff "
                         f"{res.get('val_loss_diff')} (tol {RESUME_LOSS_TOL}), weight rel L2 "
                         f"{res.get('weight_rel_l2')} (tol {RESUME_WEIGHT_TOL})", result)
    return result


def part_export(check: Check, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    candidates = [check.runs.get("resume"), check.runs.get(f"train:{preset_name(check.presets[0])}")]
    src = next((d for d in candidates if d and (d / "models" / "final" / "model.safetensors").is_file()), None)
    if src is None:
        raise PartFailed("no trained model to export (the resume and train parts made none)")
    proc = check.llm(["export"], src, deadline - time.monotonic(), check.log("export"))
    result: dict[str, Any] = {"run": str(src), "export_rc": proc.rc}
    hf = src / "models" / "hf"
    if not (hf / "config.json").is_file():
        raise PartFailed(f"llm export: {proc.error_line()}", result, timed_out=proc.timed_out)
    parity = check.worker("parity", {"run": str(src), "device": check.device, "tol": LOGIT_TOL[check.device]},
                          max(15.0, deadline - time.monotonic()), check.log("export-parity"))
    result.update(parity)
    if not proc.ok:
        raise PartFailed(f"llm export exit code {proc.rc} (models/hf was written): {proc.error_line()}", result)
    if not parity.get("ok"):
        raise PartFailed(parity.get("error") or f"HF logits differ from ours by {parity.get('max_abs_logit_diff')} "
                         f"(tol {LOGIT_TOL[check.device]}) or the tokenizers disagree", result)
    return result


def part_ddp(check: Check, timeout: float) -> dict:
    run_dir = check.new_run("ddp", check.presets[0], RUN_OVERLAY, DDP_RUN, accum=DDP_ACCUM)
    backend = "gloo" if check.rehearsal else "nccl"
    result = check.worker("ddp", {"run": str(run_dir), "backend": backend}, timeout, check.log("ddp"))
    if not result.get("ok"):
        raise PartFailed(result.get("error", "ddp worker failed"), result)
    return result


def part_graph_breaks(check: Check, timeout: float) -> dict:
    runs = {}
    for spec in check.presets:
        name = preset_name(spec)
        run_dir = check.runs.get(f"train:{name}")
        if run_dir is None or not (run_dir / "params.yaml").is_file():
            try:
                run_dir = check.new_run(f"graph-{name}", spec, RUN_OVERLAY)
            except PartFailed as e:
                runs[name] = {"error": str(e)}
                continue
        runs[name] = str(run_dir)
    todo = {k: v for k, v in runs.items() if isinstance(v, str)}
    result = check.worker("graph_breaks", {"runs": todo, "device": check.device}, timeout, check.log("graph_breaks"))
    result.update({k: v for k, v in runs.items() if not isinstance(v, str)})
    failed = [k for k, v in result.items() if isinstance(v, dict) and v.get("error")]
    if failed or not result.get("ok"):
        why = f"no graph count for {', '.join(failed) or '?'}: {result.get('error', '')}"
        raise PartFailed(why.rstrip(": "), result)
    return result


PART_CAPS = {"env": 60, "tests": 120, "train": 160, "resume": 120, "export": 80, "ddp": 80, "graph_breaks": 60}


def plan(presets: list[str], only: set[str] | None) -> list[tuple[str, float, Callable[[Check, float], dict]]]:
    parts: list[tuple[str, float, Callable[[Check, float], dict]]] = [
        ("env", PART_CAPS["env"], part_env), ("tests", PART_CAPS["tests"], part_tests)]
    parts += [(f"train:{preset_name(p)}", PART_CAPS["train"], part_train(p)) for p in presets]
    parts += [("resume", PART_CAPS["resume"], part_resume), ("export", PART_CAPS["export"], part_export),
              ("ddp", PART_CAPS["ddp"], part_ddp), ("graph_breaks", PART_CAPS["graph_breaks"], part_graph_breaks)]
    return [p for p in parts if only is None or p[0].split(":")[0] in only or p[0] in only]


# ------------------------------------------------------------------------------------ report
def headline(doc: dict) -> dict:
    parts = doc["parts"]
    env, tests = parts.get("env", {}), parts.get("tests", {})
    head: dict[str, Any] = {"gpu": env.get("gpu_name"), "torch": env.get("torch"), "cuda": env.get("cuda_runtime"),
                            "bf16": env.get("bf16_supported"), "measured_matmul_peak": env.get("measured_matmul_peak"),
                            "tests": {k: tests.get(k) for k in ("passed", "failed", "errors", "skipped")}}
    for name, part in parts.items():
        if name.startswith("train:"):
            keys = ("tokens_per_sec", "tokens_per_sec_steady", "mfu", "mfu_steady", "mfu_steady_vs_measured_peak",
                    "peak_memory_bytes", "compile_seconds")
            head[name] = {k: part.get(k) for k in keys}
    head["resume"] = parts.get("resume", {}).get("resumed")
    head["export_max_abs_logit_diff"] = parts.get("export", {}).get("max_abs_logit_diff")
    head["ddp_completed"] = parts.get("ddp", {}).get("completed")
    head["failed_parts"] = [n for n, p in parts.items() if p.get("status") != "ok"]
    return head


def part_detail(name: str, part: dict) -> str:
    if part.get("status") != "ok":
        return str(part.get("error", ""))[:110]
    if name == "env":
        return (f"{part.get('gpu_name') or part.get('device_name')}, torch {part.get('torch')}, CUDA "
                f"{part.get('cuda_runtime')}, bf16 {part.get('bf16_supported')}, measured peak "
                f"{fmt(_tflops(part.get('measured_matmul_peak')), '.3g')} TFLOP/s")
    if name == "tests":
        return f"{part.get('passed')} passed, {part.get('failed')} failed, {part.get('skipped')} skipped"
    if name.startswith("train:"):
        return f"{part.get('steps')} steps, {fmt(part.get('tokens_per_sec_steady'))} tok/s steady"
    if name == "resume":
        r = part.get("resumed", {})
        return f"val loss diff {fmt(r.get('val_loss_diff'), '.2e')}, weight rel L2 {fmt(r.get('weight_rel_l2'), '.2e')}"
    if name == "export":
        return f"{part.get('architecture')}: max |logit diff| {fmt(part.get('max_abs_logit_diff'), '.1e')}"
    if name == "ddp":
        return f"{part.get('steps')} steps, collectives on {part.get('collective_devices')}"
    if name == "graph_breaks":
        return ", ".join(f"{k}: {v.get('graph_breaks')} breaks" for k, v in part.items() if isinstance(v, dict))
    return ""


def _tflops(flops: float | None) -> float | None:
    return flops / 1e12 if flops else None


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f} %" if x is not None else "-"


def render(doc: dict) -> str:
    parts = doc["parts"]
    rows = [[name, p.get("status"), f"{p.get('seconds', 0):.0f}", part_detail(name, p)] for name, p in parts.items()]
    out = [table(["part", "status", "s", "detail"], rows)]
    train = [(n, p) for n, p in parts.items() if n.startswith("train:") and p.get("tokens_per_sec")]
    if train:
        mib = lambda p: p.get("peak_memory_bytes") / 2**30 if p.get("peak_memory_bytes") else None
        out.append(table(
            ["preset", "steps", "tok/s", "tok/s/dev", "steady tok/s", "MFU", "MFU steady", "MFU vs meas.", "peak GiB",
             "smi MiB", "compile s", "breaks", "val loss"],
            [[n.split(":", 1)[1], p.get("steps"), p.get("tokens_per_sec"), p.get("tokens_per_sec_per_device"),
              p.get("tokens_per_sec_steady"), _pct(p.get("mfu")), _pct(p.get("mfu_steady")),
              _pct(p.get("mfu_steady_vs_measured_peak")), fmt(mib(p), ".1f"), fmt(p.get("nvidia_smi_max_memory_mib")),
              fmt(p.get("compile_seconds") or p.get("compile_seconds_estimate")), p.get("graph_breaks_logged"),
              p.get("final_val_loss")] for n, p in train]))
        peaks = {p.get("peak_source") for _, p in train} - {None}
        measured = fmt(_tflops(doc["headline"].get("measured_matmul_peak")), ".3g")
        out.append(f"MFU against {', '.join(sorted(peaks)) or 'llm.device peak_flops'}; 'vs meas.' against the "
                   f"measured matmul peak ({measured} TFLOP/s). Steady: median of the logged windows after the first "
                   "(which compiles).")
    return "\n\n".join(out)


def output_path(gpu: str, work: Path, rehearsal: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    if rehearsal:
        return work / "gpu_check.json"
    return RESULTS / f"gpu_check-{slug(gpu)}.json"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_main(args: argparse.Namespace) -> int:
    started, t0 = now_iso(), time.monotonic()
    if not args.rehearse_on_cpu:
        reason = no_cuda_reason() or torch_cuda_reason(sys.executable, child_env(None))
        if reason:
            print(f"gpu-check: no CUDA device ({reason}); nothing checked")
            return 0
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    smi = nvidia_smi() if not args.rehearse_on_cpu else {}
    gpu = (smi.get("gpus") or [{}])[0].get("name") or ("cpu-rehearsal" if args.rehearse_on_cpu else "cuda")
    wheels = install_wheels(work / "site")
    sys.path[:0] = [p for p in (wheels.get("site"), str(REPO)) if p]  # yaml (and llm.config) for this process too
    presets = [p for p in args.presets.split(",") if p]
    overlay = load_overlay(args.override)
    check = Check(work=work, presets=presets, deadline=time.monotonic() + args.budget, rehearsal=args.rehearse_on_cpu,
                  overlay=overlay, site=Path(wheels["site"]) if wheels.get("site") else None)
    out_path = output_path(gpu, work, args.rehearse_on_cpu)
    doc: dict[str, Any] = {"check": "gpu-check", "started": started, "rehearsal_on_cpu": args.rehearse_on_cpu,
                           "commit": git_commit(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                           "nvidia_smi": smi, "wheels": wheels, "presets": presets, "overlay": overlay,
                           "budget_s": args.budget, "work": str(work), "parts": check.parts}
    print(f"gpu-check on {gpu}: {len(presets)} preset(s), budget {args.budget:.0f} s, work folder {work}", flush=True)
    only = set(args.parts.split(",")) if args.parts else None
    for name, cap, fn in plan(presets, only):
        check.run_part(name, cap, fn)
        write_doc(doc, out_path, t0)
    doc = write_doc(doc, out_path, t0)
    print()
    print(render(doc))
    print(f"\nwrote {out_path}; logs in {work / 'logs'}")
    if os.environ.get("OUT"):
        with tarfile.open(Path(os.environ["OUT"]) / "gpu_check_logs.tar.gz", "w:gz") as tar:
            tar.add(work / "logs", arcname="logs")
    return 0 if doc["ok"] else 1


def write_doc(doc: dict, path: Path, t0: float) -> dict:
    doc["finished"], doc["seconds"] = now_iso(), round(time.monotonic() - t0, 1)
    doc["ok"] = bool(doc["parts"]) and all(p.get("status") == "ok" for p in doc["parts"].values())
    doc["headline"] = headline(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return doc


def load_overlay(text: str | None) -> dict:
    if not text:
        return {}
    import yaml

    data = yaml.safe_load(Path(text[1:]).read_text() if text.startswith("@") else text)
    if not isinstance(data, dict):
        raise SystemExit(f"--override: expected a YAML mapping, got {text!r}")
    return data


# ------------------------------------------------------------------------------------ workers
# Each runs in its own subprocess (torch is imported there, never in the check's own process)
# and prints RESULT_MARK + JSON as its last line.
def worker_env(args: dict) -> dict:
    import importlib
    from importlib import metadata

    import torch

    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "cuda_runtime": torch.version.cuda, "cuda_available": cuda,
                           "device_count": torch.cuda.device_count() if cuda else 0}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        out.update(gpu_name=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported(),
                   cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   float32_matmul_precision=torch.get_float32_matmul_precision())
        with contextlib.suppress(Exception):
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    deps = {}
    for module, dist in DEPS.items():
        try:
            importlib.import_module(module)
            try:
                deps[module] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                deps[module] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure to import is the answer
            deps[module] = f"missing: {type(e).__name__}: {e}"[:200]
    out["deps"] = deps
    mods = {}
    for module in LLM_MODULES:
        try:
            importlib.import_module(module)
            mods[module] = "ok"
        except Exception as e:  # noqa: BLE001
            mods[module] = f"{type(e).__name__}: {e}"[:300]
    out["llm_modules"] = mods
    from llm.device import measure_matmul_peak, peak_flops, pick_device

    device = pick_device(args["device"])
    out["device_name"] = device.name
    out["device_dtype"] = str(device.dtype).replace("torch.", "")
    peak, source = peak_flops(device)
    out.update(project_peak_flops=peak, project_peak_source=source)
    out["measured_matmul_peak"] = measure_matmul_peak(device, seconds=2.0)
    out["measured_matmul_dtype"] = out["device_dtype"]
    return out


def _weights(run_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "models" / "final" / "model.safetensors"))


def worker_compare(args: dict) -> dict:
    """Final val loss and weights of the resumed (and the baseline) run against the uninterrupted one."""
    import torch

    ref_dir = args["uninterrupted"]
    ref, ref_metrics = _weights(ref_dir), json.loads((Path(ref_dir) / "metrics" / "train.json").read_text())
    out: dict[str, Any] = {"uninterrupted_val_loss": ref_metrics.get("final_val_loss"),
                           "steps": ref_metrics.get("steps")}
    for key in ("resumed", "baseline"):
        if key not in args:
            continue
        other = _weights(args[key])
        metrics = json.loads((Path(args[key]) / "metrics" / "train.json").read_text())
        diff2 = sum(float((other[k].float() - ref[k].float()).pow(2).sum()) for k in ref)
        norm2 = sum(float(ref[k].float().pow(2).sum()) for k in ref)
        loss, ref_loss = metrics.get("final_val_loss"), ref_metrics.get("final_val_loss")
        out[key] = {"val_loss": loss, "val_loss_diff": abs(loss - ref_loss) if None not in (loss, ref_loss) else None,
                    "same_steps": metrics.get("steps") == ref_metrics.get("steps"),
                    "same_keys": other.keys() == ref.keys(),
                    "weight_rel_l2": (diff2 / norm2) ** 0.5 if norm2 else None,
                    "weight_max_abs_diff": max(float((other[k].float() - ref[k].float()).abs().max()) for k in ref),
                    "bit_identical": all(torch.equal(other[k], ref[k]) for k in ref)}
    return out


def worker_parity(args: dict) -> dict:
    """Hugging Face's model from models/hf against ours from models/final, in fp32 on args.device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm.artifacts import load_final

    run_dir, device = Path(args["run"]), args["device"]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    ours, tok, _ = load_final(run_dir / "models" / "final", device=device)
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "hf", dtype=torch.float32).to(device).eval()
    hf_tok = AutoTokenizer.from_pretrained(run_dir / "models" / "hf")
    block, vocab = ours.config.block_size, ours.config.vocab_size
    try:
        from llm.evaluate import cover_val

        stream = cover_val(run_dir / "data" / "shards", 4 * block).stream
        rows = max(1, min(4, len(stream) // block))
        x = torch.as_tensor(stream[: rows * block].astype("int64")).reshape(rows, block)
        source = "val tokens"
    except Exception:  # noqa: BLE001 - the logits compare on any tokens
        x = torch.randint(0, vocab, (4, block), generator=torch.Generator().manual_seed(0))
        source = "random tokens"
    x = x.to(device)
    with torch.no_grad():
        mine = ours(x)
        mine = mine[0] if isinstance(mine, tuple) else mine
        theirs = hf(x).logits
        diff = float((theirs.float() - mine.float()).abs().max())
        agree = float((theirs.argmax(-1) == mine.argmax(-1)).float().mean())
    out: dict[str, Any] = {"architecture": type(hf).__name__, "tokens": source, "shape": list(x.shape),
                           "max_abs_logit_diff": diff, "tol": args["tol"], "argmax_agreement": agree}
    sp = getattr(tok, "sp", None)
    text = sp.decode(x[0, :256].tolist()) if sp is not None else "ROMEO:\nWhat light through yonder window breaks?"
    ids_ours, ids_hf = tok.encode(text), hf_tok(text, add_special_tokens=False)["input_ids"]
    out["tokenizer_ids_equal"] = list(ids_ours) == list(ids_hf)
    out["tokenizer_text_chars"] = len(text)
    try:  # informational: a near-tie can flip an argmax between two correct fp32 computations
        from llm.sample import SamplingParams, generate

        prompt = tok.encode("ROMEO:")
        mine_ids = generate(ours, prompt, SamplingParams(max_new_tokens=20, temperature=0.0), tok.eos_id)
        gen = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=20, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        if tok.eos_id in gen:
            gen = gen[: gen.index(tok.eos_id)]
        out["greedy_match"] = list(mine_ids) == gen
    except Exception as e:  # noqa: BLE001
        out["greedy_match"] = f"not compared: {type(e).__name__}: {e}"[:200]
    out["ok"] = diff <= args["tol"] and out["tokenizer_ids_equal"]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Tee(io.TextIOBase):
    def __init__(self, *streams: Any):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def worker_ddp(args: dict) -> dict:
    """`llm train` (llm.cli.main, in this process) with DDP over a one-rank process group: llm.train
    believes there are 2 processes, so it wraps the model in DDP and reduces through Dist. NCCL
    itself refuses a collective on a CPU tensor; those called from Python are recorded too."""
    import torch
    import torch.distributed as tdist

    backend, run_dir = args["backend"], Path(args["run"])
    seen: list[dict] = []

    def recording(op: str, fn: Callable) -> Callable:
        def call(tensor, *a, **kw):
            t = tensor[0] if isinstance(tensor, list | tuple) and tensor else tensor
            seen.append({"op": op, "device": getattr(getattr(t, "device", None), "type", "?")})
            return fn(tensor, *a, **kw)

        return call

    for op in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        if hasattr(tdist, op):
            setattr(tdist, op, recording(op, getattr(tdist, op)))

    import llm.distributed
    import llm.train
    from llm.cli import main as llm_main
    from llm.distributed import Dist

    def init_one_rank(device: Any) -> Dist:  # llm.device.Device (or, in older code, its type)
        kind = getattr(device, "type", device)
        where = getattr(device, "torch_device", None) or torch.device(kind, 0 if kind == "cuda" else None)
        kw = {"device_id": where} if backend == "nccl" else {}
        tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, **kw)
        has_device = "device" in {f.name for f in dataclasses.fields(Dist)}
        return Dist(rank=0, local_rank=0, world_size=2, **({"device": where} if has_device else {}))

    llm.train.init_distributed = llm.distributed.init_distributed = init_one_rank
    out: dict[str, Any] = {"backend": backend, "setup": "llm train with Dist(world_size=2) over a 1-rank process group "
                           "on one device: DDP wrapper, no_sync, Dist.mean and Dist.any all-reduces",
                           "note": "the loss it logs is halved (Dist.mean divides by 2); the numbers are not a result"}
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(_Tee(sys.stderr, captured)):
            rc = llm_main(["train", "--params", str(run_dir / "params.yaml"), "--restart"])
    except Exception as e:  # noqa: BLE001 - the error is the result
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/llm/" in f.filename.replace(os.sep, "/")][-3:]
        rc = None
        out.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                   where=[f"llm/{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames])
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
    metrics = run_dir / "metrics" / "train.json"
    summary = json.loads(metrics.read_text()) if metrics.is_file() else {}
    devices = sorted({c["device"] for c in seen})
    out.update(rc=rc, completed=rc == 0 and bool(summary), steps=summary.get("steps"),
               processes=summary.get("processes"), collectives_from_python=len(seen), collective_devices=devices)
    if rc not in (0, None) and "error" not in out:
        errors = [line for line in captured.getvalue().splitlines() if line.startswith("error:")]
        out["error"] = errors[-1][:400] if errors else f"llm train exit code {rc}"
    want = "cuda" if backend == "nccl" else "cpu"
    if set(devices) - {want}:
        out["error"] = f"collectives ran on {devices}, expected only {want}"
    out["ok"] = out["completed"] and "error" not in out
    return out


def worker_graph_breaks(args: dict) -> dict:
    """torch._dynamo.explain of each preset's model on one batch: graphs, graph breaks and why."""
    import torch

    from llm.config import load_params
    from llm.device import pick_device
    from llm.model import GPT, GPTConfig

    device = pick_device(args["device"])
    out: dict[str, Any] = {}
    for name, run_dir in args["runs"].items():
        try:
            params = load_params(Path(run_dir) / "params.yaml")
            manifest = json.loads((Path(run_dir) / "data" / "shards" / "manifest.json").read_text())
            cfg = GPTConfig(vocab_size=manifest["tokenizer"]["vocab_size"], **params.model.model_dump())
            model = GPT(cfg).to(device.torch_device)
            x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), device=device.torch_device)
            torch._dynamo.reset()
            with device.autocast():
                ex = torch._dynamo.explain(model)(x, torch.roll(x, -1, 1))
            out[name] = {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count,
                         "reasons": [str(getattr(r, "reason", r))[:200] for r in ex.break_reasons][:5]}
            del model
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    out["ok"] = all("error" not in v for v in out.values())
    return out


WORKERS: dict[str, Callable[[dict], dict]] = {"env": worker_env, "compare": worker_compare, "parity": worker_parity,
                                              "ddp": worker_ddp, "graph_breaks": worker_graph_breaks}


def worker_main(name: str, args: dict) -> int:
    sys.path.insert(0, str(REPO))
    try:
        result = WORKERS[name](args)
        result.setdefault("ok", True)
    except Exception as e:  # noqa: BLE001 - reported as the worker's result
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-3000:]}
    print(RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0


# --------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="check", choices=["check", "prep"],
                        help="check (default): the GPU check; prep: data and wheels for it, on the CPU machine")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help="comma-separated preset names (presets/NAME.yaml) or params files; the first one is "
                             f"also used by resume, export and ddp (default {','.join(DEFAULT_PRESETS)})")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"check: seconds for all parts together (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--parts", default="", help="check: only these parts, comma-separated "
                        "(env, tests, train, resume, export, ddp, graph_breaks)")
    parser.add_argument("--work", default="", help="check: the scratch folder (default: a new one under the temp dir)")
    parser.add_argument("--override", default="", help="YAML mapping (or @file) deep-merged into every params file "
                        "the check or prep writes; a null deletes a key, e.g. '{tracking: {enabled: null}}'")
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="check: run every part on this CPU with a tiny model and gloo, to prove the plumbing "
                             "before a GPU run; nothing it measures is a GPU number")
    parser.add_argument("--force", action="store_true", help="prep: remake the data even if it is up to date")
    parser.add_argument("--no-wheels", action="store_true", help="prep: skip the wheel download")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.args))
    if args.mode == "prep":
        presets = [p for p in args.presets.split(",") if p]
        return prep(presets, load_overlay(args.override), args.force, not args.no_wheels)
    return check_main(args)


if __name__ == "__main__":
    sys.exit(main())
