"""The cleaning filters: each one a small dataclass whose fields are its params, listed once in FILTERS.

A filter is the one home of its params: a QualityFilter's field carries its default, its range and
its meaning (`Annotated[int, Field(200, ge=0, description=...)]`), and llm/config.py builds the
`clean.quality` group (QualityParams) from FILTERS with `quality_fields`. So this module is light:
the standard library and pydantic only (config.py imports it); what a filter needs beyond that
(py3langid, rensa) it imports inside its methods. llm/corpus/clean.py runs the filters;
docs/filters.md describes them.
"""

from __future__ import annotations

import hashlib
import operator
import re
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from functools import cache, cached_property, partial
from itertools import compress
from typing import Annotated, Any, ClassVar

from pydantic import Field
from pydantic.fields import FieldInfo

# The `params` of from_params is llm.config.CleanParams, not imported: llm/config.py imports this module.
CleanParams = Any

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
_NORMAL = bytes(
    i | 0x20 if chr(i).isalpha() and i < 128 else i if chr(i).isdigit() and i < 128 else 32 for i in range(256))
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
# report), its params (the dataclass fields, each with its default, range and meaning) and its
# test. FILTERS, at the end of this section, lists every filter once, in the order they run;
# clean.quality (llm/config.py), clean_document, the filter report and the Dagster page read it.
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
    """A Gopher / C4 style heuristic whose params are the clean.quality keys of the same names.

    Each param is declared with its default, range and meaning, `Annotated[float, Field(0.2, ge=0.0,
    le=1.0, description="...")]`: llm/config.py builds clean.quality (QualityParams) from them."""

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
    min_chars: Annotated[int, Field(200, ge=0)]

    def removes(self, doc: Doc) -> bool:
        return len(doc.text) < self.min_chars


@dataclass(frozen=True)
class TooLong(QualityFilter):
    """Documents of more than max_chars characters."""

    name = "too_long"
    max_chars: Annotated[int, Field(50_000_000, ge=1)]

    def removes(self, doc: Doc) -> bool:
        return len(doc.text) > self.max_chars


@dataclass(frozen=True)
class TooFewWords(QualityFilter):
    """Documents of fewer than min_words whitespace-separated words."""

    name = "too_few_words"
    min_words: Annotated[int, Field(20, ge=0)]

    def removes(self, doc: Doc) -> bool:
        return doc.word_counts[0] < self.min_words


@dataclass(frozen=True)
class LowAlphaWords(QualityFilter):
    """Documents in which less than min_alpha_word_fraction of the words hold a letter (tables of
    numbers, code dumps)."""

    name = "low_alpha_words"
    min_alpha_word_fraction: Annotated[float, Field(
        0.7, ge=0.0, le=1.0, description="Fraction of words that contain at least one letter (Gopher: 0.8).")]

    def removes(self, doc: Doc) -> bool:
        n_words, no_letter = doc.word_counts
        return n_words > 0 and (n_words - no_letter) / n_words < self.min_alpha_word_fraction


@dataclass(frozen=True)
class SymbolRatio(QualityFilter):
    """Documents with more than max_symbol_word_ratio of '#', '...' and '…' per word (hashtag
    lists, truncated snippets)."""

    name = "symbol_ratio"
    max_symbol_word_ratio: Annotated[float, Field(
        0.1, ge=0.0, description="('#' + '...' + '…') per word (Gopher: 0.1).")]

    def removes(self, doc: Doc) -> bool:
        n_words = doc.word_counts[0]
        if not n_words:
            return False
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("\u2026")
        return symbols / n_words > self.max_symbol_word_ratio


# A param two filters share: declared once, used by both.
DuplicateLineMinChars = Annotated[int, Field(30, ge=1)]


