from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.config import CleanParams
from llm.corpus.clean import fix_unicode, normalize_whitespace
from llm.corpus.tables import iter_batches
from llm.errors import UserError
from llm.io import file_sha256, read_json
from llm.layout import Layout
from llm.split import holdout_of
from llm.tokenizer import Tokenizer, split_words, train_tokenizer, units_of
from tests.conftest import deep_merge, load, write_params


def cleaned_like(text: str) -> str:
    """What the clean stage does to any text before the tokenizer sees it."""
    return normalize_whitespace(fix_unicode(text))


def test_stats_and_files(built):
    root, params = built
    lay = Layout(root)
    assert sorted(p.name for p in lay.tokenizer.iterdir()) == ["stats.json", "tokenizer.model", "tokenizer.vocab"]
    stats = read_json(lay.metrics("tokenizer"))
    assert read_json(lay.tokenizer / "stats.json") == {"params": params.tokenizer.model_dump(mode="json"), **stats}
    assert stats["vocab_size"] == 512
    assert stats["stats_split"] == "val"
    assert 1.5 < stats["val_bytes_per_token"] < 6.0
    assert 0.0 < stats["val_vocab_coverage"] <= 1.0
    assert stats["val_roundtrip_failures"] == 0
    vocab = (lay.tokenizer / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 512 and vocab[2].startswith("</s>\t")
    assert "\\n\t0" in vocab  # the newline piece, escaped


def test_trained_on_the_train_split_only(built):
    root, params = built
    stats = read_json(Layout(root).metrics("tokenizer"))
    holdout = holdout_of(Layout(root).clean, params.split)
    train = list(units_of(Layout(root).clean, holdout, "train"))  # documents, or pieces of the larger ones
    train_docs, train_bytes = len(train), sum(n for _, _, n in train)
    assert train_bytes == sum(len(text.encode()) for _, text, _ in train)
    assert 0 < stats["train_documents"] == train_docs
    assert stats["train_bytes"] == train_bytes


def test_special_ids(built):
    tok = Tokenizer.load(Layout(built[0]).tokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
def test_roundtrip_on_cleaned_like_text(built, text):
    tok = Tokenizer.load(Layout(built[0]).tokenizer)
    text = cleaned_like(text)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["HAMLET", "To be", ", or not", " to be:", "\n", "  ", "\t", "é", "—", "’", "漢",
                                 "😀"]),
                max_size=60))
def test_roundtrip_on_play_like_fragments(built, parts):
    tok = Tokenizer.load(Layout(built[0]).tokenizer)
    text = cleaned_like("".join(parts))
    assert tok.decode(tok.encode(text)) == text


def test_training_is_deterministic(built, tmp_path: Path):
    root, params = built
    first = file_sha256(Layout(root).tokenizer / "tokenizer.model")
    # Same data and params in another directory: same bytes.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clean").symlink_to(Layout(root).clean)
    write_params(tmp_path, load(root).model_dump(mode="json"))
    train_tokenizer(load(tmp_path), Layout(tmp_path))
    assert file_sha256(Layout(tmp_path).tokenizer / "tokenizer.model") == first


@pytest.mark.parametrize("model_type", ["bpe"])
def test_pieces_do_not_depend_on_the_thread_count(built, tmp_path: Path, model_type: str):
    """So num_threads=0 (one per core) gives the same BPE tokenizer on any machine. (Unigram's
    EM scores differ in the 6th digit between thread counts: pin num_threads for those.)"""
    root, _ = built
    vocabs, models = [], []
    for threads in (1, 2):
        d = tmp_path / f"t{threads}"
        (d / "data").mkdir(parents=True)
        (d / "data" / "clean").symlink_to(Layout(root).clean)
        write_params(d, deep_merge(load(root).model_dump(mode="json"),
                                    {"tokenizer": {"num_threads": threads, "model_type": model_type}}))
        train_tokenizer(load(d), Layout(d))
        vocabs.append((Layout(d).tokenizer / "tokenizer.vocab").read_text(encoding="utf-8"))
        models.append((Layout(d).tokenizer / "tokenizer.model").read_bytes())
    assert vocabs[0] == vocabs[1]
    # Only the recorded thread count differs; written as the param it is the same file.
    from llm.tokenizer import _NUM_THREADS, _TRAINER_SPEC, _fields, _machine_independent, _payload, _read_varint

    assert models[0] != models[1]
    assert _machine_independent(models[0], 0) == _machine_independent(models[1], 0)
    spec = next(_payload(raw) for f, _, raw in _fields(models[1]) if f == _TRAINER_SPEC)
    recorded = [_read_varint(raw, _read_varint(raw, 0)[1])[0] for f, _, raw in _fields(spec) if f == _NUM_THREADS]
    assert recorded == [2]


