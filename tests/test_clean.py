from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import ftfy
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

from llm.config import CleanParams, IngestParams, Params, QualityParams, parse_params
from llm.corpus.clean import clean, fix_unicode, normalize_whitespace, redact_pii, strip_markdown
from llm.corpus.filters import (
    FILTERS,
    Doc,
    DocumentFilter,
    QualityFilter,
    build_filters,
    check_registry,
    first_failure,
    normal_words,
    quality_fields,
)
from llm.corpus.ingest import ingest
from llm.errors import UserError
from llm.io import file_sha256
from llm.layout import Layout
from tests.conftest import REPO, plays_dir

WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the king queen lord lady sword crown night day love death honour blood heaven earth speak hear thee thou shall "
    "would never ever again forth hither whither noble gentle fair foul storm sea ship land castle gate wall tower "
    "battle peace war friend foe heart mind soul"
).split()


def prose(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) == 9:
            lines.append(" ".join(line).capitalize() + ",")
            line = []
    return "\n".join(lines + [" ".join(line)]).strip() + "."


def removed_by(text: str, quality: QualityParams | None = None) -> str | None:
    """The name of the first per-document filter that removes the text, under default params."""
    document_filters, _ = build_filters(CleanParams(quality=quality or QualityParams()), seed=1)
    return first_failure(Doc(text), document_filters)


# The plain definitions the byte paths in llm/corpus/filters.py must agree with.
def dedup_key(words: list[str]) -> str:
    """Exact-duplicate key: the hash of the normalised words, so copies that differ only in
    case, punctuation or spacing are caught."""
    return hashlib.sha256(" ".join(words).encode("utf-8")).hexdigest()


def shingles(words: list[str], n: int) -> list[str]:
    """Word n-grams (one shingle for shorter texts)."""
    if len(words) <= n:
        return [" ".join(words)]
    return list(map(" ".join, zip(*(words[i:] for i in range(n)))))


def run_clean(tmp_path: Path, docs: dict[str, str], batch_docs: int = 256, **overrides) -> tuple[dict, list[dict]]:
    src = tmp_path / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (src / name).write_text(text, encoding="utf-8")
    params = Params(
        ingest=IngestParams(sources=["src"], batch_docs=batch_docs),
        clean=CleanParams.model_validate({"num_workers": 1, **overrides}),
        seed=1,
    )
    layout = Layout(tmp_path)
    ingest(params, layout)
    report = clean(params, layout)
    return report, pq.read_table(layout.clean).to_pylist()


# ----------------------------------------------------------------------------- text steps
def test_markdown_markup_is_stripped_and_speaker_names_stay():
    src = (plays_dir() / "tragedies" / "macbeth.md").read_text(encoding="utf-8")[:3000]
    text = normalize_whitespace(strip_markdown(src))
    assert "**" not in text and "_" not in text and "#" not in text
    assert text.startswith("Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\nThunder and lightning. Enter three Witches")
    assert "First Witch\nWhen shall we three meet again\nIn thunder, lightning, or in rain?" in text


def test_unbalanced_emphasis_in_the_corpus_leaves_no_underscores():
    src = (plays_dir() / "comedies" / "a-midsummer-night-s-dream.md").read_text(encoding="utf-8")
    assert "__\\[Awaking]_" in src
    text = strip_markdown(src)
    assert "_" not in text and "[Awaking]" in text


def test_markdown_links_code_and_html():
    text = strip_markdown("See [the play](http://x.org) and `code` <b>bold</b>.\n\n<div>\nblock\n</div>\n\n* item "
                          "one\n* item two")
    assert normalize_whitespace(text) == "See the play and code bold.\n\nitem one\n\nitem two"


def test_fix_unicode_repairs_mojibake_and_normalises_to_nfc():
    assert fix_unicode("cafÃ© au lait") == "café au lait"
    assert fix_unicode("cafe\u0301") == "caf\u00e9"
    assert fix_unicode("a\u2581b") == "a_b"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E,
                                      blacklist_characters="&") | st.sampled_from("\n\t")))
