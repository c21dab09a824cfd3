"""Records and files that cannot be read: skipped, counted and shown under on_bad_record skip, up to
max_bad_fraction; under fail, the stage stops at the first, naming file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.errors import UserError
from llm.io import read_json
from llm.layout import Layout
from tests.ingest_helpers import PROSE, read, run_ingest


def jsonl_lines(n: int, field: str = "text") -> list[str]:
    return [json.dumps({field: f"record {i}. " + PROSE}) for i in range(n)]


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


def test_jsonl_missing_field_is_a_clear_error(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": PROSE}) + "\n")
    with pytest.raises(UserError,
                       match=r"^d.jsonl:1: record has no field 'text' \(set ingest.text_field\) "
                             r"\(ingest.on_bad_record: fail\)$"):
        read(tmp_path, ["d.jsonl"], on_bad_record="fail")


def test_jsonl_bad_json_names_the_line(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": PROSE}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"^d.jsonl:2: not valid JSON: Expecting property name"):
        read(tmp_path, ["d.jsonl"], on_bad_record="fail")


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
    assert counts.bad_record_examples[:2] == ["n.parquet#0: column 'text' is int, not a string",
                                              "n.parquet#1: column 'text' is int, not a string"]


def test_bad_records_in_a_json_array(tmp_path: Path):
    (tmp_path / "d.json").write_text('[{"text": "one ' + PROSE.strip()
                                     + '"}, {"title": "no text"},\n {"text": "two"}, {oops]')
    docs, counts = read(tmp_path, ["d.json"], max_bad_fraction=1.0)
    assert [d.uri for d in docs] == ["d.json#0", "d.json#2"]
    assert counts.bad_record_examples == [
        "d.json#1: record has no field 'text' (set ingest.text_field)",
        "d.json#3: not valid JSON (line 2): Expecting property name enclosed in double quotes",
    ]


def test_a_jsonl_line_longer_than_the_record_cap_is_a_bad_record(tmp_path: Path, monkeypatch):
    from llm.corpus import readers, streaming

    monkeypatch.setattr(readers, "MAX_RECORD_BYTES", 1000)
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 100)
    lines = jsonl_lines(3)
    lines.insert(1, json.dumps({"text": "x" * 5000}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    docs, counts = read(tmp_path, ["d.jsonl"], max_bad_fraction=0.5)
    assert [d.uri for d in docs] == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:4"]
    assert counts.bad_record_examples == ["d.jsonl:2: line longer than 1000 bytes"]


def test_unreadable_files_are_bad_records(tmp_path: Path):
    (tmp_path / "corpus").mkdir()
    expected = unreadable_files(tmp_path / "corpus")
    (tmp_path / "corpus" / "good.txt").write_text(PROSE)
    docs, counts = read(tmp_path, ["corpus"], max_bad_fraction=0.9)
    assert counts.bad_record_examples == [f"corpus/{name}: {why}" for name, why in sorted(expected.items())]
    assert counts.bad_records == 4
    assert [d.uri for d in docs] == ["corpus/good.txt"]
    with pytest.raises(UserError,
                       match=r"^corpus/broken.zip: cannot read: not a readable archive: .* \(ingest.on_bad_record: "
                             r"fail\)$"):
        read(tmp_path, ["corpus"], on_bad_record="fail")


def test_too_many_unreadable_files_point_at_the_files_not_the_text_field(tmp_path: Path):
    (tmp_path / "corpus").mkdir()
    unreadable_files(tmp_path / "corpus")
    with pytest.raises(UserError) as err:
        read(tmp_path, ["corpus"])
    msg = str(err.value)
    assert msg.startswith("ingest: 4 of 4 records are bad (100.0%, more than ingest.max_bad_fraction 0.01)")
    assert "check that the files can be read (archive, compression, permissions, the network for a URL)" in msg
    assert "text_field" not in msg and "\n" not in msg


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
        with pytest.raises(UserError,
                           match=r"^secret.txt: cannot read: Permission denied \(ingest.on_bad_record: fail\)$"):
            read(tmp_path, ["."], on_bad_record="fail")
    finally:
        (tmp_path / "secret.txt").chmod(0o644)


def test_a_wrong_text_field_fails_with_one_line_and_writes_nothing(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text("\n".join(jsonl_lines(100, field="content")) + "\n")
    with pytest.raises(UserError) as err:
        run_ingest(tmp_path, ["d.jsonl"])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("ingest: 100 of 100 records are bad (100.0%, more than ingest.max_bad_fraction 0.01); 100 in "
                          "d.jsonl, ")
    assert "first d.jsonl:1: record has no field 'text' (set ingest.text_field)" in msg
    assert "check ingest.text_field" in msg and "ingest.on_bad_record" in msg
    assert not (tmp_path / "data" / "raw").exists() and not (tmp_path / "metrics" / "ingest.json").exists()


def test_bad_records_above_the_fraction_fail_and_name_the_worst_file(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text("\n".join(jsonl_lines(97)) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(jsonl_lines(1) + ["{", "{"]) + "\n")
    (tmp_path / "c.txt.gz").write_bytes(b"corrupt")
    expected = (r"^ingest: 3 of 101 records are bad \(3.0%, more than ingest.max_bad_fraction 0.01\); 2 in b.jsonl, "
                r"first b.jsonl:2: not valid JSON")
    with pytest.raises(UserError, match=expected):
        read(tmp_path, ["."])
    _, counts = read(tmp_path, ["."], max_bad_fraction=0.03)
    assert counts.bad_records == 3 and counts.records == 98


def test_on_bad_record_fail_stops_at_the_first_with_file_and_line(tmp_path: Path):
    lines = jsonl_lines(100)
    lines[41] = json.dumps({"text": None, "title": 1})  # null text is an empty record, not a bad one
    lines[60] = json.dumps({"text": ["not", "a", "string"]})
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError,
                       match=r"^d.jsonl:61: field 'text' is list, not a string \(ingest.on_bad_record: fail\)$"):
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