@dataclass(frozen=True)
class DuplicateLines(QualityFilter):
    """Documents in which more than max_duplicate_line_fraction of the non-blank lines repeat an
    earlier line of at least duplicate_line_min_chars characters (boilerplate, spam)."""

    name = "duplicate_lines"
    max_duplicate_line_fraction: Annotated[float, Field(0.3, ge=0.0, le=1.0, description=(
        "Fraction of non-empty lines that repeat an earlier line (Gopher: 0.3). Short lines such as speaker names in "
        "plays repeat by nature, so only lines of at least `duplicate_line_min_chars` characters count."))]
    duplicate_line_min_chars: DuplicateLineMinChars

    def removes(self, doc: Doc) -> bool:
        if not doc.lines:
            return False
        return doc.repeated_lines(self.duplicate_line_min_chars)[0] / len(doc.lines) > self.max_duplicate_line_fraction


@dataclass(frozen=True)
class DuplicateLineChars(QualityFilter):
    """Documents in which more than max_duplicate_line_char_fraction of the characters (of
    non-blank lines) are in lines of at least duplicate_line_min_chars that repeat an earlier one."""

    name = "duplicate_line_chars"
    duplicate_line_min_chars: DuplicateLineMinChars
    max_duplicate_line_char_fraction: Annotated[float, Field(
        0.2, ge=0.0, le=1.0, description="Fraction of characters in lines that repeat an earlier line (Gopher: 0.2).")]

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
# order the filter report lists them in. Adding a filter: its class above (its params' defaults,
# ranges and meanings in its fields), its name here, its line in EXAMPLES (tests/test_clean.py).
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


def check_registry(filters: Sequence[type[Filter]]) -> None:
    """Raise TypeError, one line naming the filter, unless the names are unique and the
    per-document filters come before the duplicate filters."""
    names = [f.name for f in filters]
    if len(set(names)) < len(names):
        raise TypeError(f"FILTERS: the name {next(n for n in names if names.count(n) > 1)!r} is used twice")
    for before, after in zip(filters, filters[1:]):
        if issubclass(before, DuplicateFilter) and issubclass(after, DocumentFilter):
            raise TypeError(f"FILTERS: {after.name} judges one document: it must come before {before.name}")


def quality_fields(filters: Sequence[type[Filter]]) -> dict[str, tuple[type, FieldInfo]]:
    """The clean.quality keys, in FILTERS order: every quality filter's param as (type, Field) for
    pydantic.create_model, from its `Annotated[type, Field(default, range, description=...)]`.
    Raise TypeError, one line naming the filter and param, for a param without a Field default, or
    one that two filters declare differently (share it through one alias, as
    DuplicateLineMinChars)."""
    check_registry(filters)
    out: dict[str, tuple[type, FieldInfo]] = {}
    owner: dict[str, str] = {}
    for f in filters:
        if not issubclass(f, QualityFilter):
            continue
        hints = typing.get_type_hints(f, include_extras=True)
        for name in f.param_names():
            base, *meta = typing.get_args(hints[name]) or (hints[name],)
            info = next((m for m in meta if isinstance(m, FieldInfo)), None)
            if info is None or info.is_required():
                spec = f"Annotated[{getattr(base, '__name__', base)}, Field(DEFAULT, ...)]"
                raise TypeError(f"filter {f.name}: {name} has no default: declare it as {spec}")
            if name in out and (out[name][0] is not base or out[name][1] is not info):
                raise TypeError(f"filter {f.name}: {name} is declared differently in filter {owner[name]}")
            out[name] = (base, info)
            owner.setdefault(name, f.name)
    return out


def build_filters(params: CleanParams, seed: int) -> tuple[list[DocumentFilter], list[DuplicateFilter]]:
    """The filters params turn on, in FILTERS order: those that judge one document, and the
    duplicate filters."""
    on = [f for f in (cls.from_params(params, seed) for cls in FILTERS) if f is not None]
    return [f for f in on if isinstance(f, DocumentFilter)], [f for f in on if isinstance(f, DuplicateFilter)]


def first_failure(doc: Doc, filters: Iterable[DocumentFilter]) -> str | None:
    """The name of the first filter that removes the document, or None."""
    return next((f.name for f in filters if f.removes(doc)), None)


