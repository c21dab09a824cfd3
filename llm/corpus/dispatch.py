"""Sources -> documents, in order: every file read here, or each as a unit on a Ray worker
(compute.data_engine: ray, through llm/parallel.py, which alone imports Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.config import ComputeParams, IngestParams
from llm.corpus.readers import Document, ReadCounts, Reader
from llm.corpus.resolve import Entry, inbox_entries, resolve_source
from llm.parallel import ordered_map


def iter_documents(
    params: IngestParams, root: Path, counts: ReadCounts, compute: ComputeParams | None = None
) -> Iterator[Document]:
    """Every document of every source, then of the inbox, in a stable order. Sources are
    resolved up front, so a missing one fails before anything is read; too many bad records
    fail at the end, before anything is written.

    The local engine streams each file here, in the driver. On Ray each file (an archive with
    its members) is a unit read by a worker, which returns the file's documents whole; they
    come back in file order, so the documents, their order and the counts are the same."""
    resolved = [(s, resolve_source(s, root, f"ingest.sources[{i}]")) for i, s in enumerate(params.sources)]
    if entries := inbox_entries(params.inbox, root):
        resolved.append((params.inbox, entries))
    units = [(source, entry) for source, entries in resolved for entry in entries]
    if compute is not None and compute.data_engine == "ray":
        files = ordered_map(_read_unit, units, 1, _init_reader, (params,), compute=compute, stage="ingest",
                            unit_name=_unit_name)
    else:
        files = ((source, Reader(source, params, counts).read(entry), None) for source, entry in units)
    for source, docs, read_apart in files:
        if read_apart is not None:  # what the worker counted while reading the file
            counts.merge(read_apart)
        for doc in docs:
            counts.documents += 1
            counts.bytes += doc.n_bytes
            counts.per_source[source] = counts.per_source.get(source, 0) + 1
            yield doc
    counts.check_bad_fraction(params.max_bad_fraction)


_READER: dict[str, Any] = {}


def _init_reader(params: IngestParams) -> None:
    _READER["params"] = params


def _read_unit(unit: tuple[str, Entry]) -> tuple[str, list[Document], ReadCounts]:
    """One file read in a worker: its documents and what reading them counted."""
    source, entry = unit
    counts = ReadCounts()
    docs = list(Reader(source, _READER["params"], counts).read(entry))
    return source, docs, counts


def _unit_name(unit: tuple[str, Entry]) -> str:
    return unit[1].uri
