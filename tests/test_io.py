from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm.io import atomic_dir, atomic_file, read_json, remove_stale_outputs, remove_stale_siblings, write_json
from llm.layout import Layout


def test_atomic_dir_replaces_the_old_output_only_on_success(tmp_path: Path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
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
    with pytest.raises(ValueError), atomic_file(tmp_path / "m.json") as f:
        f.write("garbage")
        raise ValueError
    assert read_json(tmp_path / "m.json") == {"a": [1, 2], "b": 1}


WRITE_SECOND = """
import sys
from pathlib import Path
from llm.io import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "a.txt").write_text("second")
"""


def write_second_and_die_at(out: Path, point: str, exchange: bool) -> subprocess.CompletedProcess:
    """A process that replaces `out` and SIGKILLs itself at `point` (no cleanup runs)."""
    env = {**os.environ, "LLM_FAULT_POINT": point}
    if not exchange:
        env["LLM_NO_RENAME_EXCHANGE"] = "1"
    return subprocess.run([sys.executable, "-c", WRITE_SECOND, str(out)], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("point, exchange, survivor", [
    ("atomic_dir.written", True, "first"),            # finished writing, not yet swapped
    ("atomic_dir.exchanged", True, "second"),         # swapped in one step, the old copy not yet removed
    ("atomic_dir.written", False, "first"),
    ("atomic_dir.between_renames", False, "first"),   # old moved aside, new not yet in place: the window
])
def test_a_kill_at_any_instant_leaves_the_old_output_or_the_new_one(tmp_path: Path, point: str, exchange: bool,
                                                                    survivor: str):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    proc = write_second_and_die_at(out, point, exchange)
    assert proc.returncode == -9, proc.stderr
    if point == "atomic_dir.between_renames":
        assert not out.exists()  # the instant itself: only the aside copy holds the output ...
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
        remove_stale_siblings(tmp_path)  # ... which the next run of any stage puts back
    else:
        assert (out / "a.txt").read_text() == survivor
        remove_stale_siblings(tmp_path)
    assert (out / "a.txt").read_text() == survivor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left behind


def test_a_file_killed_before_its_rename_keeps_the_previous_one(tmp_path: Path):
    out = tmp_path / "m.json"
    write_json(out, {"v": 1})
    code = "import sys; from llm.io import write_json; write_json(sys.argv[1], {'v': 2})"
    proc = subprocess.run([sys.executable, "-c", code, str(out)],
                          env={**os.environ, "LLM_FAULT_POINT": "atomic_file.written"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert read_json(out) == {"v": 1}
    # the finished new file, never renamed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.json.tmp-")]
    remove_stale_siblings(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_the_next_stage_removes_what_any_killed_stage_left(tmp_path: Path):
    """A killed `clean` leaves data/.clean.tmp-PID; the next command is `llm shards`, not clean."""
    layout = Layout(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = [layout.data / f".clean.tmp-{int(dead.stdout)}",
                 layout.checkpoints / f".last.pt.tmp-{int(dead.stdout)}",
                 layout.metrics_dir / f".train.json.tmp-{int(dead.stdout)}"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half")
    alive = layout.data / f".raw.tmp-{os.getpid()}"  # a running stage's work is not touched
    alive.write_text("in progress")
    remove_stale_outputs(layout)
    assert not any(p.exists() for p in leftovers)
    assert alive.exists()