def test_ftfy_is_a_no_op_on_the_text_the_fast_path_skips(text):
    """fix_unicode skips ftfy for printable ASCII without '&': ftfy must leave such text alone."""
    assert ftfy.fix_text(text, normalization="NFC") == text


def test_normalize_whitespace():
    assert normalize_whitespace("  a \t b\u00a0c  \n\n\n\nd  \n") == "a b c\n\nd"


def test_pii_redaction_counts_emails_and_ips():
    text, n = redact_pii("mail me at jo.doe+x@example.co.uk from 192.168.0.1 or 2001:db8::1; 999.1.1.1 stays", "<E>",
                         "<IP>")
    assert text == "mail me at <E> from <IP> or <IP>; 999.1.1.1 stays"
    assert n == 3


def test_quality_filters_name_the_failing_heuristic():
    assert removed_by("short text") == "too_short"
    assert removed_by(prose(200, 1)) is None
    assert removed_by("12 34 56 78 90 " * 50) == "low_alpha_words"
    assert removed_by("word word word word # " * 60) == "symbol_ratio"
    repeated = "\n".join(["This line is repeated over and over again here."] * 20 + [prose(100, 2)])
    assert removed_by(repeated) == "duplicate_lines"


def test_short_repeated_lines_like_speaker_names_do_not_count_as_duplicates():
    play = "\n\n".join(f"HAMLET\n{prose(20, i)}\n\nHORATIO\n{prose(20, 100 + i)}" for i in range(20))
    assert removed_by(play) is None


def test_dedup_key_ignores_case_punctuation_and_spacing():
    assert dedup_key(normal_words("Hello,  World!\n")) == dedup_key(normal_words("hello world"))
    assert dedup_key(normal_words("hello world")) != dedup_key(normal_words("hello there world"))


def test_shingles():
    assert shingles(normal_words("A b, C d e!"), 3) == ["a b c", "b c d", "c d e"]
    assert shingles(normal_words("A b"), 3) == ["a b"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1_#. \n\t\u00e9\u4e00-")), max_size=80))
def test_alpha_word_count_matches_the_plain_definition(text):
    from llm.corpus.filters import _WORD_WITHOUT_LETTER

    words = text.split()
    plain = sum(1 for w in words if not any(c.isalpha() for c in w))
    assert len(_WORD_WITHOUT_LETTER.findall(text)) == plain


# ASCII letters, digits and punctuation, ASCII and Unicode whitespace, non-ASCII punctuation
# (the ASCII view's fast path) and non-ASCII letters and digits (the Unicode path).
_MIXED = st.sampled_from(list("aZ09_#.&- "
                              "\n\t\r\x0b\x1c\x1f\x85\u00a0\u3000\u2014\u2019\u2026\u00e9\u00bd\u0663\u0130\u4e00\u0301"))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=_MIXED, max_size=80), st.integers(1, 6))
def test_fast_word_heuristics_equal_the_regex_definitions(text, n):
    """The ASCII view (bytes.translate/count/split) gives the numbers and words the Unicode
    regexes give, and the same MinHash as str shingles."""
    import re

    import rensa

    from llm.corpus.filters import _ascii_view, _shingles, _signature_words, _word_counts

    words = normal_words(text)
    n_words = len(text.split())
    letterless = len(re.findall(r"(?<!\S)(?:(?![^\W\d_])\S)+(?!\S)", text))
    for view in (_ascii_view(text), None):
        assert _word_counts(text, view) == (n_words, letterless if n_words else 0)
        byte_words, joined = _signature_words(text, view)
        assert [w.decode() for w in byte_words] == words
        assert hashlib.sha256(joined).hexdigest() == dedup_key(words)
        assert _shingles(byte_words, joined, n) == [s.encode() for s in shingles(words, n)]
    a, b = rensa.RMinHash(num_perm=16, seed=1), rensa.RMinHash(num_perm=16, seed=1)
    a.update(shingles(words, n))
    b.update(_shingles(*_signature_words(text, _ascii_view(text)), n))
    assert a.digest() == b.digest()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["", "  ", "short", "a line long enough to be a duplicate",
                                 " a line long enough to be a duplicate\t", "12 34"]), max_size=40))
