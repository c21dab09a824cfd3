"""Stage `clean`: data/raw -> data/clean (Parquet) + a filter report.

Per document, in worker processes: unicode repair and NFC, markdown -> plain text, PII
redaction, whitespace normalisation, quality heuristics, language id, and the dedup
signatures. Then, in input order in the main process: exact dedup by a hash of the normalised
content, and near-duplicate removal by MinHash LSH (rensa). Every filter counts the documents
and bytes it removed, like datatrove's per-step stats.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from llm.config import CleanParams, Params
from llm.corpus.tables import CLEAN_ARROW_SCHEMA, TableWriter, count_rows, read_row_group, row_groups
from llm.errors import UserError
from llm.io import atomic_dir, write_json
from llm.layout import Layout
from llm.parallel import engine_name, ordered_map, resolve_workers, row_group_name
from llm.progress import progress_enabled

log = logging.getLogger(__name__)

# The order filters run in; the report lists them in this order.
FILTERS = (
    "too_short",
    "too_long",
    "too_few_words",
    "low_alpha_words",
    "symbol_ratio",
    "duplicate_lines",
    "duplicate_line_chars",
    "language",
    "exact_duplicate",
    "near_duplicate",
)

# ----------------------------------------------------------------------------- text steps
# ftfy changes nothing in text made only of printable ASCII, newlines and tabs (no '&' for
# HTML entities, no ESC for terminal codes, no '\r'): skip it there, it runs at ~2 MB/s.
_FTFY_NOOP = re.compile(r"[^\x20-\x25\x27-\x7e\n\t]")


def fix_unicode(text: str) -> str:
    """ftfy repair (mojibake, control characters, HTML entities) and NFC normalisation.

    ftfy fixes text line by line; only the lines it could change are handed to it. Whether
    HTML entities are decoded is decided for the whole document (not when it contains '<'),
    where ftfy would decide it from the first line with a '<' on.
    """
    if _FTFY_NOOP.search(text) is not None:
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


_BLOCKS = {"paragraph", "heading", "lheading", "code_block", "fence", "blockquote", "list_item", "table", "thematic_break"}
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
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Runs of spaces, tabs and other non-newline whitespace -> one space; no trailing
    spaces; at most one blank line in a row; no leading or trailing blank lines.
    Each rewrite runs only where a cheap scan finds something to rewrite."""
    if "  " in text or _ODD_SPACE.search(text) is not None:
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


# A whitespace-delimited word none of whose characters is a letter ([^\W\d_] is a letter).
_WORD_WITHOUT_LETTER = re.compile(r"(?<!\S)(?:(?![^\W\d_])\S)+(?!\S)")


def quality_failure(text: str, q) -> str | None:
    """The first Gopher/C4-style heuristic the document fails, or None."""
    n_chars = len(text)
    if n_chars < q.min_chars:
        return "too_short"
    if n_chars > q.max_chars:
        return "too_long"
    n_words = len(text.split())
    if n_words < q.min_words:
        return "too_few_words"
    if n_words:
        alpha = n_words - len(_WORD_WITHOUT_LETTER.findall(text))
        if alpha / n_words < q.min_alpha_word_fraction:
            return "low_alpha_words"
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / n_words > q.max_symbol_word_ratio:
            return "symbol_ratio"
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if lines:
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen and len(line) >= q.duplicate_line_min_chars:
                dup_lines += 1
                dup_chars += len(line)
            seen.add(line)
        if dup_lines / len(lines) > q.max_duplicate_line_fraction:
            return "duplicate_lines"
        if dup_chars / max(1, sum(len(line) for line in lines)) > q.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"
    return None


_WORD = re.compile(r"[^\W_]+")


def normal_words(text: str) -> list[str]:
    """The lowercased words (runs of letters and digits): punctuation and spacing do not count."""
    return _WORD.findall(text.lower())


def dedup_key(words: list[str]) -> str:
    """Exact-duplicate key: the hash of the normalised words, so copies that differ only in
    case, punctuation or spacing are caught."""
    return hashlib.sha256(" ".join(words).encode("utf-8")).hexdigest()


def shingles(words: list[str], n: int) -> list[str]:
    """Word n-grams (one shingle for shorter texts)."""
    if len(words) <= n:
        return [" ".join(words)]
    return list(map(" ".join, zip(*(words[i:] for i in range(n)))))


# ----------------------------------------------------------------------------- per document
@dataclass
class Cleaned:
    doc_id: str
    source: str
    uri: str
    text: str
    n_bytes_in: int
    reason: str | None = None
    key: str = ""
    minhash: Any = None
    unicode_changed: bool = False
    markdown_stripped: bool = False
    pii_redactions: int = 0


_STATE: dict[str, Any] = {}


