"""The ingest stage: the raw table and its report, an empty corpus, the raw table's schema."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llm.corpus.tables import content_id, validate_frame
from llm.errors import DataValidationError, UserError
from llm.io import read_json
from tests.ingest_helpers import PROSE, run_ingest


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
    with pytest.raises(UserError,
                       match=r"the sources hold no documents \(2 file\(s\) read: 1 binary, 1 empty, 0 bad\)"):
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
