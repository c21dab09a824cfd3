"""Corrupted artifacts: each gives one `error:` line naming the file (exit code 2), never a
traceback and never silent use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm.layout import Layout
from llm.train import train
from tests.conftest import deep_merge, load, project_env, write_params


def own_copy(built, tmp_path: Path, **override) -> Path:
    """A project with its own copy of the built data (the tests corrupt it)."""
    root, params = built
    for name in ("raw", "clean", "tokenizer", "shards"):
        shutil.copytree(getattr(Layout(root), name), getattr(Layout(tmp_path), name))
    write_params(tmp_path, deep_merge(params.model_dump(mode="json"), override))
    return tmp_path


def llm(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = project_env()
    return subprocess.run([sys.executable, "-m", "llm.cli", *args, "--params", str(root / "params.yaml")], env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess, names: Path) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(names) in lines[0], proc.stderr[-2000:]
    return lines[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_flipped_byte_in_a_shard_stops_training_before_the_first_step(built, tmp_path: Path):
    root = own_copy(built, tmp_path)
    shard = sorted(Layout(root).shards.glob("train/*.arrow"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    line = one_error_line(llm(root, "train"), shard)
    assert "sha256 differs from manifest.json" in line
    assert not Layout(root).checkpoints.exists()  # not a step was taken


def test_a_truncated_checkpoint_is_named_not_resumed(built, tmp_path: Path):
    root = own_copy(built, tmp_path)
    train(load(root), Layout(root))
    ckpt = Layout(root).checkpoints / "last.pt"
    truncate(ckpt)
    line = one_error_line(llm(root, "train"), ckpt)
    assert "unreadable checkpoint" in line and "--restart" in line
    proc = llm(root, "train", "--restart")  # the way out the line names
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_truncated_weights_are_named_by_evaluate(built, tmp_path: Path):
    root = own_copy(built, tmp_path)
    train(load(root), Layout(root))
    weights = Layout(root).final / "model.safetensors"
    truncate(weights)
    line = one_error_line(llm(root, "evaluate"), weights)
    assert "unreadable weights" in line


@pytest.mark.parametrize("stage, table", [("clean", "raw"), ("shards", "clean"), ("tokenizer", "clean")])
def test_a_truncated_parquet_part_is_named_by_the_stage_that_reads_it(built, tmp_path: Path, stage: str, table: str):
    root = own_copy(built, tmp_path)
    part = sorted(getattr(Layout(root), table).glob("part-*.parquet"))[-1]
    truncate(part, 0.7)
    line = one_error_line(llm(root, stage), part)
    assert "unreadable Parquet part" in line
