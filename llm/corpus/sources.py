"""Sources -> documents.

A source string from `ingest.sources` is one of
- a local file, directory (walked recursively) or glob, relative to the project root;
- `pkg://PACKAGE/GLOB`: files inside an installed Python package (the default corpus);
- an fsspec URL (`https://...`, `s3://bucket/*.jsonl`): needs the network and fsspec's backend.

Each file becomes documents by its name: .txt/.md/anything textual is one document; .jsonl
and .json hold records with a text field; .parquet has a text column; .zip/.tar/.tar.gz/.tgz
archives are opened and their members read the same way; a trailing .gz is decompressed.
Files are visited in sorted order, so the same sources always give the same document order.
"""

from __future__ import annotations

import codecs
import glob as globlib
import gzip
import importlib.util
import io
import json
import tarfile
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from llm.errors import UserError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SNIFF_BYTES = 8192
_ALLOWED_CONTROLS = set("\t\n\r\f\v\b")


@dataclass(frozen=True)
class Document:
    source: str
    uri: str
    text: str
    n_decode_errors: int = 0
    n_bytes: int = 0  # UTF-8 bytes of text


@dataclass
class ReadCounts:
    """What reading saw, by reason. Becomes part of the ingest report."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    binary_files_skipped: int = 0
    empty_dropped: int = 0
    invalid_utf8_documents: int = 0
    invalid_utf8_sequences: int = 0
    per_source: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)

    def skipped(self, what: str) -> None:
        """Remember the first few skipped files, for the log."""
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(what)


# ----------------------------------------------------------------------------- decoding
class _ErrorCounter:
    """A codec error handler that replaces undecodable bytes with U+FFFD and counts them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, err: UnicodeDecodeError) -> tuple[str, int]:
        self.count += 1
        return "\ufffd", err.end


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8 (BOM dropped); invalid sequences become U+FFFD. Returns (text, n_invalid)."""
    try:
        return data.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        pass
    counter = _ErrorCounter()
    name = f"llm-count-{id(counter)}"
    codecs.register_error(name, counter)
    text = data.decode("utf-8-sig", errors=name)
    return text, counter.count


def looks_binary(data: bytes, max_control_fraction: float) -> bool:
    """NUL bytes, or too many control / undecodable characters in the first 8 KiB."""
    head = data[:SNIFF_BYTES]
    if b"\x00" in head:
        return True
    if not head:
        return False
    text = head.decode("utf-8", errors="replace")
    # A multi-byte character cut at the 8 KiB boundary is not evidence of binary.
    bad = sum(
        1
        for ch in text
        if ch == "\ufffd" or (ch not in _ALLOWED_CONTROLS and unicodedata.category(ch) == "Cc")
    )
    return bad / max(1, len(text)) > max_control_fraction


# ----------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class Entry:
    """One file to read: a uri for provenance, a name for its format, a way to open it."""

    uri: str
    name: str
    open: Callable[[], BinaryIO]


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _local_entries(path: Path, uri_of: Callable[[Path], str]) -> list[Entry]:
    if path.is_dir():
        files = sorted(_files(path))
    else:
        files = [path]
    return [Entry(uri_of(p), p.name, (lambda p=p: open(p, "rb"))) for p in files]


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def resolve_source(source: str, root: Path, key: str) -> list[Entry]:
    """The files a source names, sorted. `key` names the params entry in error messages."""
    if source.startswith("pkg://"):
        return _package_entries(source, key)
    if "://" in source:
        return _fsspec_entries(source, key)

    def uri_of(p: Path) -> str:
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return p.as_posix()

    base = Path(source).expanduser()
    if not base.is_absolute():
        base = root / base
    if _has_glob(source):
        matches = sorted(Path(p) for p in globlib.glob(str(base), recursive=True))
        matches = [p for p in matches if p.is_file()]
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


def _files(directory: Path) -> Iterator[Path]:
    return (p for p in directory.rglob("*") if p.is_file() and not _hidden(p.relative_to(directory)))


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
    st = path.stat()
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
    return [Entry(f.full_name, f.full_name.rsplit("/", 1)[-1], f.open) for f in ordered]


# ----------------------------------------------------------------------------- readers
def _suffix_of(name: str) -> str:
    lower = name.lower()
    for s in ARCHIVE_SUFFIXES:
        if lower.endswith(s):
            return s
    return Path(lower).suffix


class Reader:
    """Turns entries into documents, counting what it skips."""

    def __init__(self, source: str, text_field: str, max_binary_fraction: float, counts: ReadCounts):
        self.source = source
        self.text_field = text_field
        self.max_binary_fraction = max_binary_fraction
        self.counts = counts

    def read(self, entry: Entry) -> Iterator[Document]:
        suffix = _suffix_of(entry.name)
        if suffix in ARCHIVE_SUFFIXES:
            yield from self._archive(entry, suffix)
            return
        self.counts.files += 1
        yield from self._read_file(entry, suffix)

    def _read_file(self, entry: Entry, suffix: str) -> Iterator[Document]:
        if suffix == ".gz":
            inner = entry.name[:-3]
            opener = entry.open
            yield from self._read_file(Entry(entry.uri, inner, lambda: gzip.open(opener(), "rb")), _suffix_of(inner))  # type: ignore[arg-type,return-value]
        elif suffix in (".jsonl", ".ndjson"):
            yield from self._jsonl(entry)
        elif suffix == ".json":
            yield from self._json(entry)
        elif suffix == ".parquet":
            yield from self._parquet(entry)
        else:
            yield from self._text_file(entry)

    def _emit(self, uri: str, text: str, n_errors: int) -> Iterator[Document]:
        if not text.strip():
            self.counts.empty_dropped += 1
            self.counts.skipped(f"empty: {uri}")
            return
        if n_errors:
            self.counts.invalid_utf8_documents += 1
            self.counts.invalid_utf8_sequences += n_errors
        yield Document(self.source, uri, text, n_errors, len(text.encode("utf-8")))

    def _text_file(self, entry: Entry) -> Iterator[Document]:
        with entry.open() as f:
            data = f.read()
        if looks_binary(data, self.max_binary_fraction):
            self.counts.binary_files_skipped += 1
            self.counts.skipped(f"binary: {entry.uri}")
            return
        text, n_errors = decode_utf8(data)
        yield from self._emit(entry.uri, text, n_errors)

    def _record_text(self, record: object, where: str) -> str:
        if isinstance(record, str):
            return record
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object with field {self.text_field!r}, got {type(record).__name__}")
        if self.text_field not in record:
            raise UserError(f"{where}: record has no field {self.text_field!r} (set ingest.text_field)")
        value = record[self.text_field]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise UserError(f"{where}: field {self.text_field!r} is {type(value).__name__}, not a string")
        return value

    def _jsonl(self, entry: Entry) -> Iterator[Document]:
        with entry.open() as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                line, n_errors = decode_utf8(raw)
                where = f"{entry.uri}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON: {e.msg}") from None
                yield from self._emit(where, self._record_text(record, where), n_errors)

    def _json(self, entry: Entry) -> Iterator[Document]:
        with entry.open() as f:
            text, n_errors = decode_utf8(f.read())
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{entry.uri}: not valid JSON: {e.msg} (line {e.lineno})") from None
        records = data if isinstance(data, list) else [data]
        for i, record in enumerate(records):
            where = f"{entry.uri}#{i}"
            yield from self._emit(where, self._record_text(record, where), n_errors if i == 0 else 0)

    def _parquet(self, entry: Entry) -> Iterator[Document]:
        import pyarrow.parquet as pq

        with entry.open() as f:
            pf = pq.ParquetFile(f)
            if self.text_field not in pf.schema_arrow.names:
                raise UserError(
                    f"{entry.uri}: no column {self.text_field!r} (columns: {', '.join(pf.schema_arrow.names)}; set ingest.text_field)"
                )
            row = 0
            for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    yield from self._emit(f"{entry.uri}#{row}", value or "", 0)
                    row += 1

    def _archive(self, entry: Entry, suffix: str) -> Iterator[Document]:
        """Members of a zip or tar archive, in name order, each read by its own name."""
        with entry.open() as f:
            try:
                if suffix == ".zip":
                    archive = zipfile.ZipFile(f if f.seekable() else io.BytesIO(f.read()))
                    members = [(i.filename, (lambda i=i: archive.open(i))) for i in archive.infolist() if not i.is_dir()]
                else:
                    archive = tarfile.open(fileobj=f, mode="r:*")
                    members = [(m.name, (lambda m=m: archive.extractfile(m))) for m in archive.getmembers() if m.isfile()]
            except (zipfile.BadZipFile, tarfile.TarError) as e:
                raise UserError(f"{entry.uri}: not a readable archive: {e}") from None
            with archive:
                for name, opener in sorted(members, key=lambda m: m[0]):
                    if not _hidden(Path(name)):
                        yield from self.read(Entry(f"{entry.uri}!{name}", Path(name).name, opener))  # type: ignore[arg-type]


def iter_documents(
    sources: list[str], root: Path, text_field: str, max_binary_fraction: float, counts: ReadCounts, inbox: str = ""
) -> Iterator[Document]:
    """Every document of every source, then of the inbox, in a stable order. Sources are
    resolved up front, so a missing one fails before anything is read."""
    resolved = [(s, resolve_source(s, root, f"ingest.sources[{i}]")) for i, s in enumerate(sources)]
    if entries := inbox_entries(inbox, root):
        resolved.append((inbox, entries))
    for source, entries in resolved:
        reader = Reader(source, text_field, max_binary_fraction, counts)
        for entry in entries:
            for doc in reader.read(entry):
                counts.documents += 1
                counts.bytes += doc.n_bytes
                counts.per_source[source] = counts.per_source.get(source, 0) + 1
                yield doc
