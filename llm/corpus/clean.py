"""Stage `clean`: data/raw -> data/clean (Parquet) + a filter report.

Per document, in worker processes: unicode repair and NFC, markdown -> plain text, PII
redaction, whitespace normalisation, then the filters that judge one document (quality
heuristics, language id) and the duplicate filters' signatures. Then, in input order in the main
process: exact dedup by a hash of the normalised content, and near-duplicate removal by MinHash
LSH (rensa). The filters are listed once, in FILTERS; every one counts the documents and bytes it
removed, like datatrove's per-step stats. docs/filters.md describes them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cache, cached_property, partial
from itertools import compress
from typing import Any, ClassVar

import pyarrow as pa
from tqdm import tqdm

from llm.config import CleanParams, Params, QualityParams
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


_WORD = re.compile(r"[^\W_]+")


def normal_words(text: str) -> list[str]:
    """The lowercased words (runs of letters and digits): punctuation and spacing do not count."""
    return _WORD.findall(text.lower())


def _signature_words(text: str, view: bytes | None) -> tuple[list[bytes], bytes]:
    """normal_words as UTF-8 bytes, and their join by spaces (what the exact-duplicate key hashes):
    from the ASCII view when there is one. rensa hashes a str token by its UTF-8 bytes, so byte
    shingles give the same MinHash."""
    if view is not None:
        words = view.translate(_NORMAL).split()
        return words, b" ".join(words)
    joined = " ".join(normal_words(text)).encode("utf-8")
    return joined.split(b" ") if joined else [], joined


def _shingles(words: list[bytes], joined: bytes, n: int) -> list[bytes]:
    """The word n-grams of the byte words; one shingle, the whole text, when it has n words or fewer."""
    if len(words) <= n:
        return [joined]
    return list(map(b" ".join, zip(*(words[i:] for i in range(n)))))


# ----------------------------------------------------------------------------- the filters
# A filter is one unit: its name (the reason a document it removes gets, its row in the filter
# report), its params (the dataclass fields) and its test. FILTERS, at the end of this section,
# lists every filter once, in the order they run; clean_document, the filter report, the Dagster
# page and the check of clean.quality against the filters all read it.
class Doc:
    """A document's text as the filters see it, with what several filters share, each computed
    once, on first use: the ASCII view, the word counts, the non-blank lines, the normal words."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._repeated: dict[int, tuple[int, int]] = {}

    @cached_property
    def ascii_view(self) -> bytes | None:
        """_ascii_view(text): None when the text has a non-ASCII letter or digit."""
        return _ascii_view(self.text)

    @cached_property
    def word_counts(self) -> tuple[int, int]:
        """(words, words without a letter), from the ASCII view when there is one."""
        return _word_counts(self.text, self.ascii_view)

    @cached_property
    def lines(self) -> list[str]:
        """The non-blank lines, stripped."""
        return list(filter(None, map(str.strip, self.text.split("\n"))))

    @cached_property
    def line_chars(self) -> int:
        return sum(map(len, self.lines))

    def repeated_lines(self, min_chars: int) -> tuple[int, int]:
        """(lines, characters) in lines of at least min_chars characters that repeat an earlier
        line: a line counts from its second occurrence on. Counted with sets and C-level maps."""
        if min_chars not in self._repeated:
            long = list(compress(self.lines, map(partial(operator.le, min_chars), map(len, self.lines))))
            distinct = set(long)
            self._repeated[min_chars] = (len(long) - len(distinct), sum(map(len, long)) - sum(map(len, distinct)))
        return self._repeated[min_chars]

    @cached_property
    def signature_words(self) -> tuple[list[bytes], bytes]:
        """normal_words(text) as UTF-8 bytes, and their join by spaces."""
        return _signature_words(self.text, self.ascii_view)


class Filter:
    """What every filter has. A filter is a dataclass whose fields are its params; `name` is the
    reason a document it removes gets; the docstring's first paragraph says what it removes."""

    name: ClassVar[str]

    @classmethod
    def from_params(cls, params: CleanParams, seed: int) -> Filter | None:
        """The filter with its params from the clean group; None when they turn it off."""
        raise NotImplementedError

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]

    @classmethod
    def summary(cls) -> str:
        """What it removes: the docstring's first paragraph, on one line."""
        return " ".join((cls.__doc__ or cls.name).split("\n\n")[0].split())


class DocumentFilter(Filter):
    """A filter that judges one document by its text alone; runs in the worker processes."""

    def removes(self, doc: Doc) -> bool:
        raise NotImplementedError


