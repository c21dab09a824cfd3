"""Files -> documents, by format, counting what is skipped and why.

Each file becomes documents by its name: .txt/.md/anything textual is one document; .jsonl
and .json hold records with a text field; .parquet has a text column; .zip/.tar/.tar.gz/.tgz
archives are opened and their members read the same way; a trailing .gz/.bz2/.xz/.zst is
decompressed.

Files are streamed (llm/corpus/streaming.py), never read whole: a file, record or archive member
larger than ingest.max_document_bytes becomes several documents, `URI#part-0`, `URI#part-1`, ...
A record or file that cannot be read (invalid JSON, no text field, a corrupt .gz, no permission)
is a bad record: counted with an example and skipped, or fatal under ingest.on_bad_record: fail;
more than ingest.max_bad_fraction of them fails the stage.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

from llm.config import IngestParams
from llm.corpus.resolve import Entry, is_hidden
from llm.corpus.streaming import (
    JsonStreamError,
    decode_utf8,
    decoded_chunks,
    iter_json_records,
    iter_lines,
    read_head,
    split_into_parts,
)
from llm.errors import UserError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SNIFF_BYTES = 8192
# A JSON record is parsed whole, so its size is capped: a longer one is a bad record, which keeps
# a .jsonl line of a decompression bomb from taking unbounded memory.
MAX_RECORD_BYTES = 64 << 20
MAX_BAD_EXAMPLES = 10
MAX_SKIPPED_EXAMPLES = 20
_ALLOWED_CONTROLS = set("\t\n\r\f\v\b")
# What looks_binary counts: U+FFFD (an undecodable byte) and the control characters (category Cc:
# U+0000-001F and U+007F-009F) other than the allowed ones.
_CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in _ALLOWED_CONTROLS]
_BAD_CHARS = re.compile("[\ufffd" + "".join(map(re.escape, _CONTROLS)) + "]")


@dataclass(frozen=True)
class Document:
    source: str
    uri: str
    text: str
    n_decode_errors: int = 0
    n_bytes: int = 0  # UTF-8 bytes of text


@dataclass
class ReadCounts:
    """What reading saw, by reason. Becomes the ingest report (metrics/ingest.json)."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    records: int = 0  # read whole: a text file, a JSON record, a Parquet row
    bad_records: int = 0  # records and files that could not be read, skipped
    bad_record_examples: list[str] = field(default_factory=list)  # the first few, "file:line: why"
    inputs_cut_into_parts: int = 0  # files and records larger than ingest.max_document_bytes
    binary_files_skipped: int = 0
    empty_dropped: int = 0
    invalid_utf8_documents: int = 0
    invalid_utf8_sequences: int = 0
    per_source: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Per file: (bad records, the first), for the failure message; not a field, so not reported.
        self.bad_by_file: dict[str, tuple[int, str]] = {}

    def skipped(self, what: str) -> None:
        """Remember the first few skipped files, for the log."""
        if len(self.skipped_examples) < MAX_SKIPPED_EXAMPLES:
            self.skipped_examples.append(what)

    def bad(self, file: str, example: str) -> None:
        """Count a bad record of `file`; `example` is "file:line: why"."""
        self.bad_records += 1
        if len(self.bad_record_examples) < MAX_BAD_EXAMPLES:
            self.bad_record_examples.append(example)
        n, first = self.bad_by_file.get(file, (0, example))
        self.bad_by_file[file] = (n + 1, first)

    def merge(self, later: ReadCounts) -> None:
        """Add the counts of files read apart (a Ray unit) as if they had been read here next:
        sums, the first examples in reading order, the per-file bad counts."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, int):
                setattr(self, f.name, mine + getattr(later, f.name))
        self.bad_record_examples = (self.bad_record_examples + later.bad_record_examples)[:MAX_BAD_EXAMPLES]
        self.skipped_examples = (self.skipped_examples + later.skipped_examples)[:MAX_SKIPPED_EXAMPLES]
        for source, n in later.per_source.items():
            self.per_source[source] = self.per_source.get(source, 0) + n
        for file, (n, first) in later.bad_by_file.items():
            before = self.bad_by_file.get(file)
            self.bad_by_file[file] = (n, first) if before is None else (before[0] + n, before[1])

    def check_bad_fraction(self, max_fraction: float) -> None:
        """Fail when more than max_fraction of the records were bad: a wrong ingest.text_field
        skips every record, and that must stop the stage rather than leave an empty corpus."""
        total = self.records + self.bad_records
        if not self.bad_records or self.bad_records / total <= max_fraction:
            return
        worst = max(self.bad_by_file, key=lambda f: self.bad_by_file[f][0])
        n, first = self.bad_by_file[worst]
        # a file that cannot be opened or decompressed at all, or records without usable text
        check = ("check that the files can be read (archive, compression, permissions, the network for a URL)"
                 if ": cannot read: " in first else "check ingest.text_field")
        raise UserError(
            f"ingest: {self.bad_records} of {total} records are bad ({self.bad_records / total:.1%}, more than "
            f"ingest.max_bad_fraction {max_fraction:g}); {n} in {worst}, first {first}; "
            f"{check}, or raise ingest.max_bad_fraction to skip them (ingest.on_bad_record: fail stops at the first)"
        )


# ----------------------------------------------------------------------------- decoding
def looks_binary(data: bytes, max_control_fraction: float) -> bool:
    """NUL bytes, or too many control / undecodable characters in the first 8 KiB."""
    head = data[:SNIFF_BYTES]
    if b"\x00" in head:
        return True
    if not head:
        return False
    text = head.decode("utf-8", errors="replace")
    # A multi-byte character cut at the 8 KiB boundary is not evidence of binary.
    return len(_BAD_CHARS.findall(text)) / max(1, len(text)) > max_control_fraction


# ----------------------------------------------------------------------------- opening
def _suffix_of(name: str) -> str:
    lower = name.lower()
    for s in ARCHIVE_SUFFIXES:
        if lower.endswith(s):
            return s
    return Path(lower).suffix


COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def _decompressing(raw: BinaryIO, suffix: str) -> BinaryIO:
    """A stream that decompresses `raw` as it is read, a chunk at a time."""
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if suffix == ".bz2":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if suffix == ".xz":
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    # zstd through pyarrow, already a dependency: the standard library has none before 3.14.
    return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd")  # type: ignore[return-value]

# What reading a file may raise when the file, not the code, is at fault: no permission, gone,
# corrupt or truncated compression, a broken archive or Parquet file.
UNREADABLE = (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, tarfile.TarError, pa.ArrowException)


def _decompressed(entry: Entry, suffix: str) -> Entry:
    """The entry with its compression suffix removed, opening to the decompressed stream."""

    @contextmanager
    def open_decompressed() -> Iterator[BinaryIO]:
        with entry.open() as raw, _decompressing(raw, suffix) as stream:
            yield stream

    return Entry(entry.uri, entry.name[: -len(suffix)], open_decompressed)


@contextmanager
def _seekable(stream: BinaryIO) -> Iterator[BinaryIO]:
    """The stream itself, or its copy in a temporary file: zip and tar need to seek, and a copy
    on disk keeps a big archive out of memory."""
    if stream.seekable():
        yield stream
        return
    with tempfile.TemporaryFile() as copy:
        shutil.copyfileobj(stream, copy)
        copy.seek(0)
        yield copy  # type: ignore[misc]


def _open_archive(f: BinaryIO, suffix: str) -> zipfile.ZipFile | tarfile.TarFile:
    return zipfile.ZipFile(f) if suffix == ".zip" else tarfile.open(fileobj=f, mode="r:*")


def _members(archive: zipfile.ZipFile | tarfile.TarFile) -> list[tuple[str, Callable[[], BinaryIO]]]:
    """(name, opener) of each file in the archive."""
    if isinstance(archive, zipfile.ZipFile):
        return [(i.filename, (lambda i=i: archive.open(i))) for i in archive.infolist() if not i.is_dir()]  # type: ignore[misc]
    return [(m.name, (lambda m=m: archive.extractfile(m))) for m in archive.getmembers() if m.isfile()]  # type: ignore[misc]


def _why_unreadable(e: BaseException) -> str:
    if isinstance(e, (zipfile.BadZipFile, tarfile.TarError)):
        return f"not a readable archive: {e}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror  # "Permission denied", without the absolute path
    return str(e) or type(e).__name__


class BadRecord(ValueError):
    """A record without usable text; the message says why."""


def record_text(record: object, text_field: str) -> str:
    """The text of a JSON record: the record itself when it is a string, else its text field."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object with field {text_field!r}, got {type(record).__name__}")
    if text_field not in record:
        raise BadRecord(f"record has no field {text_field!r} (set ingest.text_field)")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field {text_field!r} is {type(value).__name__}, not a string")
    return value


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(text: str) -> tuple[str, int]:
    """JSON may escape half a surrogate pair ("\\ud800"), which has no UTF-8: it becomes U+FFFD
    and counts as an invalid sequence, like an undecodable byte. The regex runs only on text that
    has one: str.isascii and the UTF-8 encoder find out at C speed (the regex was an eighth of
    ingest)."""
    if text.isascii():
        return text, 0
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.subn("\ufffd", text)
    return text, 0


