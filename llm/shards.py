"""Stage `shards`: data/clean + tokenizer -> data/shards/{train,val}/*.arrow + manifest.json.

Each shard is an Arrow IPC file (uncompressed, so it memory-maps without copying) with one
row per document: `doc_id`, `source`, `n_bytes` (UTF-8 bytes of its text, for bits-per-byte)
and `tokens`, a list of ids in the smallest unsigned type that holds the vocabulary. The
documents of a split, concatenated in order, are its token stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from llm.config import Params, group_dict
from llm.corpus.tables import count_rows, read_row_group, row_groups
from llm.errors import UserError
from llm.io import atomic_dir, file_sha256, write_json
from llm.layout import Layout
from llm.parallel import engine_name, ordered_map, resolve_workers, row_group_name
from llm.progress import progress_enabled
from llm.split import SPLITS, Holdout, holdout_of
from llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
COUNTS = "counts.npy"  # per split: occurrences of each token id (int64)
RECORD_BATCH_DOCS = 64
T = TypeVar("T")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of the vocabulary."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def shard_schema(dtype: np.dtype) -> pa.Schema:
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("source", pa.string()),
            ("n_bytes", pa.int64()),
            ("tokens", pa.list_(pa.from_numpy_dtype(dtype))),
        ]
    )


# ----------------------------------------------------------------------------- workers
_STATE: dict[str, Any] = {}


def _init_worker(model_path: str, append_eos: bool, dtype: str, holdout: Holdout) -> None:
    _STATE["tok"] = Tokenizer(model_path)
    _STATE["append_eos"] = append_eos
    _STATE["dtype"] = np.dtype(dtype)
    _STATE["holdout"] = holdout


def _encode_row_group(task: tuple[str, int]) -> tuple[int, list[tuple[str, str, str, int, np.ndarray]]]:
    """The row group's documents, and (side, unit id, source, UTF-8 bytes, token ids) of each of their units."""
    table = read_row_group(task, ["doc_id", "source", "text", "n_bytes"])
    tok: Tokenizer = _STATE["tok"]
    holdout: Holdout = _STATE["holdout"]
    eos = [tok.eos_id] if _STATE["append_eos"] and tok.eos_id >= 0 else []
    dtype = _STATE["dtype"]
    units, texts = [], []
    for doc_id, source, text, n_bytes in zip(*(table.column(c).to_pylist()
                                               for c in ("doc_id", "source", "text", "n_bytes"))):
        for side, unit_id, unit_text, unit_bytes in holdout.units(doc_id, text, n_bytes):
            units.append((side, unit_id, source, unit_bytes))
            texts.append(unit_text)
    ids = tok.encode_texts(texts)
    return table.num_rows, [(*unit, np.concatenate([i, eos]).astype(dtype)) for unit, i in zip(units, ids)]


