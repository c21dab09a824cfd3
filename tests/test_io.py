from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm.io import atomic_dir, atomic_file, read_json, write_json


def test_atomic_dir_replaces_the_old_output_only_on_success(tmp_path: Path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("second, half written")
            raise RuntimeError("killed mid-way")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("third")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path):
    # A process that is gone left its temporary directory behind.
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    stale = tmp_path / f".out.tmp-{dead_pid}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "ok").write_text("y")
    assert not stale.exists()
    assert not (tmp_path / f".out.tmp-{os.getpid()}").exists()  # ours was renamed into place
    assert (tmp_path / "out" / "ok").exists()


def test_atomic_file_and_json(tmp_path: Path):
    write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert read_json(tmp_path / "m.json") == {"a": [1, 2], "b": 1}
    assert (tmp_path / "m.json").read_text().startswith('{\n  "a"')
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "m.json") as f:
            f.write("garbage")
            raise ValueError
    assert read_json(tmp_path / "m.json") == {"a": [1, 2], "b": 1}
