"""The data stages (ingest, clean, tokenizer, shards): what their asset pages show and the checks
their outputs must pass. The stages themselves are declared in dvc.yaml."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets import ui
from assets.spec import Check, StageSpec
from llm.layout import Layout

GROUP = "data"


def _metrics(layout: Layout, stage: str) -> dict:
    from llm.io import read_json

    return read_json(layout.metrics(stage))


def _first_text(table_dir: Path) -> tuple[str, str]:
    """(uri, text) of the table's first document."""
    from llm.corpus.tables import iter_batches

    for batch in iter_batches(table_dir, ["uri", "text"], 1):
        if batch.num_rows:
            return batch.column(0)[0].as_py(), batch.column(1)[0].as_py()
    return "", ""


# ----------------------------------------------------------------------------- metadata
def raw_metadata(layout: Layout) -> dict:
    m = _metrics(layout, "ingest")
    uri, text = _first_text(layout.raw)
    return {
        "documents": m["documents"],
        "bytes": m["bytes"],
        "files": m["files"],
        "skipped binary files": m["binary_files_skipped"],
        "empty files dropped": m["empty_dropped"],
        "documents with invalid UTF-8": m["invalid_utf8_documents"],
        # .get: a metrics file written before these counts existed still renders
        "documents cut into parts": m.get("inputs_cut_into_parts", 0),
        "bad records (skipped)": m.get("bad_records", 0),
        "bad record examples": ui.fenced("\n".join(m.get("bad_record_examples", [])) or "none"),
        "per source": ui.table([{"source": s, "documents": n} for s, n in m["per_source"].items()]),
        f"preview ({uri})": ui.preview(text),
    }


def clean_metadata(layout: Layout) -> dict:
    from llm.corpus.clean import FILTERS

    m = _metrics(layout, "clean")
    uri, text = _first_text(layout.clean)
    rows = []
    for f in FILTERS:  # one row per filter, in the words of its docstring
        r = m["removed"].get(f.name, {"documents": 0, "bytes": 0})  # absent: a filter newer than this report
        rows.append({"filter": f.name, "documents removed": r["documents"], "bytes removed": r["bytes"],
                     "removes": f.summary()})
    rows.sort(key=lambda r: (-r["bytes removed"], r["filter"]))
    return {
        "documents": m["documents_out"],
        "bytes": m["bytes_out"],
        "documents in": m["documents_in"],
        "bytes in": m["bytes_in"],
        "documents removed": m["removed_documents_total"],
        "unicode repaired documents": m["unicode_repaired_documents"],
        "filter report": ui.table(rows),
        f"preview ({uri})": ui.preview(text),
    }


def tokenizer_metadata(layout: Layout) -> dict:
    from llm.tokenizer import Tokenizer

    m = _metrics(layout, "tokenizer")
    tok = Tokenizer.load(layout.tokenizer)
    _, text = _first_text(layout.clean)
    line = next((ln for ln in text.splitlines() if len(ln.strip()) > 20), text[:80])[:160]
    pieces = tok.sp.encode(line, out_type=str)
    return {
        "vocab size": m["vocab_size"],
        "bytes per token (val)": m["val_bytes_per_token"],
        "unknown-token fraction (val)": m["val_unk_fraction"],
        "byte-fallback fraction (val)": m["val_byte_fallback_fraction"],
        "vocabulary used by val": m["val_vocab_coverage"],
        "round-trip failures (val)": m["val_roundtrip_failures"],
        "sample tokenization": ui.fenced(f"{line}\n\n{' | '.join(pieces)}\n\n{len(pieces)} tokens for "
                                         f"{len(line.encode())} bytes"),
    }


def shards_metadata(layout: Layout) -> dict:
    from llm.shards import read_manifest

    manifest = read_manifest(layout.shards)
    splits = manifest["splits"]
    rows = [{"split": name, "documents": s["documents"], "tokens": s["tokens"], "shards": len(s["shards"])}
            for name, s in splits.items()]
    out: dict = {f"{r['split']} {k}": r[k] for r in rows for k in ("tokens", "documents")}
    out.update({"shard files": sum(r["shards"] for r in rows), "token dtype": manifest["dtype"],
                "per split": ui.table(rows)})
    return out