class QualityFilter(DocumentFilter):
    """A Gopher / C4 style heuristic whose params are the clean.quality keys of the same names."""

    @classmethod
    def from_params(cls, params: CleanParams, seed: int) -> QualityFilter:
        return cls(**{name: getattr(params.quality, name) for name in cls.param_names()})


class DuplicateFilter(Filter):
    """A filter that removes a document matching one kept before it: the signature is computed per
    document in the workers, the comparison runs in the main process, in input order."""

    def signature(self, doc: Doc) -> Any:
        raise NotImplementedError

    def seen(self, signature: Any) -> bool:
        """Whether an earlier kept document matches; when none does, this one is remembered."""
        raise NotImplementedError


@dataclass(frozen=True)
class TooShort(QualityFilter):
    """Documents of fewer than min_chars characters."""

    name = "too_short"
    min_chars: int

    def removes(self, doc: Doc) -> bool:
        return len(doc.text) < self.min_chars


@dataclass(frozen=True)
class TooLong(QualityFilter):
    """Documents of more than max_chars characters."""

    name = "too_long"
    max_chars: int

    def removes(self, doc: Doc) -> bool:
        return len(doc.text) > self.max_chars


@dataclass(frozen=True)
class TooFewWords(QualityFilter):
    """Documents of fewer than min_words whitespace-separated words."""

    name = "too_few_words"
    min_words: int

    def removes(self, doc: Doc) -> bool:
        return doc.word_counts[0] < self.min_words


@dataclass(frozen=True)
class LowAlphaWords(QualityFilter):
    """Documents in which less than min_alpha_word_fraction of the words hold a letter (tables of
    numbers, code dumps)."""

    name = "low_alpha_words"
    min_alpha_word_fraction: float

    def removes(self, doc: Doc) -> bool:
        n_words, no_letter = doc.word_counts
        return n_words > 0 and (n_words - no_letter) / n_words < self.min_alpha_word_fraction


@dataclass(frozen=True)
class SymbolRatio(QualityFilter):
    """Documents with more than max_symbol_word_ratio of '#', '...' and '…' per word (hashtag
    lists, truncated snippets)."""

    name = "symbol_ratio"
    max_symbol_word_ratio: float

    def removes(self, doc: Doc) -> bool:
        n_words = doc.word_counts[0]
        if not n_words:
            return False
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("\u2026")
        return symbols / n_words > self.max_symbol_word_ratio


@dataclass(frozen=True)
class DuplicateLines(QualityFilter):
    """Documents in which more than max_duplicate_line_fraction of the non-blank lines repeat an
    earlier line of at least duplicate_line_min_chars characters (boilerplate, spam)."""

    name = "duplicate_lines"
    duplicate_line_min_chars: int
    max_duplicate_line_fraction: float

    def removes(self, doc: Doc) -> bool:
        if not doc.lines:
            return False
        return doc.repeated_lines(self.duplicate_line_min_chars)[0] / len(doc.lines) > self.max_duplicate_line_fraction


@dataclass(frozen=True)
class DuplicateLineChars(QualityFilter):
    """Documents in which more than max_duplicate_line_char_fraction of the characters (of
    non-blank lines) are in lines of at least duplicate_line_min_chars that repeat an earlier one."""

    name = "duplicate_line_chars"
    duplicate_line_min_chars: int
    max_duplicate_line_char_fraction: float

    def removes(self, doc: Doc) -> bool:
        if not doc.lines:
            return False
        chars = doc.repeated_lines(self.duplicate_line_min_chars)[1]
        return chars / max(1, doc.line_chars) > self.max_duplicate_line_char_fraction


