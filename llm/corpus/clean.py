"""Stage `clean`: data/raw -> data/clean (Parquet) + a filter report.

Per document, in worker processes: unicode repair and NFC, markdown -> plain text, PII
redaction, whitespace normalisation, then the filters that judge one document (quality
heuristics, language id) and the duplicate filters' signatures. Then, in input order in the main
process: exact dedup by a hash of the normalised content, and near-duplicate removal by MinHash
LSH (rensa). The filters are defined and listed once, in FILTERS (llm/corpus/filters.py); every one
counts the documents and bytes it removed, like datatrove's per-step stats. docs/filters.md
describes them.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from llm.config import CleanParams, Params
from llm.corpus.filters import FILTERS, Doc, DocumentFilter, DuplicateFilter, build_filters, first_failure
from llm.corpus.tables import CLEAN_ARROW_SCHEMA, TableWriter, count_rows, read_row_group, row_groups
from llm.errors import UserError
from llm.io import atomic_dir, write_json
from llm.layout import Layout
from llm.parallel import engine_name, ordered_map, resolve_workers, row_group_name
from llm.progress import progress_enabled

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- text steps
# ftfy changes nothing in text made only of printable ASCII, newlines and tabs (no '&' for
# HTML entities, no ESC for terminal codes, no '\r'): skip it there, it runs at ~2 MB/s.
_FTFY_NOOP = re.compile(r"[^\x20-\x25\x27-\x7e\n\t]")
_FTFY_NOOP_BYTES = bytes([*range(0x20, 0x26), *range(0x27, 0x7F), 0x0A, 0x09])


def _ftfy_may_change(text: str) -> bool:
    """Whether _FTFY_NOOP matches somewhere: any non-ASCII character does; in ASCII text, what
    is left after deleting the characters it skips (a bytes.translate, ~20x the regex scan)."""
    return not text.isascii() or bool(text.encode("ascii").translate(None, _FTFY_NOOP_BYTES))


def fix_unicode(text: str) -> str:
    """ftfy repair (mojibake, control characters, HTML entities) and NFC normalisation.

    ftfy fixes text line by line; only the lines it could change are handed to it. Whether
    HTML entities are decoded is decided for the whole document (not when it contains '<'),
    where ftfy would decide it from the first line with a '<' on.
    """
    if _ftfy_may_change(text):
        import ftfy

        unescape = False if "<" in text else "auto"
        out, pos = [], 0
        while (m := _FTFY_NOOP.search(text, pos)) is not None:
            # The whole line around the match, with its newline, as ftfy splits a text itself.
            start = text.rfind("\n", pos, m.start()) + 1 or pos
            end = text.find("\n", m.start()) + 1 or len(text)
            out.append(text[pos:start])
            out.append(ftfy.fix_text(text[start:end], normalization="NFC", unescape_html=unescape))
            pos = end
        out.append(text[pos:])
        text = "".join(out)
    # sentencepiece reserves U+2581 as its space marker; a literal one would decode as a space.
    return text.replace("\u2581", "_")


_BLOCKS = {"paragraph", "heading", "lheading", "code_block", "fence", "blockquote", "list_item", "table",
           "thematic_break"}
_SKIP = {"html_block", "html_inline", "image_reference"}
_MD = None


def strip_markdown(text: str) -> str:
    """Markdown rendered to plain text: markup (`**`, `_`, `#`, links, HTML) goes, words stay.

    Parsed by markdown-it (its Rust port): line breaks inside paragraphs are kept, blocks are
    separated by a blank line.
    """
    global _MD
    if _MD is None:
        from markdown_it_pyrs import MarkdownIt

        _MD = MarkdownIt("commonmark")
    out: list[str] = []
    _render(_MD.tree(text), out)
    return _STRAY_EMPHASIS.sub("", "".join(out))


# Emphasis delimiters the parser left as text because the source's markup was unbalanced
# (`__\[Awaking]_` in the default corpus): `_`/`*` runs at a word's edge, not inside a word.
_STRAY_EMPHASIS = re.compile(r"(?<!\w)[_*]+(?=\S)|(?<=\S)[_*]+(?!\w)")


def _render(node: Any, out: list[str]) -> None:
    name = node.name
    if name in _SKIP:
        return
    if name in ("text", "text_special", "code_inline"):
        out.append(node.meta.get("content", ""))
    elif name in ("softbreak", "hardbreak"):
        out.append("\n")
    elif name in ("code_block", "fence"):
        out.append(node.meta.get("content", ""))
    for child in node.children:
        _render(child, out)
    if name in _BLOCKS:
        out.append("\n\n")


_HSPACE = re.compile(r"[^\S\n]+")
_ODD_SPACE = re.compile(r"[^\S\n ]")  # whitespace other than a space or a newline
_ODD_ASCII_SPACE = tuple(c for c in map(chr, range(128)) if c.isspace() and c not in " \n")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def _has_odd_space(text: str) -> bool:
    """Whether _ODD_SPACE matches: in ASCII text, a few single-character scans instead of the regex."""
    if text.isascii():
        return any(c in text for c in _ODD_ASCII_SPACE)
    return _ODD_SPACE.search(text) is not None


def normalize_whitespace(text: str) -> str:
    """Runs of spaces, tabs and other non-newline whitespace -> one space; no trailing
    spaces; at most one blank line in a row; no leading or trailing blank lines.
    Each rewrite runs only where a cheap scan finds something to rewrite."""
    if "  " in text or _has_odd_space(text):
        text = _HSPACE.sub(" ", text)
    if " \n" in text or "\n " in text:
        text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip("\n ")


_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def redact_pii(text: str, email_token: str, ip_token: str) -> tuple[str, int]:
    """Emails and IP addresses (v4, and v6 that `ipaddress` accepts) -> tokens. Returns the
    text and the number of redactions."""
    count = 0

    def sub(token: str):
        def f(_m: re.Match) -> str:
            nonlocal count
            count += 1
            return token

        return f

    def sub_v6(m: re.Match) -> str:
        nonlocal count
        try:
            ipaddress.IPv6Address(m.group(0))
        except ValueError:
            return m.group(0)
        count += 1
        return ip_token

    text = _EMAIL.sub(sub(email_token), text)
    text = _IPV4.sub(sub(ip_token), text)
    if ":" in text:
        text = _IPV6_CANDIDATE.sub(sub_v6, text)
    return text, count


# ----------------------------------------------------------------------------- per document
@dataclass
class Cleaned:
    doc_id: str
    source: str
    uri: str
    text: str
    n_bytes_in: int
    n_bytes_out: int = 0
    reason: str | None = None
    signatures: list[Any] = field(default_factory=list)  # one per duplicate filter that is on
    unicode_changed: bool = False
    markdown_stripped: bool = False
    pii_redactions: int = 0


_STATE: dict[str, Any] = {}


def _init_worker(params: CleanParams, seed: int) -> None:
    _STATE["params"] = params
    _STATE["filters"] = build_filters(params, seed)


def _wants_markdown(uri: str, mode: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    base = uri.split("#", 1)[0].split("!")[-1].lower()
    return base.endswith((".md", ".markdown", ".md.gz"))


def clean_document(row: dict[str, Any], params: CleanParams, document_filters: Sequence[DocumentFilter],
                   duplicate_filters: Sequence[DuplicateFilter]) -> Cleaned:
    text: str = row["text"]
    out = Cleaned(row["doc_id"], row["source"], row["uri"], text, row["n_bytes"])
    if params.fix_unicode:
        fixed = fix_unicode(text)
        out.unicode_changed = fixed != text
        text = fixed
    if _wants_markdown(row["uri"], params.strip_markdown):
        text = strip_markdown(text)
        out.markdown_stripped = True
    if params.pii.enabled:
        text, out.pii_redactions = redact_pii(text, params.pii.email_token, params.pii.ip_token)
    if params.normalize_whitespace:
        text = normalize_whitespace(text)
    out.text = text
    doc = Doc(text)
    out.reason = first_failure(doc, document_filters)
    if out.reason is None:
        out.signatures = [f.signature(doc) for f in duplicate_filters]
    return out


_RAW_COLUMNS = ["doc_id", "source", "uri", "text", "n_bytes"]


def _clean_row_group(task: tuple[str, int]) -> tuple[list[Cleaned], pa.Table]:
    """One row group: its documents (their text dropped) and, as an Arrow table, the rows of those
    that passed the per-document filters. The text goes to the main process in Arrow buffers, and
    the table is built here, in parallel; the main process only filters out the duplicates."""
    params, (document_filters, duplicate_filters) = _STATE["params"], _STATE["filters"]
    rows = read_row_group(task, _RAW_COLUMNS).to_pylist()
    docs = [clean_document(r, params, document_filters, duplicate_filters) for r in rows]
    passed = [d for d in docs if d.reason is None]
    for d in passed:
        d.n_bytes_out = len(d.text) if d.text.isascii() else len(d.text.encode("utf-8"))
    table = pa.Table.from_pydict(
        {
            "doc_id": [d.doc_id for d in passed],
            "source": [d.source for d in passed],
            "uri": [d.uri for d in passed],
            "text": [d.text for d in passed],
            "n_bytes": [d.n_bytes_out for d in passed],
        },
        schema=CLEAN_ARROW_SCHEMA,
    )
    for d in docs:
        d.text = ""
    return docs, table


# ----------------------------------------------------------------------------- the stage
@dataclass
class FilterReport:
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    removed: dict[str, dict[str, int]] = field(
        default_factory=lambda: {f.name: {"documents": 0, "bytes": 0} for f in FILTERS})
    unicode_repaired_documents: int = 0
    markdown_stripped_documents: int = 0
    pii_redactions: int = 0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["removed_documents_total"] = sum(v["documents"] for v in self.removed.values())
        return out


def clean(params: Params, layout: Layout) -> dict:
    """Clean the raw table into the clean table; return (and write) the filter report."""
    params, seed, compute = params.clean, params.seed, params.compute
    raw_dir, out_dir, report_path = layout.raw, layout.clean, layout.metrics("clean")
    workers = resolve_workers(params.num_workers)
    total_docs = count_rows(raw_dir)
    log.info("clean: %d documents from %s on %s", total_docs, raw_dir, engine_name(compute, workers))
    report = FilterReport()
    _, duplicate_filters = build_filters(params, seed)  # the ones that remember what was kept
    tasks = row_groups(raw_dir)
    with atomic_dir(out_dir) as tmp, TableWriter(tmp, CLEAN_ARROW_SCHEMA, "clean") as writer:
        bar = tqdm(total=total_docs, desc="clean", unit="doc", disable=not progress_enabled(), mininterval=1.0)
        units = ordered_map(_clean_row_group, tasks, workers, _init_worker, (params, seed),
                            compute=compute, stage="clean", unit_name=row_group_name)
        for docs, table in units:
            keep: list[bool] = []  # per row of `table`: the documents that passed the per-document filters
            for doc in docs:
                report.documents_in += 1
                report.bytes_in += doc.n_bytes_in
                report.unicode_repaired_documents += doc.unicode_changed
                report.markdown_stripped_documents += doc.markdown_stripped
                report.pii_redactions += doc.pii_redactions
                reason = doc.reason
                if reason is None:  # the first duplicate filter that has seen it; the others never see it
                    reason = next((f.name for f, sig in zip(duplicate_filters, doc.signatures) if f.seen(sig)), None)
                if doc.reason is None:
                    keep.append(reason is None)
                if reason is not None:
                    report.removed[reason]["documents"] += 1
                    report.removed[reason]["bytes"] += doc.n_bytes_in
                    continue
                report.documents_out += 1
                report.bytes_out += doc.n_bytes_out
            writer.write_table(table if all(keep) else table.filter(pa.array(keep, pa.bool_())))
            bar.update(len(docs))
        bar.close()
        if report.documents_out == 0:
            raise UserError(
                f"clean: every document was removed ({_top_reasons(report)}); loosen clean.quality "
                "or the dedup thresholds"
            )
    result = report.as_dict()
    write_json(report_path, result)
    log.info(
        "clean: kept %d of %d documents (%.2f of %.2f MB); removed: %s",
        report.documents_out, report.documents_in, report.bytes_out / 1e6, report.bytes_in / 1e6, _top_reasons(report),
    )
    return result


def _top_reasons(report: FilterReport) -> str:
    parts = [f"{k} {v['documents']}" for k, v in report.removed.items() if v["documents"]]
    return ", ".join(parts) or "nothing"