def test_the_duplicate_line_filters_count_like_a_plain_loop(lines):
    text = "\n".join(lines)
    q = QualityParams(min_chars=0, min_words=0, min_alpha_word_fraction=0.0, max_symbol_word_ratio=1e9)
    stripped = [line.strip() for line in text.split("\n") if line.strip()]
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in stripped:
        if line in seen and len(line) >= q.duplicate_line_min_chars:
            dup_lines, dup_chars = dup_lines + 1, dup_chars + len(line)
        seen.add(line)
    expected = None
    if stripped and dup_lines / len(stripped) > q.max_duplicate_line_fraction:
        expected = "duplicate_lines"
    elif stripped and dup_chars / max(1, sum(map(len, stripped))) > q.max_duplicate_line_char_fraction:
        expected = "duplicate_line_chars"
    assert removed_by(text, q) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab &<\n\u00c3\u00a9\u2019\x1b\r")), max_size=60))
def test_line_wise_ftfy_equals_ftfy_on_the_whole_text(text):
    expected = ftfy.fix_text(text, normalization="NFC", unescape_html=False if "<" in text else "auto")
    assert fix_unicode(text) == expected.replace("\u2581", "_")


# ----------------------------------------------------------------------------- the filters
def reasons(texts: list[str], clean: dict) -> list[str | None]:
    """Why each text is removed (None: kept) when the filters see them in this order, as the stage
    runs them: the per-document filters, then the duplicate filters."""
    document_filters, duplicate_filters = build_filters(CleanParams.model_validate(clean), seed=1)
    out = []
    for text in texts:
        doc = Doc(text)
        reason = first_failure(doc, document_filters)
        if reason is None:
            reason = next((f.name for f in duplicate_filters if f.seen(f.signature(doc))), None)
        out.append(reason)
    return out


_BASE = prose(450, 3)
_REPEATED = "This long line comes back four times in the text, word for word, comma for comma."

# For every filter in FILTERS: texts of which it removes the last and keeps the others, and no
# filter before it removes any; and the clean params it runs under. A new filter adds its line.
EXAMPLES: dict[str, tuple[list[str], dict]] = {
    "too_short": (["Too short to keep."], {}),
    "too_long": ([prose(400, 5)], {"quality": {"max_chars": 1000}}),
    "too_few_words": (["a" * 300], {}),
    "low_alpha_words": (["12 34 56 78 90 " * 50], {}),
    "symbol_ratio": (["word word word word # " * 60], {}),
    "duplicate_lines": (["\n".join(["This line is repeated over and over again here."] * 20 + [prose(100, 2)])], {}),
    "duplicate_line_chars": (["\n".join([_REPEATED] * 4 + prose(72, 7).split("\n"))], {}),  # 3 of 12 lines repeat
    "language": (["Le roi est mort, vive le roi. Nous irons demain à la mer avec nos amis et nos enfants. " * 8],
                 {"language": {"enabled": True}}),
    "exact_duplicate": ([_BASE, _BASE.upper().replace(",", " ,")], {}),  # the same words
    "near_duplicate": ([_BASE, _BASE.replace(" heart ", " zebra ", 1)], {}),  # one word differs
}


@pytest.mark.parametrize("name", [f.name for f in FILTERS])
def test_each_filter_removes_its_example(name: str):
    assert name in EXAMPLES, f"add an example of what {name} removes to EXAMPLES"
    texts, clean = EXAMPLES[name]
    assert reasons(texts, clean) == [None] * (len(texts) - 1) + [name]


def test_ordinary_prose_passes_every_filter():
    everything_on = {"language": {"enabled": True}}
    assert reasons([prose(300, 1), prose(300, 2)], everything_on) == [None, None]


@dataclass(frozen=True)
class TooManyDigits(QualityFilter):
    """Documents of which more than max_digit_fraction of the characters are digits."""

    name = "too_many_digits"
    max_digit_fraction: Annotated[float, Field(
        0.2, ge=0.0, le=1.0, description="Fraction of characters that are digits.")]

    def removes(self, doc: Doc) -> bool:
        return sum(c.isdigit() for c in doc.text) > self.max_digit_fraction * len(doc.text)