@cache
def _language_identifier() -> Any:
    """py3langid's model, loaded once per process."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@dataclass(frozen=True)
class Language(DocumentFilter):
    """Documents whose language (py3langid, on the first 20,000 characters) is not in allowed, or
    is identified with less than min_confidence.

    Params: clean.language; off unless clean.language.enabled."""

    name = "language"
    allowed: tuple[str, ...]
    min_confidence: float

    @classmethod
    def from_params(cls, params: CleanParams, seed: int) -> Language | None:
        lang = params.language
        return cls(tuple(lang.allowed), lang.min_confidence) if lang.enabled else None

    def removes(self, doc: Doc) -> bool:
        lang, prob = _language_identifier().classify(doc.text[:20_000])
        return not (lang in self.allowed and prob >= self.min_confidence)


@dataclass
class ExactDuplicate(DuplicateFilter):
    """Documents whose normal words (lowercased, without punctuation and spacing) equal those of an
    earlier kept document.

    The signature is the SHA-256 of the words joined by spaces. On while clean.exact_dedup."""

    name = "exact_duplicate"
    _keys: set[str] = field(default_factory=set, init=False, repr=False)

    @classmethod
    def from_params(cls, params: CleanParams, seed: int) -> ExactDuplicate | None:
        return cls() if params.exact_dedup else None

    def signature(self, doc: Doc) -> str:
        return hashlib.sha256(doc.signature_words[1]).hexdigest()

    def seen(self, signature: str) -> bool:
        if signature in self._keys:
            return True
        self._keys.add(signature)
        return False


@dataclass
class NearDuplicate(DuplicateFilter):
    """Documents similar to an earlier kept document: the estimated Jaccard similarity of their
    shingles of shingle_words normal words reaches threshold.

    MinHash LSH (rensa). Params: clean.near_dedup (off unless enabled), and the top-level seed."""

    name = "near_duplicate"
    threshold: float
    num_perm: int
    num_bands: int
    shingle_words: int
    seed: int
    _lsh: Any = field(default=None, init=False, repr=False)
    _sketches: list[Any] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def from_params(cls, params: CleanParams, seed: int) -> NearDuplicate | None:
        near = params.near_dedup
        return cls(near.threshold, near.num_perm, near.num_bands, near.shingle_words, seed) if near.enabled else None

    def signature(self, doc: Doc) -> Any:
        import rensa

        minhash = rensa.RMinHash(num_perm=self.num_perm, seed=self.seed)
        minhash.update(_shingles(*doc.signature_words, self.shingle_words))
        return minhash

    def seen(self, signature: Any) -> bool:
        if self._lsh is None:  # only the main process compares
            import rensa

            self._lsh = rensa.RMinHashLSH(threshold=self.threshold, num_perm=self.num_perm, num_bands=self.num_bands)
        if any(self._sketches[key].jaccard(signature) >= self.threshold for key in self._lsh.query(signature)):
            return True
        self._lsh.insert(len(self._sketches), signature)
        self._sketches.append(signature)
        return False


# Every filter, in the order they run (the per-document ones, then the duplicate filters) and the
# order the filter report lists them in. Adding a filter: its class above, its name here, its test.
FILTERS: tuple[type[Filter], ...] = (
    TooShort,
    TooLong,
    TooFewWords,
    LowAlphaWords,
    SymbolRatio,
    DuplicateLines,
    DuplicateLineChars,
    Language,
    ExactDuplicate,
    NearDuplicate,
)


def check_registry(filters: Sequence[type[Filter]], quality: type[QualityParams]) -> None:
    """Raise TypeError, one line naming the filter or key, unless: the names are unique, the
    per-document filters come before the duplicate filters, every quality filter's param is a key
    of clean.quality with the same type, and every key of clean.quality is some filter's param."""
    names = [f.name for f in filters]
    if len(set(names)) < len(names):
        raise TypeError(f"FILTERS: the name {next(n for n in names if names.count(n) > 1)!r} is used twice")
    for before, after in zip(filters, filters[1:]):
        if issubclass(before, DuplicateFilter) and issubclass(after, DocumentFilter):
            raise TypeError(f"FILTERS: {after.name} judges one document: it must come before {before.name}")
    read: set[str] = set()
    for f in filters:
        if not issubclass(f, QualityFilter):
            continue
        for param in fields(f):
            key = quality.model_fields.get(param.name)
            if key is None:
                raise TypeError(f"filter {f.name}: clean.quality.{param.name} is not a field of QualityParams")
            declared = getattr(key.annotation, "__name__", str(key.annotation))
            if param.type != declared:
                raise TypeError(f"filter {f.name}: {param.name} is {param.type}, in QualityParams {declared}")
            read.add(param.name)
    for key in quality.model_fields:
        if key not in read:
            raise TypeError(f"clean.quality.{key} is the param of no filter in FILTERS (llm/corpus/clean.py)")


check_registry(FILTERS, QualityParams)


def build_filters(params: CleanParams, seed: int) -> tuple[list[DocumentFilter], list[DuplicateFilter]]:
    """The filters params turn on, in FILTERS order: those that judge one document, and the
    duplicate filters."""
    on = [f for f in (cls.from_params(params, seed) for cls in FILTERS) if f is not None]
    return [f for f in on if isinstance(f, DocumentFilter)], [f for f in on if isinstance(f, DuplicateFilter)]


def first_failure(doc: Doc, filters: Iterable[DocumentFilter]) -> str | None:
    """The name of the first filter that removes the document, or None."""
    return next((f.name for f in filters if f.removes(doc)), None)


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
