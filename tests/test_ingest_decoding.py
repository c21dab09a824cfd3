"""Bytes to text: invalid UTF-8 replaced and counted, binary and empty files skipped, and the same
text however the bytes are cut into chunks."""

from __future__ import annotations

import gzip
import unicodedata
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from llm.corpus.readers import looks_binary
from llm.corpus.streaming import decode_utf8
from tests.ingest_helpers import PROSE, read


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait and cr\xe8me " + PROSE.encode())
    docs, counts = read(tmp_path, ["."])
    assert docs[0].text.startswith("caf\ufffd au lait and cr\ufffdme")
    assert docs[0].n_decode_errors == 2
    assert counts.invalid_utf8_documents == 1 and counts.invalid_utf8_sequences == 2


def test_decode_utf8_drops_bom_and_keeps_valid_text():
    assert decode_utf8("\ufeffhé".encode("utf-8")) == ("hé", 0)


def test_a_lone_surrogate_escaped_in_json_counts_as_invalid_utf8(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text('{"text": "half a pair \\ud800 here. ' + PROSE.strip() + '"}\n')
    docs, counts = read(tmp_path, ["d.jsonl"])
    assert docs[0].text.startswith("half a pair \ufffd here.") and docs[0].n_decode_errors == 1
    assert docs[0].n_bytes == len(docs[0].text.encode("utf-8")) and counts.invalid_utf8_sequences == 1


def test_binary_files_are_skipped_and_counted(tmp_path: Path):
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (tmp_path / "noise.bin").write_bytes(bytes([1, 2, 3, 4, 5, 6, 7, 14, 15, 16]) * 100)
    (tmp_path / "ok.txt").write_text(PROSE)
    docs, counts = read(tmp_path, ["."])
    assert [d.uri for d in docs] == ["ok.txt"]
    assert counts.binary_files_skipped == 2


def test_looks_binary_tolerates_a_few_bad_bytes():
    assert not looks_binary(PROSE.encode() * 20 + b"\xff", 0.1)
    assert looks_binary(b"text\x00more", 0.1)


def _looks_binary_by_category(data: bytes, max_control_fraction: float) -> bool:
    """looks_binary's rule written out character by character (the reference)."""
    head = data[:8192]
    if b"\x00" in head or not head:
        return b"\x00" in head
    text = head.decode("utf-8", errors="replace")
    bad = sum(1 for ch in text if ch == "\ufffd" or (ch not in "\t\n\r\f\v\b" and unicodedata.category(ch) == "Cc"))
    return bad / max(1, len(text)) > max_control_fraction


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                       st.sampled_from([bytes([c]) for c in range(1, 0x20)] + ["\x85\x9f\u00a0\ufffd".encode()])),
             max_size=400),
    st.sampled_from([0.0, 0.01, 0.05, 0.3]),
)
def test_looks_binary_counts_what_the_category_rule_counts(parts, fraction):
    data = b"".join(parts)
    assert looks_binary(data, fraction) == _looks_binary_by_category(data, fraction)


def test_empty_files_are_dropped_and_counted(tmp_path: Path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "ok.txt").write_text(PROSE)
    docs, counts = read(tmp_path, ["."])
    assert len(docs) == 1 and counts.empty_dropped == 2


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(min_value=0, max_value=64), max_size=8))
def test_decoding_in_chunks_equals_decoding_whole(data, cuts):
    """A character (or an invalid sequence) split across chunks decodes as if read whole."""
    from llm.corpus.streaming import Utf8Decoder

    decoder = Utf8Decoder()
    bounds = [0, *sorted(cuts), len(data)]
    pieces = ([decoder.decode(data[a:b]) for a, b in zip(bounds, bounds[1:]) if a < b]
              + [decoder.decode(b"", final=True)])
    assert ("".join(t for t, _ in pieces), sum(n for _, n in pieces)) == decode_utf8(data)


def test_multibyte_characters_and_bad_bytes_across_chunk_boundaries(tmp_path: Path, monkeypatch):
    from llm.corpus import streaming

    monkeypatch.setattr(streaming, "CHUNK_BYTES", 7)  # every character of more than one byte gets cut
    text = ("Ça, c'est l'été — 𝄞 ünïcödé. " * 40).encode() + b"caf\xe9 cr\xe8me\n"
    (tmp_path / "a.txt").write_bytes(text)
    docs, counts = read(tmp_path, ["a.txt"], max_document_bytes=1024)
    assert "".join(d.text for d in docs) == text.decode("utf-8", errors="replace")
    assert counts.invalid_utf8_sequences == 2 and sum(d.n_decode_errors for d in docs) == 2
    assert docs[-1].n_decode_errors == 2


def test_binary_sniff_sees_the_whole_head_when_chunks_are_small(tmp_path: Path, monkeypatch):
    from llm.corpus import streaming

    monkeypatch.setattr(streaming, "CHUNK_BYTES", 64)
    (tmp_path / "late-nul.dat").write_bytes(PROSE.encode() * 60 + b"\x00" + PROSE.encode())  # NUL at ~4.7 KB
    with gzip.open(tmp_path / "z.txt.gz", "wb") as f:
        f.write(PROSE.encode() * 60 + b"\x00")
    docs, counts = read(tmp_path, ["."])
    assert docs == [] and counts.binary_files_skipped == 2