def _init_worker(params: CleanParams, seed: int) -> None:
    _STATE["params"] = params
    _STATE["seed"] = seed
    _STATE["langid"] = None


def _language(text: str, params: CleanParams) -> bool:
    ident = _STATE.get("langid")
    if ident is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        _STATE["langid"] = ident
    lang, prob = ident.classify(text[:20_000])
    return lang in params.language.allowed and prob >= params.language.min_confidence


def _wants_markdown(uri: str, mode: str) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    base = uri.split("#", 1)[0].split("!")[-1].lower()
    return base.endswith((".md", ".markdown", ".md.gz"))


def clean_document(row: dict[str, Any], params: CleanParams, seed: int) -> Cleaned:
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
    out.reason = quality_failure(text, params.quality)
    if out.reason is None and params.language.enabled and not _language(text, params):
        out.reason = "language"
    if out.reason is None and (params.exact_dedup or params.near_dedup.enabled):
        words = normal_words(text)
        if params.exact_dedup:
            out.key = dedup_key(words)
        if params.near_dedup.enabled:
            import rensa

            m = rensa.RMinHash(num_perm=params.near_dedup.num_perm, seed=seed)
            m.update(shingles(words, params.near_dedup.shingle_words))
            out.minhash = m
    return out


_RAW_COLUMNS = ["doc_id", "source", "uri", "text", "n_bytes"]


def _clean_row_group(task: tuple[str, int]) -> list[Cleaned]:
    rows = read_row_group(task, _RAW_COLUMNS).to_pylist()
    return [clean_document(r, _STATE["params"], _STATE["seed"]) for r in rows]


# ----------------------------------------------------------------------------- dedup
class NearDuplicateIndex:
    """MinHash LSH over the documents kept so far. A document is a near-duplicate when an LSH
    candidate's estimated Jaccard similarity reaches the threshold."""

    def __init__(self, threshold: float, num_perm: int, num_bands: int):
        import rensa

        self.threshold = threshold
        self.lsh = rensa.RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=num_bands)
        self.sketches: list[Any] = []

    def seen(self, minhash: Any) -> bool:
        return any(self.sketches[key].jaccard(minhash) >= self.threshold for key in self.lsh.query(minhash))

    def add(self, minhash: Any) -> None:
        self.lsh.insert(len(self.sketches), minhash)
        self.sketches.append(minhash)


@dataclass
class FilterReport:
    documents_in: int = 0
    bytes_in: int = 0
    documents_out: int = 0
    bytes_out: int = 0
    removed: dict[str, dict[str, int]] = field(default_factory=lambda: {f: {"documents": 0, "bytes": 0} for f in FILTERS})
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
    seen_keys: set[str] = set()
    near = (
        NearDuplicateIndex(params.near_dedup.threshold, params.near_dedup.num_perm, params.near_dedup.num_bands)
        if params.near_dedup.enabled
        else None
    )
    tasks = row_groups(raw_dir)
    with atomic_dir(out_dir) as tmp, TableWriter(tmp, CLEAN_ARROW_SCHEMA, "clean") as writer:
        bar = tqdm(total=total_docs, desc="clean", unit="doc", disable=not progress_enabled(), mininterval=1.0)
        units = ordered_map(_clean_row_group, tasks, workers, _init_worker, (params, seed),
                            compute=compute, stage="clean", unit_name=row_group_name)
        for results in units:
            rows: dict[str, list] = {name: [] for name in CLEAN_ARROW_SCHEMA.names}
            for doc in results:
                report.documents_in += 1
                report.bytes_in += doc.n_bytes_in
                report.unicode_repaired_documents += doc.unicode_changed
                report.markdown_stripped_documents += doc.markdown_stripped
                report.pii_redactions += doc.pii_redactions
                reason = doc.reason
                if reason is None and params.exact_dedup:
                    if doc.key in seen_keys:
                        reason = "exact_duplicate"
                    else:
                        seen_keys.add(doc.key)
                if reason is None and near is not None:
                    if near.seen(doc.minhash):
                        reason = "near_duplicate"
                    else:
                        near.add(doc.minhash)
                if reason is not None:
                    report.removed[reason]["documents"] += 1
                    report.removed[reason]["bytes"] += doc.n_bytes_in
                    continue
                n_bytes = len(doc.text.encode("utf-8"))
                report.documents_out += 1
                report.bytes_out += n_bytes
                rows["doc_id"].append(doc.doc_id)
                rows["source"].append(doc.source)
                rows["uri"].append(doc.uri)
                rows["text"].append(doc.text)
                rows["n_bytes"].append(n_bytes)
            writer.write(rows)
            bar.update(len(results))
        bar.close()
        if report.documents_out == 0:
            raise UserError(
                f"clean: every document was removed ({_top_reasons(report)}); loosen clean.quality or the dedup thresholds"
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
