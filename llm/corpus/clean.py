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
import operator
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import compress
from typing import Any

import pyarrow as pa
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


# A whitespace-delimited word none of whose characters is a letter ([^\W\d_] is a letter).
_WORD_WITHOUT_LETTER = re.compile(r"(?<!\S)(?:(?![^\W\d_])\S)+(?!\S)")

# ------------------------------------------------ the word heuristics on an ASCII view, at C speed
# Most documents are ASCII, or ASCII plus punctuation (dashes, curly quotes). For those, the word
# counts and the normalised words come from bytes.translate/count/split on an ASCII view of the
# text instead of Unicode regexes and per-word Python work: the same numbers and words, several
# times faster. In Python's `re` on str, `\s` is str.isspace, `\w` is str.isalnum (or '_'), `\d`
# is str.isdecimal, so in ASCII: whitespace is _ASCII_SPACE, a letter A-Z/a-z, a word character
# (for normal_words) A-Z/a-z/0-9.
_ASCII_SPACE = bytes(i for i in range(128) if chr(i).isspace())  # \t\n\v\f\r, \x1c-\x1f, ' '
_ASCII_LETTERS = bytes(i for i in range(128) if chr(i).isalpha())
# Non-whitespace -> 'x', whitespace -> ' ': the words are the runs of 'x'.
_WORD_RUNS = bytes(32 if i in _ASCII_SPACE else 120 for i in range(256))
# After deleting every byte that is neither whitespace nor a letter: the runs of 'x' are the words
# that hold a letter (a word with none vanishes; no two words merge, the whitespace stays).
_NOT_SPACE_OR_LETTER = bytes(i for i in range(256) if i not in _ASCII_SPACE and i not in _ASCII_LETTERS)
# Lowercase, and every byte that is not a letter or digit -> ' ' (normal_words' separators).
_NORMAL = bytes(i | 0x20 if chr(i).isalpha() and i < 128 else i if chr(i).isdigit() and i < 128 else 32 for i in range(256))
_ASCII_BYTES = bytes(range(128))


def _ascii_view(text: str) -> bytes | None:
    """The text as ASCII bytes for the word heuristics: each non-ASCII character (never a
    letter or digit here) becomes one ' ' if it is whitespace, else one '#'. None when the text
    has a non-ASCII letter or digit (or a lone surrogate): the Unicode path runs then."""
    if text.isascii():
        return text.encode("ascii")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    # Deleting the ASCII bytes leaves whole UTF-8 sequences: the non-ASCII characters.
    others = set(data.translate(None, _ASCII_BYTES).decode("utf-8"))
    if len(others) > 64 or any(c.isalnum() for c in others):
        return None
    for c in others:  # UTF-8 is self-synchronising: a character's bytes match only at its boundaries
        data = data.replace(c.encode("utf-8"), b" " if c.isspace() else b"#")
    return data


def _runs(marks: bytes) -> int:
    """The number of runs of b'x' in a string of b'x' and b' '."""
    return (marks[:1] == b"x") + marks.count(b" x")


def _word_counts(text: str, view: bytes | None) -> tuple[int, int]:
    """(words, words without a letter): len(text.split()) and the matches of _WORD_WITHOUT_LETTER."""
    if view is None:
        n_words = len(text.split())
        return n_words, len(_WORD_WITHOUT_LETTER.findall(text)) if n_words else 0
    n_words = _runs(view.translate(_WORD_RUNS))
    return n_words, n_words - _runs(view.translate(_WORD_RUNS, _NOT_SPACE_OR_LETTER))


def quality_failure(text: str, q, view: bytes | None | bool = True) -> str | None:
    """The first Gopher/C4-style heuristic the document fails, or None. `view`: the text's
    _ascii_view when the caller has it (True: compute it here)."""
    n_chars = len(text)
    if n_chars < q.min_chars:
        return "too_short"
    if n_chars > q.max_chars:
        return "too_long"
    if view is True:
        view = _ascii_view(text)
    n_words, no_letter = _word_counts(text, view)
    if n_words < q.min_words:
        return "too_few_words"
    if n_words:
        alpha = n_words - no_letter
        if alpha / n_words < q.min_alpha_word_fraction:
            return "low_alpha_words"
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        if symbols / n_words > q.max_symbol_word_ratio:
            return "symbol_ratio"
    # Non-blank stripped lines; a line counts as a duplicate from its second occurrence on when
    # it has at least duplicate_line_min_chars characters. Counted with sets and C-level maps.
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    if lines:
        lengths = list(map(len, lines))
        long = list(compress(lines, map(partial(operator.le, q.duplicate_line_min_chars), lengths)))
        distinct = set(long)
        dup_lines = len(long) - len(distinct)
        if dup_lines / len(lines) > q.max_duplicate_line_fraction:
            return "duplicate_lines"
        dup_chars = sum(map(len, long)) - sum(map(len, distinct))
        if dup_chars / max(1, sum(lengths)) > q.max_duplicate_line_char_fraction:
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


def _signature_words(text: str, view: bytes | None) -> tuple[list[bytes], bytes]:
    """normal_words as UTF-8 bytes, and their join by spaces (what dedup_key hashes): from the
    ASCII view when there is one. rensa hashes a str token by its UTF-8 bytes, so byte shingles
    give the same MinHash."""
    if view is not None:
        words = view.translate(_NORMAL).split()
        return words, b" ".join(words)
    joined = " ".join(normal_words(text)).encode("utf-8")
    return joined.split(b" ") if joined else [], joined


def _shingles(words: list[bytes], joined: bytes, n: int) -> list[bytes]:
    """shingles() over byte words."""
    if len(words) <= n:
        return [joined]
    return list(map(b" ".join, zip(*(words[i:] for i in range(n)))))


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
    view = _ascii_view(text)
    out.reason = quality_failure(text, params.quality, view)
    if out.reason is None and params.language.enabled and not _language(text, params):
        out.reason = "language"
    if out.reason is None and (params.exact_dedup or params.near_dedup.enabled):
        # The same as dedup_key(normal_words(text)) and shingles(normal_words(text), n), on bytes.
        words, joined = _signature_words(text, view)
        if params.exact_dedup:
            out.key = hashlib.sha256(joined).hexdigest()
        if params.near_dedup.enabled:
            import rensa

            m = rensa.RMinHash(num_perm=params.near_dedup.num_perm, seed=seed)
            m.update(_shingles(words, joined, params.near_dedup.shingle_words))
            out.minhash = m
    return out


_RAW_COLUMNS = ["doc_id", "source", "uri", "text", "n_bytes"]


def _clean_row_group(task: tuple[str, int]) -> tuple[list[Cleaned], pa.Table]:
    """One row group: its documents (their text dropped) and, as an Arrow table, the rows of those
    that passed the per-document filters. The text goes to the main process in Arrow buffers, and
    the table is built here, in parallel; the main process only filters out the duplicates."""
    params, seed = _STATE["params"], _STATE["seed"]
    docs = [clean_document(r, params, seed) for r in read_row_group(task, _RAW_COLUMNS).to_pylist()]
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
        for docs, table in units:
            keep: list[bool] = []  # per row of `table`: the documents that passed the per-document filters
            for doc in docs:
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
