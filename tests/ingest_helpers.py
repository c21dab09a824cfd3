"""What the ingest tests share: a line of prose to fill files with, ingest's reader on a list of
sources, and the ingest stage on a directory."""

from __future__ import annotations

from pathlib import Path

from llm.config import IngestParams, Params
from llm.corpus.dispatch import iter_documents
from llm.corpus.ingest import ingest
from llm.corpus.readers import ReadCounts
from llm.layout import Layout

PROSE = "Now is the winter of our discontent made glorious summer by this sun of York.\n"


def read(root: Path, sources: list[str], **params):
    """The documents the sources hold (the inbox off), and the counts of what was read."""
    counts = ReadCounts()
    docs = list(iter_documents(IngestParams(sources=sources, inbox="", **params), root, counts))
    return docs, counts


def run_ingest(root: Path, sources: list[str], **params) -> dict:
    """The ingest stage on root (data/raw, metrics/ingest.json); its report."""
    return ingest(Params(ingest=IngestParams(sources=sources, **params)), Layout(root))