# ----------------------------------------------------------------------------- readers
class Reader:
    """Turns entries into documents, counting what it skips. What cannot be read is a bad
    record: counted with an example, or fatal under ingest.on_bad_record: fail."""

    def __init__(self, source: str, params: IngestParams, counts: ReadCounts):
        self.source = source
        self.params = params
        self.counts = counts

    def read(self, entry: Entry) -> Iterator[Document]:
        """The documents of one file or archive; one that cannot be read is a bad record (the
        documents it gave before failing are kept)."""
        try:
            yield from self._read_any(entry)
        except UNREADABLE as e:
            self._bad(entry.uri, entry.uri, f"cannot read: {_why_unreadable(e)}")

    def _read_any(self, entry: Entry) -> Iterator[Document]:
        suffix = _suffix_of(entry.name)
        if suffix in ARCHIVE_SUFFIXES:
            yield from self._archive(entry, suffix)
        elif suffix in COMPRESSION_SUFFIXES:
            yield from self._read_any(_decompressed(entry, suffix))
        else:
            self.counts.files += 1
            if suffix in (".jsonl", ".ndjson"):
                yield from self._jsonl(entry)
            elif suffix == ".json":
                yield from self._json(entry)
            elif suffix == ".parquet":
                yield from self._parquet(entry)
            else:
                yield from self._text_file(entry)

    def _bad(self, file: str, where: str, why: str) -> None:
        why = " ".join(why.split())  # one line, whatever the exception said
        if self.params.on_bad_record == "fail":
            raise UserError(f"{where}: {why} (ingest.on_bad_record: fail)")
        self.counts.bad(file, f"{where}: {why}")

    def _emit(self, uri: str, text: str, n_errors: int, n_bytes: int) -> Iterator[Document]:
        if not text.strip():
            self.counts.empty_dropped += 1
            self.counts.skipped(f"empty: {uri}")
            return
        if n_errors:
            self.counts.invalid_utf8_documents += 1
            self.counts.invalid_utf8_sequences += n_errors
        yield Document(self.source, uri, text, n_errors, n_bytes)

    def _emit_parts(self, uri: str, chunks: Iterable[tuple[str, int]]) -> Iterator[Document]:
        """The text of `chunks` as one document named `uri`, or, past max_document_bytes, as
        documents named `uri#part-0`, `uri#part-1`, ..."""
        for part in split_into_parts(chunks, self.params.max_document_bytes):
            if part.index == 0:
                self.counts.inputs_cut_into_parts += 1
            name = uri if part.index is None else f"{uri}#part-{part.index}"
            yield from self._emit(name, part.text, part.n_decode_errors, part.n_bytes)

    def _emit_record(self, uri: str, text: str, n_errors: int) -> Iterator[Document]:
        self.counts.records += 1
        text, n_surrogates = _without_lone_surrogates(text)
        n_bytes = len(text.encode("utf-8"))
        if n_bytes <= self.params.max_document_bytes:
            yield from self._emit(uri, text, n_errors + n_surrogates, n_bytes)
        else:
            yield from self._emit_parts(uri, [(text, n_errors + n_surrogates)])

    def _text_file(self, entry: Entry) -> Iterator[Document]:
        with entry.open() as f:
            head = read_head(f, SNIFF_BYTES)
            if looks_binary(head, self.params.max_binary_fraction):
                self.counts.binary_files_skipped += 1
                self.counts.skipped(f"binary: {entry.uri}")
                return
            yield from self._emit_parts(entry.uri, decoded_chunks(f, head))
        self.counts.records += 1

    def _jsonl(self, entry: Entry) -> Iterator[Document]:
        with entry.open() as f:
            for lineno, raw in iter_lines(f, MAX_RECORD_BYTES):
                where = f"{entry.uri}:{lineno}"
                if raw is None:
                    self._bad(entry.uri, where, f"line longer than {MAX_RECORD_BYTES} bytes")
                    continue
                if not raw.strip():
                    continue
                line, n_errors = decode_utf8(raw)
                try:
                    text = record_text(json.loads(line), self.params.text_field)
                except json.JSONDecodeError as e:
                    self._bad(entry.uri, where, f"not valid JSON: {e.msg}")
                    continue
                except BadRecord as e:
                    self._bad(entry.uri, where, str(e))
                    continue
                yield from self._emit_record(where, text, n_errors)

    def _json(self, entry: Entry) -> Iterator[Document]:
        """A top-level array is read one element at a time. Invalid JSON ends the file: what
        follows cannot be told apart from the error."""
        with entry.open() as f:
            try:
                for index, (record, n_errors) in enumerate(iter_json_records(f, MAX_RECORD_BYTES)):
                    where = f"{entry.uri}#{index}"
                    try:
                        text = record_text(record, self.params.text_field)
                    except BadRecord as e:
                        self._bad(entry.uri, where, str(e))
                        continue
                    yield from self._emit_record(where, text, n_errors)
            except JsonStreamError as e:
                self._bad(entry.uri, f"{entry.uri}#{e.index}", f"not valid JSON (line {e.line}): {e.msg}")

    def _parquet(self, entry: Entry) -> Iterator[Document]:
        import pyarrow.parquet as pq

        column = self.params.text_field
        with entry.open() as f:
            pf = pq.ParquetFile(f)
            if column not in pf.schema_arrow.names:
                names = ", ".join(pf.schema_arrow.names)
                self._bad(entry.uri, entry.uri, f"no column {column!r} (columns: {names}; set ingest.text_field)")
                return
            row = 0
            for batch in pf.iter_batches(columns=[column], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    where = f"{entry.uri}#{row}"
                    row += 1
                    if value is not None and not isinstance(value, str):
                        self._bad(entry.uri, where, f"column {column!r} is {type(value).__name__}, not a string")
                        continue
                    yield from self._emit_record(where, value or "", 0)

    def _archive(self, entry: Entry, suffix: str) -> Iterator[Document]:
        """Members of a zip or tar archive, in name order, each read by its own name. Members are
        streamed from the archive, so a big (or bomb) member is read like a big file."""
        with entry.open() as raw, _seekable(raw) as f, _open_archive(f, suffix) as archive:
            for name, opener in sorted(_members(archive), key=lambda m: m[0]):
                if not is_hidden(Path(name)):
                    yield from self.read(Entry(f"{entry.uri}!{name}", Path(name).name, opener))  # type: ignore[arg-type]