@dataclass(frozen=True)
class NoDefault(QualityFilter):
    name = "no_default"
    max_digit_fraction: float


@dataclass(frozen=True)
class OwnMinChars(QualityFilter):
    name = "own_min_chars"
    duplicate_line_min_chars: Annotated[int, Field(30, ge=1)]  # not the shared alias


def test_clean_quality_is_built_from_the_filters_params():
    documents = tuple(f for f in FILTERS if issubclass(f, DocumentFilter))
    duplicates = tuple(f for f in FILTERS if f not in documents)
    assert list(QualityParams.model_fields) == list(quality_fields(FILTERS))
    assert {f.name: f.param_names() for f in FILTERS if issubclass(f, QualityFilter)}["duplicate_lines"] == [
        "max_duplicate_line_fraction", "duplicate_line_min_chars"]
    # A new filter's param is a key of clean.quality with its default, range and meaning: one place.
    kind, info = quality_fields((*documents, TooManyDigits, *duplicates))["max_digit_fraction"]
    assert (kind, info.default, info.description) == (float, 0.2, "Fraction of characters that are digits.")
    no_default = r"^filter no_default: max_digit_fraction has no default: declare it as Annotated\[float, Field"
    with pytest.raises(TypeError, match=no_default):
        quality_fields((*documents, NoDefault))
    differs = r"^filter own_min_chars: duplicate_line_min_chars is declared differently in filter duplicate_lines$"
    with pytest.raises(TypeError, match=differs):
        quality_fields((*documents, OwnMinChars))
    with pytest.raises(TypeError, match=r"^FILTERS: the name 'too_short' is used twice$"):
        check_registry((FILTERS[0], *FILTERS))
    with pytest.raises(TypeError, match=r"^FILTERS: too_short judges one document: it must come before near_dup"):
        check_registry((*FILTERS[1:], FILTERS[0]))


def test_docs_params_md_lists_clean_quality_as_the_filters_declare_it():
    """Each clean.quality row of docs/params.md (key, type, default, meaning) is what the filter's
    field declares: a changed default or range, a rename or a lost docstring shows here."""
    text = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    for key, f in QualityParams.model_fields.items():
        meaning = " ".join((f.description or "").split())
        bounds = ", ".join(f"{op} {getattr(m, attr)}" for m in f.metadata for attr, op in (("ge", ">="), ("le", "<="))
                           if hasattr(m, attr))
        row = f"| `clean.quality.{key}` | {f.annotation.__name__} ({bounds}) | `{f.default!r}` | {meaning} |"
        assert row in text, f"docs/params.md: expected the row {row}"


def test_an_unknown_quality_key_is_one_line_naming_it():
    with pytest.raises(UserError) as err:
        parse_params({"ingest": {"sources": ["corpus"]}, "clean": {"quality": {"min_charz": 100}}})
    assert str(err.value) == "params.yaml: clean.quality.min_charz: unknown key"


def test_docs_describe_every_filter_and_its_params():
    text = (REPO / "docs" / "filters.md").read_text(encoding="utf-8")
    for f in FILTERS:
        section = text.split(f"### `{f.name}`\n", 1)
        assert len(section) == 2, f"docs/filters.md has no section ### `{f.name}`"
        body = section[1].split("\n### ", 1)[0]
        assert all(f"`{p}`" in body for p in f.param_names()), f"docs/filters.md: {f.name}: name {f.param_names()}"


def test_the_clean_asset_page_lists_every_filter_with_what_it_removes(tmp_path: Path):
    from assets.data import clean_metadata

    run_clean(tmp_path, {"good.txt": prose(300, 1), "short.txt": "Too short to keep."})
    rows = [r.data for r in clean_metadata(Layout(tmp_path))["filter report"].records]
    assert sorted(r["filter"] for r in rows) == sorted(f.name for f in FILTERS)
    assert rows[0] == {"filter": "too_short", "documents removed": 1, "bytes removed": 18,
                       "removes": "Documents of fewer than min_chars characters."}


