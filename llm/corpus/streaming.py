"""Reading big inputs in bounded memory.

Every reader here pulls a binary stream in chunks of CHUNK_BYTES, so what it holds is bounded by
one chunk plus the largest document (ingest.max_document_bytes) or record (a cap), never by the
size of the file, nor by how much it inflates when decompressed: a 300 KB .gz of 300 MB of text
is read like any other big file.

- `Utf8Decoder` decodes chunk by chunk: a character split across two chunks decodes whole, and
  each invalid sequence becomes U+FFFD and is counted.
- `split_into_parts` cuts text into parts of at most max_bytes at a blank line, else at a line
  end, else between two characters.
- `iter_lines` gives the lines of a stream (.jsonl), with a cap on a line's length.
- `iter_json_records` gives the elements of a top-level JSON array one at a time (.json).
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

CHUNK_BYTES = 1 << 20

# ----------------------------------------------------------------------------- decoding
# One error handler for the process, registered once (codecs has no unregister); the count goes
# to a thread-local set around each decode call, so decoders never share a counter.
_ERROR_HANDLER = "llm-count-and-replace"
_decode_errors = threading.local()


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _decode_errors.count += 1
    return "\ufffd", err.end


codecs.register_error(_ERROR_HANDLER, _count_and_replace)


class Utf8Decoder:
    """UTF-8 fed in chunks (a leading BOM dropped): a character cut between two chunks waits for
    the rest; each invalid sequence becomes U+FFFD and is counted."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=_ERROR_HANDLER)

    def decode(self, data: bytes, final: bool = False) -> tuple[str, int]:
        """(text, invalid sequences in it). `final` flushes a character left incomplete."""
        _decode_errors.count = 0
        text = self._decoder.decode(data, final)
        return text, _decode_errors.count


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8 (BOM dropped); invalid sequences become U+FFFD. Returns (text, n_invalid)."""
    return Utf8Decoder().decode(data, final=True)


def read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def read_head(stream: BinaryIO, n: int) -> bytes:
    """The first n bytes (fewer only at the end): a stream may return short reads, and the
    binary sniff needs all of them."""
    parts, got = [], 0
    while got < n and (chunk := stream.read(n - got)):
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def decoded_chunks(stream: BinaryIO, head: bytes = b"") -> Iterator[tuple[str, int]]:
    """(text, invalid sequences) chunk by chunk: `head` (bytes already read), then the stream."""
    decoder = Utf8Decoder()
    for chunk in itertools.chain([head], read_chunks(stream)):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


# ----------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class Part:
    index: int | None  # None: the text was not cut
    text: str
    n_bytes: int  # UTF-8 bytes of text
    n_decode_errors: int


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def cut_point(buf: bytes | bytearray, max_bytes: int) -> int:
    """Where the next part ends, for len(buf) > max_bytes: after the last blank line within
    max_bytes, else after the last line end, else at the last character start. Boundaries in the
    first half are passed over, so that no part is less than half full."""
    half = max_bytes // 2
    blank_line_ends = [m.end() for m in _BLANK_LINE.finditer(buf, half, max_bytes)]
    if blank_line_ends:
        return blank_line_ends[-1]
    newline = buf.rfind(b"\n", half, max_bytes)
    if newline >= 0:
        return newline + 1
    cut = max_bytes
    while buf[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: inside a character
        cut -= 1
    return cut


def split_into_parts(chunks: Iterable[tuple[str, int]], max_bytes: int) -> Iterator[Part]:
    """The text of `chunks` ((text, invalid sequences) pairs) as parts of at most max_bytes UTF-8
    bytes, in order and without loss: the parts joined are the text. Holds at most max_bytes plus
    one chunk. Invalid sequences go, in order, to parts that hold a U+FFFD, the rest to the last
    part, so that the parts add up to the whole."""
    buf = bytearray()
    errors = 0
    index = 0
    for text, n_errors in chunks:
        buf += text.encode("utf-8")
        errors += n_errors
        while len(buf) > max_bytes:
            cut = cut_point(buf, max_bytes)
            part = buf[:cut].decode("utf-8")
            mine = min(errors, part.count("\ufffd")) if errors else 0
            yield Part(index, part, cut, mine)
            del buf[:cut]
            errors -= mine
            index += 1
    yield Part(index if index else None, buf.decode("utf-8"), len(buf), errors)


# ----------------------------------------------------------------------------- .jsonl
def iter_lines(stream: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, line without its newline) for each line of the stream; None for a
    line longer than max_bytes, which is passed over in chunks rather than held."""
    buf = bytearray()
    lineno = 0
    too_long = False
    for chunk in read_chunks(stream):
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            lineno += 1
            yield lineno, None if too_long or end - start > max_bytes else bytes(buf[start:end])
            too_long = False
            start = end + 1
        del buf[:start]
        if len(buf) > max_bytes:
            too_long = True
            buf.clear()
    if buf or too_long:
        yield lineno + 1, None if too_long or len(buf) > max_bytes else bytes(buf)


