"""Corpora nobody tuned the defaults for: many scripts at once, and one big input.txt. The data
half runs at its defaults (tokenizer, split, cleaning); only the model is cut to seconds."""

from __future__ import annotations

import random
import string
from collections import Counter
from pathlib import Path

import pytest
import yaml

from llm.config import TokenizerParams
from llm.errors import UserError
from llm.io import read_json, text_size
from llm.layout import Layout
from llm.tokenizer import characters_required, choose_coverage
from tests.conftest import copy_repo_files, dvc_bin, plays_dir, run, write_params
from tests.test_pipeline_dvc import ALL_STAGES, ran_stages

CYRILLIC = [
    "и", "в", "не", "на", "я", "быть", "он", "с", "что", "а", "по", "это", "она", "этот", "к", "но",
    "они", "мы", "как", "из", "у", "который", "то", "за", "свой", "весь", "год", "от", "так"
]
LATIN = [
    "the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his",
    "on", "be", "at", "by", "had", "not", "are", "but", "from", "or", "have"
]
CODE = ["def f(x):\n    return x * 2\n", "for i in range(10):\n    print(i, i ** 2)\n", "if (a && b) { c += 1; }\n"]
EMOJI = "😀🎉🚀🌍🔥✨🙂👍"
CJK = [chr(0x4E00 + i) for i in range(3000)]  # more distinct characters than a 2k vocabulary holds


def multilingual_document(rnd: random.Random, n_bytes: int) -> str:
    """Paragraphs in Latin, Cyrillic and CJK script (Zipf-distributed characters, written in
    short space-separated runs), with emoji and code, mixed within documents."""
    cjk_weights = [1 / (k + 1) for k in range(len(CJK))]
    lines, size = [], 0
    while size < n_bytes:
        kind = rnd.choice(["latin", "latin", "latin", "cyrillic", "cyrillic", "cjk", "mixed", "code"])
        if kind == "code":
            line = rnd.choice(CODE)
        elif kind == "cjk":
            runs = ["".join(rnd.choices(CJK, cjk_weights, k=rnd.randint(2, 6))) for _ in range(rnd.randint(20, 40))]
            line = " ".join(runs) + "。"
        else:
            words = CYRILLIC if kind == "cyrillic" else LATIN
            line = " ".join(rnd.choice(words) for _ in range(rnd.randint(20, 40)))
            if kind == "mixed":
                line += " " + "".join(rnd.choices(CJK, cjk_weights, k=5)) + " " + rnd.choice(EMOJI)
        lines.append(line)
        size += len(line.encode()) + 1
    return "\n".join(lines) + "\n"


