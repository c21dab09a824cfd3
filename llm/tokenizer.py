"""Stage `tokenizer`: the train split of data/clean -> a sentencepiece model + stats.

Normalisation is the identity and whitespace is kept as is, with byte fallback, so
`decode(encode(x)) == x` holds exactly for cleaned text. Trained on the train split only: the
val split stays unseen, so the bytes-per-token measured on it is honest.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from llm.config import Params, TokenizerParams, group_dict
from llm.corpus.tables import iter_batches
from llm.errors import UserError
from llm.io import atomic_dir, file_sha256, text_size, write_json
from llm.layout import Layout
from llm.parallel import resolve_workers
from llm.progress import progress_enabled
from llm.split import Holdout, holdout_of

log = logging.getLogger(__name__)
MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
STATS_FILE = "stats.json"
WORD_CACHE_SIZE = 200_000


def split_words(texts: list[str]) -> tuple[pa.Array, pa.Array]:
    """What re.findall(r"\\n| ?[^ \\n]+| +", text) finds in each text (newlines, space-led words, the
    spaces before a newline or the end), done by Arrow: the words of all the texts in order, and the
    index of the text each word is from. For texts without a NUL byte or a run of spaces: a NUL
    goes before every space and around every newline, and the texts are split at the NULs."""
    marked = pc.replace_substring(pc.replace_substring(pa.array(texts, pa.large_string()), " ", "\x00 "),
                                  "\n", "\x00\n\x00")
    lists = pc.split_pattern(marked, "\x00")
    words, owner = pc.list_flatten(lists), pc.list_parent_indices(lists)
    keep = pc.not_equal(pc.binary_length(words), 0)
    return words.filter(keep), owner.filter(keep)


class Tokenizer:
    """A trained sentencepiece model with the few operations the pipeline needs."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        self.path = Path(model_path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: tokenizer model not found (run `llm tokenizer` first)")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self._words = None  # the word cache, made at the first encode_batch (pyarrow's first array imports pandas)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        return cls(Path(directory) / MODEL_FILE)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts; sentencepiece spreads them over num_threads (-1: every core)."""
        return self.sp.encode(texts, out_type=int, num_threads=num_threads)

    def encode_words(self, text: str) -> list[int]:
        """encode(text) through encode_texts's word cache."""
        return self.encode_texts([text])[0].tolist()

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        """encode(text) of each text, as int64 arrays; several times faster on natural text: the
        texts are split into words and the words counted by Arrow, each distinct space-led word
        is encoded once (and cached across calls), and the ids are gathered with numpy.

        Exact because the tokenizer is trained with split_by_whitespace, so no piece spans a
        word boundary and BPE never merges across one; the newline is a piece of its own. A
        run of spaces can be merged either way, so texts with one go to sentencepiece whole.
        """
        out: list[np.ndarray] = [np.empty(0, np.int64)] * len(texts)
        where = []
        for i, text in enumerate(texts):
            if "  " in text or "\x00" in text:
                out[i] = np.asarray(self.encode(text), dtype=np.int64)
            else:
                where.append(i)
        if not where:
            return out
        words, owner = split_words([texts[i] for i in where])
        distinct = pc.dictionary_encode(words)
        if self._words is None or len(self._words) > WORD_CACHE_SIZE:
            self._forget_words()
        known = pc.fill_null(pc.index_in(distinct.dictionary, value_set=self._words), -1).to_numpy().astype(np.int64)
        missing = known < 0
        if missing.any():
            new_words = distinct.dictionary.filter(pa.array(missing))
            encoded = self.sp.encode(new_words.to_pylist(), out_type=int, num_threads=1)
            lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
            known[missing] = np.arange(len(self._words), len(self._words) + len(encoded))
            self._words = pa.concat_arrays([self._words, new_words])
            self._word_ids = np.concatenate([self._word_ids, np.fromiter(itertools.chain.from_iterable(encoded),
                                                                         np.int64, int(lengths.sum()))])
            self._word_starts = np.concatenate([self._word_starts, self._word_starts[-1] + np.cumsum(lengths)])
        word = known[distinct.indices.to_numpy()]  # each word of the texts, in order, as a cache row
        first = self._word_starts[word]  # where its ids start in _word_ids
        n = self._word_starts[word + 1] - first
        ends = np.cumsum(n)
        total = int(ends[-1]) if len(ends) else 0
        stream = self._word_ids[np.repeat(first - (ends - n), n) + np.arange(total)]
        counts = np.bincount(owner.to_numpy(), minlength=len(where))
        bounds = np.concatenate([[0], ends])[np.concatenate([[0], np.cumsum(counts)])]  # each text's ids in stream
        for k, i in enumerate(where):
            out[i] = stream[bounds[k] : bounds[k + 1]]
        return out

    def _forget_words(self) -> None:
        """The word cache: distinct words, and their ids as one array cut at _word_starts."""
        self._words = pa.array([], pa.large_string())
        self._word_ids = np.empty(0, np.int64)
        self._word_starts = np.zeros(1, np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def sha256(self) -> str:
        return file_sha256(self.path)


def _machine_independent(model: bytes, num_threads: int) -> bytes:
    """The model with its recorded trainer spec's thread count set to the param (0 = auto),
    not the core count of the machine that trained it. The pieces do not depend on threads
    (tested), so the same params and data give the same file on any machine.

    Edited at the protobuf wire level: sentencepiece's generated protobuf module needs
    protobuf >= 7, which Dagster (in the same environment) does not allow yet.
    """
    out = bytearray()
    for field, wire, raw in _fields(model):
        if field == _TRAINER_SPEC and wire == 2:
            spec = _fields(_payload(raw))
            body = b"".join(r for f, _, r in spec if f != _NUM_THREADS) + _key(_NUM_THREADS, 0) + _varint(num_threads)
            raw = _key(_TRAINER_SPEC, 2) + _varint(len(body)) + body
        out += raw
    return bytes(out)


# ModelProto.trainer_spec = 2 (a message); TrainerSpec.num_threads = 16 (an int32 varint).
_TRAINER_SPEC, _NUM_THREADS = 2, 16


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes) -> list[tuple[int, int, bytes]]:
    """(field number, wire type, the field's raw bytes including its key) in order."""
    out, i = [], 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _read_varint(buf, i)
            i += length
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        out.append((key >> 3, wire, buf[start:i]))
    return out