# ----------------------------------------------------------------------------- .json
class JsonStreamError(ValueError):
    """Invalid JSON in a .json file: the rest of the file cannot be read."""

    def __init__(self, index: int, line: int, msg: str):
        super().__init__(f"record {index} (line {line}): {msg}")
        self.index, self.line, self.msg = index, line, msg


_NON_SPACE = re.compile(r"[^ \t\n\r]")
_JSON = json.JSONDecoder()


class _TextWindow:
    """The decoded text of a stream, read on demand from `pos` on; consumed text is dropped, and
    its lines are counted for error messages."""

    def __init__(self, stream: BinaryIO):
        self._chunks = decoded_chunks(stream)
        self.text = ""
        self.pos = 0
        self.eof = False
        self.decode_errors = 0
        self._lines_dropped = 0

    def held(self) -> int:
        return len(self.text) - self.pos

    def fill(self, n_chars: int) -> None:
        """Read until n_chars past pos are held, or the stream ends."""
        while self.held() < n_chars and not self.eof:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.eof = True
                return
            self._lines_dropped += self.text.count("\n", 0, self.pos)
            self.text = self.text[self.pos:] + chunk[0]
            self.pos = 0
            self.decode_errors += chunk[1]

    def next_char(self) -> str:
        """The next character that is not JSON whitespace ("" at the end); pos is left on it."""
        while True:
            if match := _NON_SPACE.search(self.text, self.pos):
                self.pos = match.start()
                return self.text[self.pos]
            self.pos = len(self.text)
            self.fill(1)
            if self.eof and not self.held():
                return ""

    def line_at(self, pos: int) -> int:
        return self._lines_dropped + self.text.count("\n", 0, pos) + 1


def _parse_value(window: _TextWindow, index: int, max_chars: int) -> tuple[object, int]:
    """The JSON value at pos, and the invalid UTF-8 sequences read since the last one. A value
    that fails to parse may only be cut short: read twice as much and try again, up to
    max_chars."""
    while True:
        error = None
        try:
            value, end = _JSON.raw_decode(window.text, window.pos)
            if end < len(window.text) or window.eof:  # a number at the end of the window may go on
                window.pos = end
                errors, window.decode_errors = window.decode_errors, 0
                return value, errors
        except json.JSONDecodeError as e:
            error = e
        if error is not None and (window.eof or window.held() > max_chars):
            raise JsonStreamError(index, window.line_at(error.pos), error.msg)
        if window.held() > max_chars:
            raise JsonStreamError(index, window.line_at(window.pos), f"record longer than {max_chars} characters")
        window.fill(2 * window.held() + 1)


def iter_json_records(stream: BinaryIO, max_chars: int) -> Iterator[tuple[object, int]]:
    """(record, invalid UTF-8 sequences) for each element of a top-level JSON array, one at a
    time, or for the top-level value when it is not an array. Raises JsonStreamError."""
    window = _TextWindow(stream)
    first = window.next_char()
    if first == "[":
        window.pos += 1
        if window.next_char() == "]":
            window.pos += 1
        else:
            for index in itertools.count():
                yield _parse_value(window, index, max_chars)
                after = window.next_char()
                window.pos += 1
                if after == "]":
                    break
                if after != ",":
                    raise JsonStreamError(index + 1, window.line_at(window.pos - 1), "Expecting ',' delimiter")
                window.next_char()
    elif first:
        yield _parse_value(window, 0, max_chars)
    if window.next_char():
        raise JsonStreamError(0, window.line_at(window.pos), "Extra data after the top-level value")
