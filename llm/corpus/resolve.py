"""Sources -> files: what each string in `ingest.sources` (and the drop folder ingest.inbox) names.

A source is one of
- a local file, directory (walked recursively) or glob, relative to the project root;
- `pkg://PACKAGE/GLOB`: files inside an installed Python package (the default corpus);
- an fsspec URL (`https://...`, `s3://bucket/*.jsonl`): needs the network and fsspec's backend.

Each names its files as Entries, sorted, so the same sources always give the same document order.
Hidden files (a name or folder starting with ".") are left out of a directory.
"""

from __future__ import annotations

import glob as globlib
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from llm.errors import UserError


@dataclass(frozen=True)
class Entry:
    """One file to read: a uri for provenance, a name for its format, a way to open it."""

    uri: str
    name: str
    open: Callable[[], AbstractContextManager[BinaryIO]]


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _local_entries(path: Path, uri_of: Callable[[Path], str]) -> list[Entry]:
    if path.is_dir():
        files = sorted(_files(path))
    else:
        files = [path]
    return [Entry(uri_of(p), p.name, (lambda p=p: open(p, "rb"))) for p in files]


def is_hidden(rel: Path) -> bool:
    """A name or folder starting with ".", left out of directories and archives."""
    return any(part.startswith(".") for part in rel.parts)


def resolve_source(source: str, root: Path, key: str) -> list[Entry]:
    """The files a source names, sorted. `key` names the params entry in error messages."""
    if source.startswith("pkg://"):
        return _package_entries(source, key)
    if "://" in source:
        return _fsspec_entries(source, key)

    resolved_root = root.resolve()
    resolved_dirs: dict[Path, Path] = {}  # a folder of many files is resolved once

    def uri_of(p: Path) -> str:
        # The file's own name, not a symlink's target: a dangling link names itself.
        folder = resolved_dirs.get(p.parent)
        if folder is None:
            folder = resolved_dirs[p.parent] = p.parent.resolve()
        try:
            return (folder / p.name).relative_to(resolved_root).as_posix()
        except ValueError:
            return p.as_posix()

    base = Path(source).expanduser()
    if not base.is_absolute():
        base = root / base
    if _has_glob(source):
        matches = sorted(Path(p) for p in globlib.glob(str(base), recursive=True))
        matches = [p for p in matches if _is_file(p)]
        if not matches:
            raise UserError(f"{key}: glob matches no files: {source}")
        return [e for p in matches for e in _local_entries(p, uri_of)]
    if not base.exists():
        raise UserError(f"{key}: no such file or directory: {source}")
    entries = _local_entries(base, uri_of)
    if not entries:
        raise UserError(f"{key}: directory has no files: {source}")
    return entries


def inbox_entries(inbox: str, root: Path) -> list[Entry]:
    """The files in the drop folder (ingest.inbox), which may be missing or empty."""
    if not inbox:
        return []
    base = Path(inbox).expanduser()
    base = base if base.is_absolute() else root / base
    if base.exists() and not base.is_dir():
        raise UserError(f"ingest.inbox: not a directory: {inbox}")
    if not base.is_dir():
        return []
    return resolve_source(inbox, root, "ingest.inbox") if any(_files(base)) else []


def _is_file(path: Path) -> bool:
    """A file, or a symlink to nothing: listed, so that reading it fails as a bad record
    rather than the file silently missing from the corpus."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def _files(directory: Path) -> Iterator[Path]:
    return (p for p in directory.rglob("*") if _is_file(p) and not is_hidden(p.relative_to(directory)))


def watched_files(sources: list[str], inbox: str, root: Path) -> dict[str, tuple[int, int]]:
    """(mtime in ns, size) of every local file the sources and the inbox name: what the
    Dagster sensor compares between ticks. Packages and URLs are not watched."""
    entries: list[Entry] = []
    for i, source in enumerate(sources):
        if "://" in source:
            continue
        entries += resolve_source(source, root, f"ingest.sources[{i}]")
    return {e.uri: _stat(root / e.uri) for e in entries + inbox_entries(inbox, root)}  # an absolute uri stays itself


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:  # a dangling symlink: the link itself
        st = path.lstat()
    return st.st_mtime_ns, st.st_size


def _package_entries(source: str, key: str) -> list[Entry]:
    rest = source[len("pkg://"):]
    package, _, pattern = rest.partition("/")
    if not package:
        raise UserError(f"{key}: expected pkg://PACKAGE/GLOB, got {source!r}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{key}: Python package {package!r} is not installed (pip install {package})")
    base = Path(list(spec.submodule_search_locations)[0])
    files = sorted(p for p in base.glob(pattern or "**/*") if p.is_file() and p.suffix not in (".py", ".pyc"))
    if not files:
        raise UserError(f"{key}: no files match {pattern!r} in package {package!r}")
    return [
        Entry(f"pkg://{package}/{p.relative_to(base).as_posix()}", p.name, (lambda p=p: open(p, "rb")))
        for p in files
    ]


def _fsspec_entries(source: str, key: str) -> list[Entry]:
    import fsspec

    try:
        files = fsspec.open_files(source, mode="rb")
    except (ImportError, ValueError) as e:
        raise UserError(f"{key}: cannot open {source!r}: {e}") from None
    if not files:
        raise UserError(f"{key}: URL matches no files: {source}")
    ordered = sorted(files, key=lambda f: f.full_name)
    return [Entry(f.full_name, f.full_name.rsplit("/", 1)[-1], _opener(f, key, source)) for f in ordered]


def _opener(file, key: str, source: str) -> Callable[[], AbstractContextManager[BinaryIO]]:
    """file.open, where a filesystem that refuses the URL itself when it opens it (hf:// without a
    namespace/name: fsspec lists such URLs without looking) is one line naming the source."""

    def open_file():
        try:
            return file.open()
        except ValueError as e:
            raise UserError(f"{key}: cannot open {source!r}: {' '.join(str(e).split())}") from None

    return open_file