# ----------------------------------------------------------------------------- checks
def raw_table_valid(layout: Layout) -> tuple[bool, dict]:
    return _table_valid(layout.raw, "raw")


def clean_table_valid(layout: Layout) -> tuple[bool, dict]:
    from llm.corpus.tables import iter_batches

    passed, meta = _table_valid(layout.clean, "clean")
    ids = [d for b in iter_batches(layout.clean, ["doc_id"], 65536) for d in b.column(0).to_pylist()]
    duplicates = len(ids) - len(set(ids))
    meta["duplicate doc_ids"] = duplicates
    return passed and duplicates == 0, meta


def _table_valid(directory: Path, name: str) -> tuple[bool, dict]:
    from llm.corpus.tables import iter_batches, validate_frame
    from llm.errors import DataValidationError

    rows = 0
    try:
        for batch in iter_batches(directory, batch_size=4096):
            validate_frame(batch.to_pandas(), name)
            rows += batch.num_rows
    except DataValidationError as e:
        return False, {"rows checked": rows, "failures": dg.MetadataValue.md(f"```\n{e}\n```")}
    return True, {"rows": rows}


def tokenizer_round_trip(layout: Layout, max_bytes: int = 2_000_000) -> tuple[bool, dict]:
    """decode(encode(text)) == text on (up to max_bytes of) the val documents."""
    from llm.config import load_params
    from llm.split import holdout_of
    from llm.tokenizer import Tokenizer, units_of

    holdout = holdout_of(layout.clean, load_params(layout.root / "params.yaml").split)
    tok = Tokenizer.load(layout.tokenizer)
    docs = failures = seen = 0
    for _, text, n_bytes in units_of(layout.clean, holdout, "val"):
        if seen >= max_bytes:
            break
        docs += 1
        seen += n_bytes
        failures += tok.decode(tok.encode(text)) != text
    return failures == 0 and docs > 0, {"val documents": docs, "bytes": seen, "failures": failures}


def shards_consistent(layout: Layout) -> tuple[bool, dict]:
    """Ids below the vocabulary size, no document in both splits, totals equal to the manifest."""
    from llm.shards import open_split, read_manifest, token_stream

    manifest = read_manifest(layout.shards)
    vocab = manifest["tokenizer"]["vocab_size"]
    problems: list[str] = []
    ids: dict[str, set[str]] = {}
    for split, info in manifest["splits"].items():
        tables = open_split(layout.shards, split)
        ids[split] = {d for t in tables for d in t.column("doc_id").to_pylist()}
        tokens = sum(len(a) for t in tables for a in token_stream(t))
        docs = sum(t.num_rows for t in tables)
        top = max((int(a.max()) for t in tables for a in token_stream(t) if len(a)), default=-1)
        if top >= vocab:
            problems.append(f"{split}: token id {top} >= vocab {vocab}")
        if (tokens, docs) != (info["tokens"], info["documents"]):
            problems.append(f"{split}: shards hold {docs} docs / {tokens} tokens, manifest says {info['documents']} / "
                            f"{info['tokens']}")
    overlap = ids.get("train", set()) & ids.get("val", set())
    if overlap:
        problems.append(f"{len(overlap)} documents in both train and val")
    return not problems, {"problems": "; ".join(problems) or "none"}


SPECS = {
    "ingest": StageSpec(GROUP, raw_metadata, (Check("raw_schema", raw_table_valid,
                                                    "pandera: the raw table's schema holds for every row"),)),
    "clean": StageSpec(GROUP, clean_metadata, (Check("clean_schema", clean_table_valid,
                                                     "pandera: the clean table's schema holds, doc_ids are unique"),)),
    "tokenizer": StageSpec(GROUP, tokenizer_metadata, (Check("round_trip", tokenizer_round_trip,
                                                             "decode(encode(text)) == text on the val documents"),)),
    "shards": StageSpec(GROUP, shards_metadata, (Check("consistent", shards_consistent,
                                                       "ids < vocab, no train/val overlap, totals equal the "
                                                       "manifest"),)),
}
