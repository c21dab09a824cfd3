"""Atomic outputs: every artifact is written beside its final path and renamed into place.

A stage killed half-way leaves the previous artifact (or nothing), never a half-written one
that the next stage would read. Also the one Markdown code-fence rule that the report and the
Dagster asset pages share.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.faults import fault_point

log = logging.getLogger(__name__)


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)$")


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def _pid_alive(pid: int, since: float) -> bool:
    """Whether the process that made a sibling at time `since` still runs: not if it is gone,
    a zombie nobody reaped (a killed stage's parent died too), or a later process that got
    the same pid."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= since + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def remove_stale_siblings(directory: Path) -> None:
    """Temporary siblings in `directory` left by runs that were killed (SIGKILL, power loss)
    before they could clean up: those whose process is gone. An `old` copy whose output is
    missing is the last good output (a kill between the two renames of the fallback swap): it
    is put back, never deleted."""
    if not directory.is_dir():
        return
    for p in sorted(directory.iterdir()):
        m = _STALE.match(p.name)
        if m is None or _pid_alive(int(m["pid"]), p.lstat().st_mtime):
            continue
        target = directory / m["name"]
        if m["tag"] == "old" and not target.exists():
            log.warning("restoring %s from %s, left by a killed run", target, p.name)
            p.rename(target)
        else:
            log.info("removing %s, left by a killed run", p)
            _remove(p)


def remove_stale_outputs(layout) -> None:
    """What a killed stage left anywhere in the project's outputs, whichever stage runs next."""
    dirs = {d for out in layout.outputs() for d in (out.parent, out)}
    for d in sorted(dirs):
        remove_stale_siblings(d)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux") or os.environ.get("LLM_NO_RENAME_EXCHANGE"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` at `path`. A SIGKILL at any instant leaves either the
    previous `path` or the new one: one atomic exchange where the system has it; otherwise two
    renames, and a kill between them leaves the previous output as `.NAME.old-PID`, which the
    next run of any stage puts back (remove_stale_siblings)."""
    if not path.exists():
        tmp.rename(path)
        return
    if _exchange(tmp, path):
        fault_point("atomic_dir.exchanged")
        _remove(tmp)  # now the previous output
        return
    old = _sibling(path, "old")
    path.rename(old)
    fault_point("atomic_dir.between_renames")
    tmp.rename(path)
    _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path.parent)
    tmp = _sibling(path, "tmp")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("atomic_dir.written")
    replace_dir(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file for writing; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fault_point("atomic_file.written")
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, fixed indent) written atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def text_size(n_bytes: float) -> str:
    """A size in the unit a person reads it in: 830 bytes, 12.5 KB, 4.4 MB, 1,784.0 MB."""
    if n_bytes < 1e3:
        return f"{n_bytes:,.0f} bytes"
    return f"{n_bytes / 1e3:.1f} KB" if n_bytes < 1e6 else f"{n_bytes / 1e6:,.1f} MB"


def code_fence(text: str) -> str:
    """A Markdown code fence longer than any backtick run in text, so it cannot be closed early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)