# ----------------------------------------------------------------------------- writer
@dataclass
class _Split:
    directory: Path
    schema: pa.Schema
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    _writer: Any = None
    _sink: Any = None
    _current: dict | None = None
    _pending: list = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # occurrences of each id

    def add(self, doc_ids: list[str], sources: list[str], n_bytes: list[int], arrays: list[np.ndarray]) -> None:
        """Append documents. A shard closes after the document that takes it to shard_tokens and
        record batches hold RECORD_BATCH_DOCS documents, so the bytes of every shard depend on
        the documents alone, not on how the workers batched them."""
        for row in zip(doc_ids, sources, n_bytes, arrays):
            if self._writer is None:
                self._open()
            cur = self._current
            assert cur is not None
            self._pending.append(row)
            cur["documents"] += 1
            cur["tokens"] += len(row[3])
            cur["bytes"] += row[2]
            if len(self._pending) >= RECORD_BATCH_DOCS:
                self._flush()
            if cur["tokens"] >= self.shard_tokens:
                self._close()

    def _flush(self) -> None:
        if not self._pending:
            return
        doc_ids, sources, n_bytes, arrays = zip(*self._pending)
        self._pending = []
        offsets = np.zeros(len(arrays) + 1, dtype=np.int32)  # RECORD_BATCH_DOCS documents stay far below 2**31 tokens
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        flat = np.concatenate(arrays)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        seen = np.bincount(flat)
        if len(seen) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(seen) - len(self.counts)))
        self.counts[: len(seen)] += seen
        columns = [pa.array(doc_ids, pa.string()), pa.array(sources, pa.string()), pa.array(n_bytes, pa.int64()),
                   tokens]
        self._writer.write_batch(pa.record_batch(columns, schema=self.schema))

    def _open(self) -> None:
        index = len(self.shards)
        path = self.directory / f"{index:05d}.arrow"
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._current = {"path": f"{self.directory.name}/{path.name}", "documents": 0, "tokens": 0, "bytes": 0}

    def _close(self) -> None:
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        self._sink.close()
        assert self._current is not None
        self._current["sha256"] = file_sha256(self.directory.parent / self._current["path"])
        self.shards.append(self._current)
        self._writer = self._sink = self._current = None

    def finish(self) -> dict:
        """Close the last shard; write how often each id occurs in the split (counts.npy), so that
        a reader of those counts (evaluate's unigram baseline) need not read the tokens again."""
        self._close()
        counts_path = self.directory / COUNTS
        np.save(counts_path, self.counts, allow_pickle=False)
        return {
            "documents": sum(s["documents"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
            "bytes": sum(s["bytes"] for s in self.shards),
            "shards": self.shards,
            "counts": {"path": f"{self.directory.name}/{COUNTS}", "sha256": file_sha256(counts_path)},
        }


def write_shards(params: Params, layout: Layout) -> dict:
    """Tokenize the clean table into Arrow shards per split, with a manifest of their hashes."""
    params, split, compute = params.shards, params.split, params.compute
    clean_dir, tokenizer_dir, out_dir, metrics_path = (layout.clean, layout.tokenizer, layout.shards,
                                                       layout.metrics("shards"))
    tok = Tokenizer.load(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    workers = resolve_workers(params.num_workers)
    total = count_rows(clean_dir)
    log.info("shards: tokenizing %d documents on %s into %s shards", total, engine_name(compute, workers), dtype.name)
    schema = shard_schema(dtype)
    holdout = holdout_of(clean_dir, split)
    with atomic_dir(out_dir) as tmp:
        writers = {}
        for name in SPLITS:
            (tmp / name).mkdir()
            writers[name] = _Split(tmp / name, schema, params.shard_tokens)
        bar = tqdm(total=total, desc="shards", unit="doc", disable=not progress_enabled(), mininterval=1.0)
        init = (str(tok.path), params.append_eos, dtype.str, holdout)
        units = ordered_map(_encode_row_group, row_groups(clean_dir), workers, _init_worker, init,
                            compute=compute, stage="shards", unit_name=row_group_name)
        for n_docs, rows in units:
            for name in SPLITS:
                if keep := [row[1:] for row in rows if row[0] == name]:
                    writers[name].add(*map(list, zip(*keep)))
            bar.update(n_docs)
        bar.close()
        splits = {name: w.finish() for name, w in writers.items()}
        for name, info in splits.items():
            if info["documents"] == 0:
                raise UserError(
                    f"shards: the {name} split is empty ({total} documents; split.val_fraction={split.val_fraction}); "
                    "add documents or change split.val_fraction"
                )
        manifest = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "tokenizer": {
                "sha256": tok.sha256(),
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "bos_id": tok.bos_id,
                "pad_id": tok.pad_id,
            },
            "params": {"shards": group_dict(params), "split": group_dict(split)},
            "holdout": {"threshold": holdout.threshold, "max_unit_bytes": holdout.max_unit_bytes},
            "splits": splits,
        }
        write_json(tmp / MANIFEST, manifest)
    summary = {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        **{f"{name}_{k}": info[k] for name, info in splits.items() for k in ("documents", "tokens", "bytes")},
        **{f"{name}_shards": len(info["shards"]) for name, info in splits.items()},
    }
    write_json(metrics_path, summary)
    log.info(
        "shards: train %d docs / %d tokens in %d shard(s); val %d docs / %d tokens in %d shard(s)",
        splits["train"]["documents"], splits["train"]["tokens"], len(splits["train"]["shards"]),
        splits["val"]["documents"], splits["val"]["tokens"], len(splits["val"]["shards"]),
    )
    return manifest


def read_manifest(shards_dir: str | Path) -> dict:
    from llm.io import read_json

    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: shard manifest not found (run `llm shards` first)")
    return read_json(path)


def token_counts(shards_dir: str | Path, split: str, vocab_size: int) -> np.ndarray:
    """How often each of the vocab_size ids occurs in the split, as the shards stage counted it."""
    entry = read_manifest(shards_dir)["splits"][split].get("counts")
    path = Path(shards_dir) / (entry["path"] if entry else f"{split}/{COUNTS}")
    if entry is None or not path.is_file() or file_sha256(path) != entry["sha256"]:
        raise UserError(f"{path}: token counts missing or differ from manifest.json; {_RESTORE}")
    counts = np.load(path, allow_pickle=False)
    return np.pad(counts, (0, max(0, vocab_size - len(counts))))


def _each_shard(shards_dir: str | Path, split: str, read: Callable[[Path], T]) -> list[T]:
    """read(path) of each shard of a split, in order; a missing split or an unreadable shard is
    one line naming it and how to restore it."""
    manifest = read_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise UserError(f"{shards_dir}: no split {split!r} (have: {', '.join(manifest['splits'])})")
    out = []
    for shard in manifest["splits"][split]["shards"]:
        path = Path(shards_dir) / shard["path"]
        try:
            out.append(read(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"{path}: unreadable shard ({str(e).splitlines()[0][:200]}); {_RESTORE}") from None
    return out


def open_split(shards_dir: str | Path, split: str) -> list[pa.Table]:
    """The shards of a split as memory-mapped Arrow tables (no data is copied into memory)."""
    return _each_shard(shards_dir, split, lambda path: pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all())


_RESTORE = "rerun `llm shards` (dvc repro --force shards) or restore it with `dvc checkout data/shards`"


def verify_shards(shards_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> None:
    """Every shard's bytes against the sha256 in the manifest: a flipped byte stops training with
    one line naming the file, before a step is taken on it."""
    manifest = read_manifest(shards_dir)
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            path = Path(shards_dir) / shard["path"]
            if not path.is_file():
                raise UserError(f"{path}: shard listed in manifest.json is missing; {_RESTORE}")
            if file_sha256(path) != shard["sha256"]:
                raise UserError(f"{path}: sha256 differs from manifest.json (changed or corrupt); {_RESTORE}")


@dataclass(frozen=True)
class Extent:
    """A run of token ids stored contiguously in a shard file: where its bytes start and how many
    ids it holds."""

    path: Path
    offset: int
    n_tokens: int


def token_extents(shards_dir: str | Path, split: str) -> tuple[list[Extent], np.dtype]:
    """Where each record batch's token ids lie in the split's shard files, and their dtype.

    The files are memory-mapped only to read this layout, then unmapped, so a reader that takes
    blocks with `os.pread` (TokenBlocks) holds no mapped pages: its memory does not grow with the
    corpus or with the number of blocks read, as a long-lived memory map's resident pages do."""
    per_shard = _each_shard(shards_dir, split, _extents_of)
    dtype = per_shard[-1][1] if per_shard else np.dtype(np.uint32)
    return [e for extents, _ in per_shard for e in extents], dtype


def _extents_of(path: Path) -> tuple[list[Extent], np.dtype]:
    """One shard's extents; every view into the map dies with this frame, so it is unmapped."""
    with pa.memory_map(str(path), "r") as mm:
        base = mm.read_buffer(1).address
        mm.seek(0)
        size = mm.size()
        reader = pa.ipc.open_file(mm)
        dtype = int_dtype(reader.schema.field("tokens").type.value_type)
        arrays = token_stream(reader.read_all())
        out = []
        for arr in arrays:
            start = arr.__array_interface__["data"][0] - base
            if len(arr) and not 0 <= start <= size - arr.nbytes:  # not plain bytes of the file
                raise pa.ArrowInvalid("token ids are not stored uncompressed")
            if len(arr):
                out.append(Extent(path, start, len(arr)))
        return out, dtype


def token_stream(table: pa.Table) -> list[np.ndarray]:
    """The token ids of a shard as zero-copy numpy views, one per record batch."""
    return [int_view(chunk.flatten()) for chunk in table.column("tokens").chunks]


def int_dtype(arrow_type: pa.DataType) -> np.dtype:
    """numpy's dtype of an Arrow integer type (pyarrow's to_pandas_dtype imports pandas)."""
    if not pa.types.is_integer(arrow_type):
        raise TypeError(f"not an integer type: {arrow_type}")
    return np.dtype(str(arrow_type))


def int_view(arr: pa.Array) -> np.ndarray:
    """An Arrow integer array without nulls as a zero-copy, read-only numpy view. pyarrow's own
    to_numpy imports pandas on first use, a cost in the start-up of every stage that reads shards."""
    if arr.null_count:
        raise ValueError(f"{arr.null_count} nulls in an array of {arr.type} token ids or lengths")
    dtype = int_dtype(arr.type)
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)
