"""Stage `ingest`: the sources in params.yaml -> data/raw/ (Parquet, one row per document)."""

from __future__ import annotations

import logging
from dataclasses import asdict

from tqdm import tqdm

from llm.config import Params
from llm.corpus.dispatch import iter_documents
from llm.corpus.readers import ReadCounts
from llm.corpus.tables import RAW_ARROW_SCHEMA, TableWriter, content_id
from llm.errors import UserError
from llm.io import atomic_dir, write_json
from llm.layout import Layout
from llm.progress import progress_enabled

log = logging.getLogger(__name__)


def ingest(params: Params, layout: Layout) -> dict:
    """Read every source, write the raw table, return (and write) the ingest report."""
    compute = params.compute
    params, root, out_dir, report_path = params.ingest, layout.root, layout.raw, layout.metrics("ingest")
    counts = ReadCounts()
    log.info("ingest: %d source(s) -> %s", len(params.sources), out_dir)
    with atomic_dir(out_dir) as tmp, TableWriter(tmp, RAW_ARROW_SCHEMA, "raw") as writer:
        rows: dict[str, list] = {name: [] for name in RAW_ARROW_SCHEMA.names}
        pending_bytes = 0
        docs = iter_documents(params, root, counts, compute)
        bar = tqdm(docs, desc="ingest", unit="doc", disable=not progress_enabled(), mininterval=1.0)
        for doc in bar:
            n_bytes = doc.n_bytes
            rows["doc_id"].append(content_id(doc.text))
            rows["source"].append(doc.source)
            rows["uri"].append(doc.uri)
            rows["text"].append(doc.text)
            rows["n_bytes"].append(n_bytes)
            rows["n_decode_errors"].append(doc.n_decode_errors)
            pending_bytes += n_bytes
            if len(rows["doc_id"]) >= params.batch_docs or pending_bytes >= params.batch_bytes:
                writer.write(rows)
                rows = {name: [] for name in rows}
                pending_bytes = 0
                bar.set_postfix(MB=f"{counts.bytes / 1e6:.1f}")
        writer.write(rows)
        if counts.documents == 0:
            raise UserError(
                f"ingest: the sources hold no documents ({counts.files} file(s) read: "
                f"{counts.binary_files_skipped} binary, {counts.empty_dropped} empty, {counts.bad_records} bad)"
            )
    report = asdict(counts)
    for line in report.pop("skipped_examples"):
        log.warning("ingest: skipped %s", line)
    for line in counts.bad_record_examples:
        log.warning("ingest: bad record %s", line)
    write_json(report_path, report)
    log.info(
        "ingest: %d documents, %.2f MB from %d files (%d cut into parts, %d bad records skipped, %d binary skipped, "
        "%d empty dropped, %d with invalid UTF-8)",
        counts.documents, counts.bytes / 1e6, counts.files, counts.inputs_cut_into_parts, counts.bad_records,
        counts.binary_files_skipped, counts.empty_dropped, counts.invalid_utf8_documents,
    )
    return report
