"""Asset checks: what must hold of each stage's output before the next stage may use it.

Each check is a plain function of the project directory that returns (passed, metadata); the
Dagster wrappers are blocking, so a failed check stops the assets downstream of it.
"""

import math
from pathlib import Path
from typing import Callable

import dagster as dg

CheckFn = Callable[[Path], tuple[bool, dict]]


def raw_table_valid(project: Path) -> tuple[bool, dict]:
    return _table_valid(project / "data" / "raw", "raw")


def clean_table_valid(project: Path) -> tuple[bool, dict]:
    passed, meta = _table_valid(project / "data" / "clean", "clean")
    from llm.corpus.tables import iter_batches

    ids = [d for b in iter_batches(project / "data" / "clean", ["doc_id"], 65536) for d in b.column(0).to_pylist()]
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


def tokenizer_round_trip(project: Path, max_bytes: int = 2_000_000) -> tuple[bool, dict]:
    """decode(encode(text)) == text on (up to max_bytes of) the val documents."""
    from llm.config import load_params
    from llm.corpus.tables import iter_batches
    from llm.split import split_of
    from llm.tokenizer import Tokenizer

    split = load_params(project / "params.yaml").split
    tok = Tokenizer.load(project / "data" / "tokenizer")
    docs = failures = seen = 0
    for batch in iter_batches(project / "data" / "clean", ["doc_id", "text"], 256):
        for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if split_of(doc_id, split) != "val" or seen >= max_bytes:
                continue
            docs += 1
            seen += len(text.encode("utf-8"))
            failures += tok.decode(tok.encode(text)) != text
    return failures == 0 and docs > 0, {"val documents": docs, "bytes": seen, "failures": failures}


def shards_consistent(project: Path) -> tuple[bool, dict]:
    """Ids below the vocabulary size, no document in both splits, totals equal to the manifest."""
    from llm.shards import open_split, read_manifest, token_stream

    manifest = read_manifest(project / "data" / "shards")
    vocab = manifest["tokenizer"]["vocab_size"]
    problems: list[str] = []
    ids: dict[str, set[str]] = {}
    for split, info in manifest["splits"].items():
        tables = open_split(project / "data" / "shards", split)
        ids[split] = {d for t in tables for d in t.column("doc_id").to_pylist()}
        tokens = sum(len(a) for t in tables for a in token_stream(t))
        docs = sum(t.num_rows for t in tables)
        top = max((int(a.max()) for t in tables for a in token_stream(t) if len(a)), default=-1)
        if top >= vocab:
            problems.append(f"{split}: token id {top} >= vocab {vocab}")
        if (tokens, docs) != (info["tokens"], info["documents"]):
            problems.append(f"{split}: shards hold {docs} docs / {tokens} tokens, manifest says {info['documents']} / {info['tokens']}")
    overlap = ids.get("train", set()) & ids.get("val", set())
    if overlap:
        problems.append(f"{len(overlap)} documents in both train and val")
    return not problems, {"problems": "; ".join(problems) or "none"}


def training_sane(project: Path) -> tuple[bool, dict]:
    """Every logged loss is finite and the final val loss is below the initial (uniform) one."""
    import csv

    from llm.io import read_json

    summary = read_json(project / "metrics" / "train.json")
    with open(project / "metrics" / "loss.csv", encoding="utf-8") as f:
        losses = [float(r[k]) for r in csv.DictReader(f) for k in ("train_loss", "val_loss")]
    finite = all(math.isfinite(v) for v in losses)
    improved = summary["final_val_loss"] < summary["initial_val_loss"]
    return finite and improved, {"final val loss": summary["final_val_loss"], "initial val loss": summary["initial_val_loss"],
                                 "all losses finite": finite}


def beats_bz2(project: Path) -> tuple[bool, dict]:
    from llm.io import read_json

    result = read_json(project / "metrics" / "eval.json")
    bz2 = result["baseline_bpb"]["bz2"]
    return result["val_bpb"] < bz2, {"val_bpb": result["val_bpb"], "bz2_bpb": bz2}


CHECKS: dict[str, list[tuple[str, CheckFn, str]]] = {
    "ingest": [("raw_schema", raw_table_valid, "pandera: the raw table's schema holds for every row")],
    "clean": [("clean_schema", clean_table_valid, "pandera: the clean table's schema holds, doc_ids are unique")],
    "tokenizer": [("round_trip", tokenizer_round_trip, "decode(encode(text)) == text on the val documents")],
    "shards": [("consistent", shards_consistent, "ids < vocab, no train/val overlap, totals equal the manifest")],
    "train": [("loss_sane", training_sane, "losses finite, final val loss below the initial one")],
    "evaluate": [("beats_bz2", beats_bz2, "val bits per byte below bz2 -9 on the same text")],
}


def build_checks(project: Path, stage_names: list[str]) -> list[dg.AssetChecksDefinition]:
    out = []
    for stage in stage_names:
        for name, fn, description in CHECKS.get(stage, []):
            out.append(_check(project, stage, name, fn, description))
    return out


def _check(project: Path, stage: str, name: str, fn: CheckFn, description: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=stage, name=name, description=description, blocking=True)
    def _run() -> dg.AssetCheckResult:
        passed, metadata = fn(Path(project))
        return dg.AssetCheckResult(passed=passed, metadata=metadata)

    return _run