@pytest.mark.parametrize("model_type", ["unigram", "char"])
def test_other_model_types_round_trip(built, tmp_path: Path, model_type: str):
    root, _ = built
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clean").symlink_to(Layout(root).clean)
    write_params(tmp_path, deep_merge(load(root).model_dump(mode="json"),
                                       {"tokenizer": {"model_type": model_type, "vocab_size": 400}}))
    stats = train_tokenizer(load(tmp_path), Layout(tmp_path))
    assert stats["val_roundtrip_failures"] == 0
    tok = Tokenizer.load(Layout(tmp_path).tokenizer)
    text = "KING LEAR\nBlow, winds, and crack your cheeks! rage! blow!"
    assert tok.decode(tok.encode(text)) == text
    for batch in iter_batches(Layout(root).clean, ["text"]):
        for doc in batch.column(0).to_pylist():
            assert tok.encode_words(doc) == tok.encode(doc)


def test_unreachable_vocab_size_is_a_user_error(built, tmp_path: Path):
    root, _ = built
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clean").symlink_to(Layout(root).clean)
    params = load(root).model_dump(mode="json")
    # The vocabulary check refuses it first, naming a vocab_size that fits ...
    write_params(tmp_path, deep_merge(params, {"tokenizer": {"vocab_size": 200_000}}))
    with pytest.raises(UserError,
                       match=r"tokenizer: vocab_size 200000, which needs at least .* use tokenizer.vocab_size: \d+"):
        train_tokenizer(load(tmp_path), Layout(tmp_path))
    # ... and without it sentencepiece's own refusal is one line too.
    write_params(tmp_path, deep_merge(params, {"tokenizer": {"vocab_size": 200_000, "min_bytes_per_piece": 0}}))
    with pytest.raises(UserError, match="tokenizer: sentencepiece could not train with these params"):
        train_tokenizer(load(tmp_path), Layout(tmp_path))
    assert not (tmp_path / "data" / "tokenizer").exists()


def test_clean_defaults_keep_text_cleaned_like():
    """The round-trip property relies on the clean stage's defaults doing these two steps."""
    defaults = CleanParams()
    assert defaults.fix_unicode and defaults.normalize_whitespace


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab e1 2.,'\n\t  éЖ漢😀\u00a0-_"))
               | st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_word_cached_encoding_equals_sentencepiece(built, text):
    tok = Tokenizer.load(Layout(built[0]).tokenizer)
    assert tok.encode_words(text) == tok.encode(text)
    assert tok.encode_words(text) == tok.encode(text)  # second time from the cache


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab e1 2.,'\n\t  éЖ漢😀\u00a0-_")), max_size=80), max_size=12))
def test_batch_encoding_equals_sentencepiece_text_by_text(built, texts):
    tok = Tokenizer.load(Layout(built[0]).tokenizer)
    got = tok.encode_texts(texts)
    assert len(got) == len(texts)
    assert [g.tolist() for g in got] == [tok.encode(t) for t in texts]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab .\n\t\réЖ漢😀\u00a0")), max_size=60)
                .filter(lambda t: "  " not in t), min_size=1, max_size=8))
def test_arrow_word_split_equals_the_regex(texts):
    words, owner = split_words(texts)
    got: list[list[str]] = [[] for _ in texts]
    for word, i in zip(words.to_pylist(), owner.to_pylist()):
        got[i].append(word)
    assert got == [re.findall(r"\n| ?[^ \n]+| +", t) for t in texts]


def test_word_cached_encoding_equals_sentencepiece_on_the_corpus(built):
    tok = Tokenizer.load(Layout(built[0]).tokenizer)
    for batch in iter_batches(Layout(built[0]).clean, ["text"]):
        texts = batch.column(0).to_pylist()
        assert [g.tolist() for g in tok.encode_texts(texts)] == [tok.encode(t) for t in texts]
        for text in texts[:5]:
            assert tok.encode_words(text) == tok.encode(text)