# ----------------------------------------------------------------------------- the stage
def test_exact_and_near_duplicates_are_removed(tmp_path: Path):
    base = prose(450, 3)
    assert 2400 <= len(base) <= 3200
    words = base.split(" ")
    words[200] = "zebra"
    near = " ".join(words)
    docs = {
        "a.txt": base,
        "b.txt": base.upper().replace(",", " ,"),  # same content up to case and punctuation
        "c.txt": near,  # one word differs
        "d.txt": prose(450, 4),  # different text
    }
    report, rows = run_clean(tmp_path, docs)
    assert [r["uri"] for r in rows] == ["src/a.txt", "src/d.txt"]
    assert report["removed"]["exact_duplicate"] == {"documents": 1, "bytes": len(docs["b.txt"].encode())}
    assert report["removed"]["near_duplicate"] == {"documents": 1, "bytes": len(near.encode())}
    assert report["documents_in"] == 4 and report["documents_out"] == 2


def test_near_duplicates_are_kept_when_near_dedup_is_off(tmp_path: Path):
    base = prose(450, 3)
    near = base.replace(base.split(" ")[100], "zebra", 1)
    _, rows = run_clean(tmp_path, {"a.txt": base, "b.txt": near}, near_dedup={"enabled": False})
    assert len(rows) == 2


def test_every_filter_counts_what_it_removed(tmp_path: Path):
    docs = {
        "good.txt": prose(300, 10),
        "short.txt": "Too short to keep.",
        "numbers.txt": "12 34 56 78 90 " * 60,
        "symbols.txt": "word word word word # " * 60,
        "dups.txt": "\n".join(["This line is repeated over and over again here."] * 30 + [prose(60, 11)]),
        "french.txt": "Le roi est mort, vive le roi. Nous irons demain à la mer avec nos amis et nos enfants. " * 8,
        "email.txt": prose(300, 12) + "\nWrite to someone@example.com today.",
    }
    report, rows = run_clean(tmp_path, docs, language={"enabled": True, "allowed": ["en"], "min_confidence": 0.5},
                             pii={"enabled": True})
    removed = {k: v["documents"] for k, v in report["removed"].items() if v["documents"]}
    assert removed == {"too_short": 1, "low_alpha_words": 1, "symbol_ratio": 1, "duplicate_lines": 1, "language": 1}
    assert report["pii_redactions"] == 1
    assert sorted(r["uri"] for r in rows) == ["src/email.txt", "src/good.txt"]
    assert "<EMAIL>" in next(r["text"] for r in rows if r["uri"] == "src/email.txt")
    assert report["bytes_in"] == sum(len(t.encode()) for t in docs.values())
    assert report["removed"]["too_short"]["bytes"] == len(docs["short.txt"].encode())


def test_clean_in_parallel_gives_the_same_bytes(tmp_path: Path):
    """One thing changes, the number of worker processes; the tables and the report must not."""
    docs = {f"{i:02d}.md": f"# Doc {i}\n\n**SPEAKER**  \n" + prose(300, i) for i in range(12)}
    serial_report, serial = run_clean(tmp_path / "one", docs, batch_docs=3, num_workers=1)
    parallel_report, parallel = run_clean(tmp_path / "two", docs, batch_docs=3, num_workers=2)
    assert len(pq.ParquetFile(next((tmp_path / "two" / "data" / "raw").iterdir()))
               .metadata.to_dict()["row_groups"]) == 4
    one, two = Layout(tmp_path / "one"), Layout(tmp_path / "two")
    files = sorted(p.name for p in one.clean.iterdir())
    assert files == sorted(p.name for p in two.clean.iterdir()) and files
    assert all(file_sha256(one.clean / f) == file_sha256(two.clean / f) for f in files)
    assert one.metrics("clean").read_bytes() == two.metrics("clean").read_bytes()
    assert serial == parallel and len(serial) == 12 and serial_report == parallel_report


def test_everything_removed_is_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"clean: every document was removed \(too_short 1\)"):
        run_clean(tmp_path, {"a.txt": "tiny but not empty"})
    assert not (tmp_path / "data" / "clean").exists()