def _payload(raw: bytes) -> bytes:
    """The payload of a length-delimited field's raw bytes."""
    _, i = _read_varint(raw, 0)
    length, i = _read_varint(raw, i)
    return raw[i : i + length]


def _sample_fraction(doc_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"tokenizer-sample:{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass
class _TrainInput:
    documents: int = 0
    bytes: int = 0
    lines: int = 0


def units_of(clean_dir: Path, holdout: Holdout, side: str) -> Iterator[tuple[str, str, int]]:
    """(unit id, text, UTF-8 bytes) of the clean table's units on one side of the split, in order."""
    for batch in iter_batches(clean_dir, ["doc_id", "text", "n_bytes"], batch_size=256):
        for doc_id, text, n_bytes in zip(*(batch.column(i).to_pylist() for i in range(3))):
            for unit_side, unit_id, piece, piece_bytes in holdout.units(doc_id, text, n_bytes):
                if unit_side == side:
                    yield unit_id, piece, piece_bytes


def _train_lines(clean_dir: Path, holdout: Holdout, keep: float, seed: int, stats: _TrainInput) -> Iterator[str]:
    """Lines of the sampled train units: sentencepiece trains on line-sized 'sentences'."""
    for unit_id, text, n_bytes in units_of(clean_dir, holdout, "train"):
        if keep < 1.0 and _sample_fraction(unit_id, seed) >= keep:
            continue
        stats.documents += 1
        stats.bytes += n_bytes
        for line in text.split("\n"):
            if line.strip():
                stats.lines += 1
                yield line


def vocabulary_fits(params: TokenizerParams, train_bytes: int, preset: str = "") -> None:
    """Refuse a vocabulary the corpus cannot fill: most of its pieces would be rare, and their
    embeddings would stay untrained."""
    needed = params.vocab_size * params.min_bytes_per_piece
    if needed <= train_bytes:
        return
    fitting = max(64, train_bytes // params.min_bytes_per_piece // 64 * 64)
    who = f"preset {preset!r} asks for " if preset else ""
    raise UserError(f"tokenizer: {who}vocab_size {params.vocab_size}, which needs at least {text_size(needed)} of "
                    f"train text (tokenizer.min_bytes_per_piece: {params.min_bytes_per_piece}); this corpus has "
                    f"{text_size(train_bytes)}: use tokenizer.vocab_size: {fitting}, or a larger corpus")


def _room(params: TokenizerParams) -> int:
    """Pieces left for characters and merges beside the specials, the newline piece and (with
    byte_fallback) the 256 byte pieces."""
    specials = sum(1 for i in (params.unk_id, params.bos_id, params.eos_id, params.pad_id) if i >= 0)
    return params.vocab_size - specials - 1 - (256 if params.byte_fallback else 0)


def characters_required(ranked: list[tuple[str, int]], total: int, coverage: float) -> int:
    """How many characters sentencepiece puts in the vocabulary at this coverage: the most frequent
    ones, added while the share covered so far is below it (trainer_interface.cc)."""
    covered = n = 0
    for _, count in ranked:
        if covered / total >= coverage:
            break
        covered += count
        n += 1
    return n


MIN_COVERAGE = 0.98  # the least character_coverage sentencepiece accepts


def choose_coverage(params: TokenizerParams, counts: Counter) -> tuple[float, dict]:
    """character_coverage for this text, and what it means. auto: every character when the
    alphabet fits in half the room (the other half is for merges); else the most frequent
    characters that fit there, the rest left to byte pieces, but never below the 98 % that
    sentencepiece requires. A coverage the vocabulary cannot hold stops with one line."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    total, room = max(1, sum(counts.values())), _room(params)
    budget = room // 2
    if params.character_coverage != "auto":
        coverage = params.character_coverage
    elif len(ranked) <= budget:
        coverage = 1.0
    elif not params.byte_fallback:
        raise UserError(f"tokenizer: the train text has {len(ranked)} distinct characters, more than vocab_size "
                        f"{params.vocab_size} has room for without byte pieces ({budget}); "
                        f"set tokenizer.byte_fallback: true (rare characters become bytes) "
                        f"or tokenizer.vocab_size: {_vocab_for(params, len(ranked))}")
    else:  # the `budget` most frequent characters, rounded down so that no more are required
        coverage = max(MIN_COVERAGE, math.floor(sum(c for _, c in ranked[:budget]) / total * 1e6) / 1e6)
    if (need := characters_required(ranked, total, coverage)) > room:
        what = f"character_coverage {coverage:g}" + (" (auto, the least sentencepiece accepts)"
                                                     if params.character_coverage == "auto" else "")
        held = "and the 256 byte pieces " if params.byte_fallback else ""
        left = f"{room}" if room > 0 else f"none: the specials, the newline {held}take {params.vocab_size - room}"
        raise UserError(f"tokenizer: {what} needs {need} of the text's {len(ranked)} distinct characters in the "
                        f"vocabulary, more than vocab_size {params.vocab_size} has room for ({left}); "
                        f"use tokenizer.vocab_size: {_vocab_for(params, need)}")
    return coverage, {"character_coverage": coverage, "alphabet": len(ranked), "characters_in_vocab": need}


def _vocab_for(params: TokenizerParams, characters: int) -> int:
    """The smallest multiple of 64 whose room holds `characters` twice over (characters and merges)."""
    overhead = params.vocab_size - _room(params)
    return -(-(2 * characters + overhead) // 64) * 64


def train_tokenizer(params: Params, layout: Layout) -> dict:
    """Train sentencepiece on the train split of the clean table; write the model and its stats."""
    preset, params, split, seed = params.preset, params.tokenizer, params.split, params.seed
    clean_dir, out_dir, stats_path = layout.clean, layout.tokenizer, layout.metrics("tokenizer")
    import sentencepiece as spm

    holdout = holdout_of(clean_dir, split)
    train_bytes = 0
    for batch in iter_batches(clean_dir, ["doc_id", "n_bytes"], batch_size=65536):
        for doc_id, n in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            ids = holdout.unit_ids(doc_id, n)
            train_bytes += n * sum(holdout.side(u) == "train" for u in ids) // len(ids)
    if train_bytes == 0:
        raise UserError("tokenizer: the train split is empty (lower split.val_fraction or add documents)")
    vocabulary_fits(params, train_bytes, preset)
    keep = min(1.0, params.max_train_bytes / train_bytes)
    threads = resolve_workers(params.num_threads)
    log.info(
        "tokenizer: %s, vocab %d, on %.1f%% of %.2f MB of train text, %d thread(s)",
        params.model_type, params.vocab_size, 100 * keep, train_bytes / 1e6, threads,
    )
    counts: Counter = Counter()
    for line in _train_lines(clean_dir, holdout, keep, seed, _TrainInput()):
        counts.update(line)  # counted in C
    coverage, alphabet = choose_coverage(params, counts)
    log.info("tokenizer: %d distinct characters; character_coverage %s: %d of them get pieces%s", alphabet["alphabet"],
             f"{coverage:g}" + (" (auto)" if params.character_coverage == "auto" else ""),
             alphabet["characters_in_vocab"],
             ", the rest become bytes"
             if alphabet["characters_in_vocab"] < alphabet["alphabet"] and params.byte_fallback else "")
    used = _TrainInput()
    lines = _train_lines(clean_dir, holdout, keep, seed, used)
    bar = tqdm(lines, desc="tokenizer input", unit="line", disable=not progress_enabled(), mininterval=1.0)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    t0 = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(bar),
            model_writer=model,
            model_type=params.model_type,
            vocab_size=params.vocab_size,
            character_coverage=coverage,
            byte_fallback=params.byte_fallback,
            # Exact round trip: no NFKC, no whitespace squeezing, no dummy prefix.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"],  # a newline is one piece of its own, not a byte token
            split_digits=True,
            max_sentencepiece_length=params.max_piece_length,
            max_sentence_length=1 << 16,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            hard_vocab_limit=params.model_type != "char",
            unk_id=params.unk_id,
            bos_id=params.bos_id,
            eos_id=params.eos_id,
            pad_id=params.pad_id,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"tokenizer: sentencepiece could not train with these params: "
                        f"{str(e).splitlines()[-1]}") from None
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t0
    with atomic_dir(out_dir) as tmp:
        (tmp / MODEL_FILE).write_bytes(_machine_independent(model.getvalue(), params.num_threads))
        tok = Tokenizer(tmp / MODEL_FILE)
        with open(tmp / VOCAB_FILE, "w", encoding="utf-8") as f:
            for i in range(tok.vocab_size):
                piece = tok.piece(i).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
                f.write(f"{piece}\t{tok.sp.get_score(i):g}\n")
        stats = {
            "vocab_size": tok.vocab_size,
            "model_sha256": tok.sha256(),
            "train_documents": used.documents,
            "train_bytes": used.bytes,
            "train_lines": used.lines,
            **alphabet,
            **tokenizer_stats(tok, clean_dir, holdout, params.stats_max_bytes),
        }
        write_json(tmp / STATS_FILE, {"params": group_dict(params), **stats})
    write_json(stats_path, stats)
    log.info(
        "tokenizer: trained in %.1f s; vocab %d, %.2f bytes/token on val, %.1f%% of the vocab used on val, "
        "round trip %s",
        train_seconds, stats["vocab_size"], stats["val_bytes_per_token"], 100 * stats["val_vocab_coverage"],
        "exact" if stats["val_roundtrip_failures"] == 0 else f"FAILED on {stats['val_roundtrip_failures']} documents",
    )
    return stats


def tokenizer_stats(tok: Tokenizer, clean_dir: Path, holdout: Holdout, max_bytes: int) -> dict:
    """Bytes per token, vocabulary use, byte-fallback rate and round-trip on (up to max_bytes of)
    the val split; the train split stands in when there is no val text."""
    import numpy as np

    is_byte = np.array([tok.sp.is_byte(i) for i in range(tok.vocab_size)], dtype=bool)
    for side in ("val", "train"):
        n_docs = n_bytes = failures = 0
        counts = np.zeros(tok.vocab_size, dtype=np.int64)
        units = units_of(clean_dir, holdout, side)
        while chunk := list(itertools.islice(units, 256)):
            texts = [t for _, t, _ in chunk]
            encoded = tok.encode_batch(texts)
            failures += sum(a != b for a, b in zip(tok.sp.decode(encoded), texts))
            counts += np.bincount(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded]),
                                  minlength=tok.vocab_size)
            n_docs += len(chunk)
            n_bytes += sum(n for _, _, n in chunk)
            if n_bytes >= max_bytes:
                break
        n_tokens = int(counts.sum())
        if n_tokens:
            return {
                "stats_split": side,
                "val_documents": n_docs,
                "val_bytes": n_bytes,
                "val_tokens": n_tokens,
                "val_bytes_per_token": round(n_bytes / n_tokens, 4),
                "val_vocab_coverage": round(int(np.count_nonzero(counts)) / tok.vocab_size, 4),
                "val_byte_fallback_fraction": round(int(counts[is_byte].sum()) / n_tokens, 6),
                "val_unk_fraction": round(int(counts[tok.unk_id]) / n_tokens, 6),
                "val_roundtrip_failures": failures,
            }
    raise UserError("tokenizer: no text to measure the tokenizer on")