def default_data_half_project(root: Path, sources: list[str]) -> Path:
    """A git + DVC project: the defaults for every data stage, a model that trains in seconds."""
    copy_repo_files(root, ["llm", "dvc.yaml", ".dvcignore", ".gitignore", "data/inbox/.gitkeep", "params.yaml"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"] = {"sources": sources}
    params["model"] = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}
    params["train"] = {"max_steps": 4, "batch_size": 4, "tokens_per_step": 128, "warmup_steps": 1, "eval_interval": 2,
                       "eval_tokens": 256, "compile": False, "threads": 1}
    params["report"] = {"prompts": ["the"], "temperatures": [0.8], "max_new_tokens": 8}
    params["tracking"] = {"system_metrics": False}
    write_params(root, params)
    run(["git", "init", "-q"], root)
    run([dvc_bin(), "init", "-q"], root)
    copy_repo_files(root, [".dvc/config"])
    return root


def test_coverage_auto_keeps_every_character_of_a_small_alphabet():
    counts = Counter("to be or not to be, that is the question\n" * 50)
    coverage, info = choose_coverage(TokenizerParams(), counts)
    assert coverage == 1.0 and info["characters_in_vocab"] == info["alphabet"] == len(counts)


@pytest.mark.parametrize("seed", range(8))
def test_coverage_auto_fits_a_large_alphabet_into_the_vocabulary(seed: int):
    rnd = random.Random(seed)
    counts = Counter(multilingual_document(rnd, 200_000))
    params = TokenizerParams(vocab_size=rnd.choice([2048, 4096]))
    coverage, info = choose_coverage(params, counts)
    room = params.vocab_size - 4 - 1 - 256
    assert info["alphabet"] > room // 2 and 0.98 <= coverage < 1.0
    assert info["characters_in_vocab"] <= room
    assert coverage == 0.98 or info["characters_in_vocab"] <= room // 2  # half the room stays for merges
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    assert characters_required(ranked, sum(counts.values()), coverage) == info["characters_in_vocab"]


@pytest.mark.parametrize("byte_fallback", [True, False])
def test_a_vocabulary_too_small_for_the_alphabet_names_a_vocab_size_that_works(byte_fallback: bool):
    counts = Counter("".join(CJK[:2500]) * 3 + "abc")  # 2.5 k characters, all equally common
    with pytest.raises(UserError) as err:
        choose_coverage(TokenizerParams(byte_fallback=byte_fallback), counts)
    message = str(err.value)
    assert "\n" not in message and ("set tokenizer.byte_fallback: true" in message) == (not byte_fallback)
    fitting = int(message.rsplit("tokenizer.vocab_size: ", 1)[1])
    coverage, info = choose_coverage(TokenizerParams(byte_fallback=byte_fallback, vocab_size=fitting), counts)
    assert info["characters_in_vocab"] <= fitting


def test_an_explicit_coverage_too_large_for_the_vocabulary_is_refused():
    counts = Counter("".join(CJK[:2500]) * 3)
    with pytest.raises(UserError, match=r"character_coverage 1 needs 2500 .* use tokenizer.vocab_size: 5312"):
        choose_coverage(TokenizerParams(character_coverage=1.0), counts)


@pytest.mark.parametrize("vocab_size", [32, 40, 200, 261])
def test_a_vocabulary_the_specials_and_byte_pieces_fill_says_so_and_names_one_that_works(vocab_size: int):
    """No room left at all (vocab_size at or below the specials, newline and 256 byte pieces): the
    line says what takes the room rather than printing a negative count."""
    counts = Counter(string.ascii_letters + string.digits)
    with pytest.raises(UserError) as err:
        choose_coverage(TokenizerParams(vocab_size=vocab_size), counts)
    message = str(err.value)
    assert "has room for (none: the specials, the newline and the 256 byte pieces take 261)" in message, message
    assert "(-" not in message
    fitting = int(message.rsplit("tokenizer.vocab_size: ", 1)[1])
    choose_coverage(TokenizerParams(vocab_size=fitting), counts)


@pytest.mark.parametrize("n_bytes, text", [(0, "0 bytes"), (830, "830 bytes"), (999, "999 bytes"), (1000, "1.0 KB"),
                                           (12_345, "12.3 KB"), (999_949, "999.9 KB"), (4_381_346, "4.4 MB"),
                                           (1_784_000_000, "1,784.0 MB")])
def test_sizes_in_messages_are_in_the_unit_a_person_reads(n_bytes: int, text: str):
    assert text_size(n_bytes) == text


@pytest.mark.slow
def test_a_multilingual_corpus_runs_through_dvc_repro_with_the_default_data_params(tmp_path: Path):
    rnd = random.Random(7)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc-{i:02d}.txt").write_text(multilingual_document(rnd, rnd.randint(20_000, 80_000)),
                                                 encoding="utf-8")
    root = default_data_half_project(tmp_path, ["corpus"])
    out = run([dvc_bin(), "repro"], root)
    assert ran_stages(out) == ALL_STAGES
    tokenizer = read_json(Layout(root).metrics("tokenizer"))
    assert tokenizer["alphabet"] > 1000 and tokenizer["character_coverage"] < 1.0
    assert tokenizer["val_roundtrip_failures"] == 0  # byte pieces carry the rare characters exactly
    assert read_json(Layout(root).metrics("eval"))["val_bpb"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_single_input_txt_runs_through_dvc_repro_with_the_default_data_params(tmp_path: Path, seed: int):
    """nanoGPT's first step: one file. Plays in a seeded order and cut at a seeded point, so each
    seed is another text; the split always has both sides (tests/test_split.py: many more seeds)."""
    rnd = random.Random(seed)
    plays = sorted(plays_dir().rglob("*.md"))
    rnd.shuffle(plays)
    text = "".join(p.read_text(encoding="utf-8") for p in plays[:8])
    (tmp_path / "input.txt").write_text(text[: rnd.randint(len(text) // 2, len(text))], encoding="utf-8")
    root = default_data_half_project(tmp_path, ["input.txt"])
    out = run([dvc_bin(), "repro"], root)
    assert ran_stages(out) == ALL_STAGES
    shards = read_json(Layout(root).metrics("shards"))
    assert shards["val_bytes"] > 0 and shards["train_bytes"] > 0
    assert 0.03 < shards["val_bytes"] / (shards["val_bytes"] + shards["train_bytes"]) < 0.3
