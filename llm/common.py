"""Small helpers that the library, the Dagster code, the benchmarks and the tests share, each
defined here once. The standard library only: the GPU check imports this on a bare node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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


def git_commit(root: Path, short: bool = False) -> str:
    """The commit checked out at root, with `-dirty` when tracked files differ from it; "unknown"
    outside git or before the first commit."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", *(["--short"] if short else []), "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = head.stdout.strip() if head.returncode == 0 else ""
    return f"{sha}{'-dirty' if dirty else ''}" if sha else "unknown"


def dvc_command() -> str | None:
    """`dvc` from this Python's environment (`make setup` links it there), else from PATH."""
    return shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cell(value: Any, spec: str = "") -> str:
    """A table cell: "-" for nothing, floats in `spec` when one is given."""
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "", markdown: bool = False) -> str:
    """A plain text table, columns padded to their widest cell, a rule under the header; with
    `markdown`, the same as a Markdown table (for docs/LOG.md). `align` has one letter a column,
    l or r (default: numbers right, the rest left)."""
    cells = [[str(h) for h in headers]] + [[cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if not align:
        align = "".join("r" if rows and all(isinstance(r[i], (int, float)) for r in rows if r[i] is not None) and
                        any(r[i] is not None for r in rows) else "l" for i in range(len(headers)))

    padded = [[c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)] for r in cells]
    if markdown:
        rule = ["-" * (w - 1) + ":" if a == "r" else "-" * w for w, a in zip(widths, align)]
        return "\n".join(f"| {' | '.join(r)} |" for r in [padded[0], rule, *padded[1:]])
    rule = ["-" * w for w in widths]
    return "\n".join("  ".join(r).rstrip() for r in [padded[0], rule, *padded[1:]])


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
