"""The train/val split (llm/split.py): never empty by chance, about split.val_fraction of the
text, capped for big corpora, and stable as documents are added. Property-style: many seeded
corpora, not one lucky file."""

from __future__ import annotations

import random

import pytest

from llm.config import SplitParams
from llm.errors import UserError
from llm.split import cut_lines, plan_holdout, unit_hash

WORDS = [
    "the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his",
    "on", "be", "at", "by", "had", "not", "are", "but", "from", "or", "have"
]


def random_text(rnd: random.Random, n_bytes: int) -> str:
    lines, size = [], 0
    while size < n_bytes:
        line = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(0, 14)))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def val_share(docs: list[tuple[str, str]], params: SplitParams) -> tuple[float, int, int]:
    """The share of bytes held out, and the units on each side, as the shards stage cuts them."""
    sizes = [(doc_id, len(text.encode())) for doc_id, text in docs]
    holdout = plan_holdout(sizes, params)
    held = total = n_val = n_train = 0
    for (doc_id, text), (_, n_bytes) in zip(docs, sizes):
        for side, _, piece, _ in holdout.units(doc_id, text, n_bytes):
            total += len(piece.encode())
            held += len(piece.encode()) if side == "val" else 0
            n_val, n_train = n_val + (side == "val"), n_train + (side == "train")
    return held / total, n_val, n_train


@pytest.mark.parametrize("n_files", [1, 2, 3])
def test_one_two_or_three_files_always_get_both_splits_of_about_val_fraction(n_files: int):
    shares = []
    for seed in range(60):
        rnd = random.Random(seed)
        docs = [(f"{seed}-{i}", random_text(rnd, rnd.randint(20_000, 400_000))) for i in range(n_files)]
        share, n_val, n_train = val_share(docs, SplitParams())
        assert n_val >= 1 and n_train >= 1, seed
        assert share < 0.5, (seed, share)
        shares.append(share)
    assert 0.07 < sum(shares) / len(shares) < 0.15  # about split.val_fraction (0.1) on average


def test_a_corpus_of_many_documents_keeps_them_whole_and_splits_by_hash():
    rnd = random.Random(0)
    docs = [(f"doc-{i}", random_text(rnd, 2_000)) for i in range(500)]
    holdout = plan_holdout([(d, len(t.encode())) for d, t in docs], SplitParams())
    assert all(holdout.unit_ids(d, len(t.encode())) == [d] for d, t in docs)  # no document is cut
    assert holdout.threshold == 0.1
    share, _, _ = val_share(docs, SplitParams())
    assert 0.06 < share < 0.14


def test_adding_documents_never_moves_a_unit_from_train_to_val():
    """Not even when the cap lowers the threshold: what was trained on is never evaluated."""
    params = SplitParams(max_val_bytes=30_000)
    sizes = [(f"doc-{i}", 1_000) for i in range(3_000)]
    small, big = plan_holdout(sizes[:200], params), plan_holdout(sizes, params)
    assert small.threshold == 0.1 and big.threshold < 0.1  # 200 kB: uncapped; 3 MB: capped
    before = {d: small.side(d) for d, _ in sizes[:200]}
    assert all(big.side(d) == "train" for d, side in before.items() if side == "train")
    held = sum(n for d, n in sizes if big.side(d) == "val")
    assert 29_000 <= held <= 30_000  # the lowest-hash units up to the cap


def test_without_the_cap_added_documents_leave_every_old_one_where_it_was():
    params = SplitParams(val_fraction=0.2, salt="val")
    sizes = [(f"{i:032x}", 1_000) for i in range(2_000)]
    before, after = plan_holdout(sizes[:1000], params), plan_holdout(sizes, params)
    assert all(before.side(d) == after.side(d) for d, _ in sizes[:1000])


def test_the_cut_keeps_every_character_and_prefers_line_ends():
    for seed in range(30):
        rnd = random.Random(seed)
        text = random_text(rnd, rnd.randint(1, 50_000)) + ("x" * rnd.randint(0, 3000))  # a long last line too
        pieces = rnd.randint(1, 40)
        out = cut_lines(text, pieces)
        assert "".join(out) == text and all(out) and len(out) <= pieces
        assert all(p.endswith("\n") for p in out[:-1] if "\n" in p)


def test_even_a_tiny_corpus_has_both_sides_and_an_empty_one_is_a_clear_error():
    share, n_val, n_train = val_share([("tiny", "to be or not to be")], SplitParams())
    assert n_val >= 1 and n_train >= 1
    with pytest.raises(UserError, match="split: the corpus has no text"):
        plan_holdout([("empty", 0)], SplitParams())


def test_unit_hash_is_uniform_enough():
    us = [unit_hash("holdout", f"{i}") for i in range(20_000)]
    assert 0.09 < sum(u < 0.1 for u in us) / len(us) < 0.11
