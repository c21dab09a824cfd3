"""Stage `evaluate`: the final model on the val split -> metrics/eval.json.

val_bpb is bits per byte of the original UTF-8 val text: the model's total negative
log-likelihood (nats) / ln 2 / bytes. Unlike loss per token it compares models across
tokenizers, and it compares with compressors: gzip, bz2 and xz at their strongest settings,
and a unigram model of the train split's tokens, all on the same val text.

Evaluation covers a bounded part of the val split, so its time and memory stop growing with
the corpus: whole documents in val order while their tokens stay within evaluate.max_tokens (the
first document always). bpb is exact over what it covers, and eval.json says what that was.
The tokens come from the memory-mapped shards as numpy arrays and the text goes through the
compressors in pieces, one document at a time.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import math
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llm.artifacts import load_final
from llm.config import Params
from llm.device import pick_device
from llm.io import write_json
from llm.layout import Layout
from llm.progress import progress_enabled
from llm.shards import int_view, open_split, read_manifest, token_counts

log = logging.getLogger(__name__)
LN2 = math.log(2)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    return total_nats / LN2 / n_bytes


def compressed_sizes(chunks: Iterable[bytes]) -> tuple[int, dict[str, int]]:
    """Bytes in, and bytes out of three standard compressors at their strongest settings, for
    the concatenated chunks streamed through each. The sizes equal those of one-shot
    gzip.compress(data, 9, mtime=0) (zlib's gzip container), bz2.compress(data, 9) and
    lzma.compress(data, preset=9 | PRESET_EXTREME) of the whole, with only a chunk and each
    compressor's state in memory."""
    compressors = {
        "gzip": zlib.compressobj(9, zlib.DEFLATED, 31),
        "bz2": bz2.BZ2Compressor(9),
        "xz": lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME),
    }
    sizes = dict.fromkeys(compressors, 0)
    n = 0
    for chunk in chunks:
        n += len(chunk)
        for name, compressor in compressors.items():
            sizes[name] += len(compressor.compress(chunk))
    return n, {name: sizes[name] + len(compressor.flush()) for name, compressor in compressors.items()}


def compressor_bpb(chunks: Iterable[bytes]) -> dict[str, float]:
    """Bits per byte of gzip -9, bz2 -9 and xz -9e on the concatenated chunks."""
    n, sizes = compressed_sizes(chunks)
    return {name: 8 * size / n for name, size in sizes.items()}


def unigram_nats(train_counts: np.ndarray, val_tokens: np.ndarray) -> float:
    """Total nats of the val tokens under the train split's token frequencies (add-one)."""
    counts = train_counts.astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_tokens].sum())


@dataclass
class ValDocs:
    """The val documents evaluation covers as one token stream plus, per document, its span in
    the stream, its source and its bytes; `split` holds the whole val split's totals."""

    stream: np.ndarray
    spans: list[tuple[int, int]]
    sources: list[str]
    n_bytes: list[int]
    split: dict[str, int]

    @property
    def capped(self) -> bool:
        return len(self.spans) < self.split["documents"]

    def texts(self, tokenizer, eos_id: int) -> Iterator[str]:
        """Each covered document's text, decoded from its tokens (without its EOS)."""
        for start, stop in self.spans:
            ids = self.stream[start:stop]
            if len(ids) and ids[-1] == eos_id:
                ids = ids[:-1]
            yield tokenizer.decode(ids.tolist())


def cover_val(shards_dir: Path, max_tokens: int = 0) -> ValDocs:
    """Whole val documents in val order while their tokens stay within max_tokens (0 = every
    document); the first document is covered whatever its length. Reads the memory-mapped shards
    as numpy views and copies only the covered tokens."""
    totals = read_manifest(shards_dir)["splits"]["val"]
    pieces: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    sources: list[str] = []
    n_bytes: list[int] = []
    total = 0
    for batch in (batch for table in open_split(shards_dir, "val") for batch in table.to_batches()):
        tokens = batch.column("tokens")
        lengths = int_view(tokens.value_lengths())
        ends = total + np.cumsum(lengths)
        keep = len(lengths) if not max_tokens else int(np.searchsorted(ends, max_tokens, side="right"))
        if not spans and len(lengths):
            keep = max(keep, 1)
        if keep:
            pieces.append(int_view(tokens.flatten())[: ends[keep - 1] - total])
            spans += zip([total, *ends[: keep - 1].tolist()], ends[:keep].tolist())
            sources += batch.column("source").slice(0, keep).to_pylist()
            n_bytes += batch.column("n_bytes").slice(0, keep).to_pylist()
            total = int(ends[keep - 1])
        if keep < len(lengths):
            break
    stream = np.concatenate(pieces, dtype=np.int64)
    split = {k: int(totals[k]) for k in ("documents", "tokens", "bytes")}
    return ValDocs(stream, spans, sources, n_bytes, split)


@torch.no_grad()
def token_nll(model, stream: np.ndarray, block_size: int, batch_size: int, device) -> np.ndarray:
    """nll[i] = -log p(stream[i + 1] | the tokens before it in its window), in nats. The
    stream is cut into consecutive windows of block_size predictions."""
    n_pred = len(stream) - 1
    starts = list(range(0, n_pred, block_size))
    out = np.zeros(n_pred, dtype=np.float64)
    data = torch.from_numpy(stream)
    full = [s for s in starts if s + block_size <= n_pred]
    groups = [(full[i : i + batch_size], block_size) for i in range(0, len(full), batch_size)]
    groups += [([s], n_pred - s) for s in starts if s + block_size > n_pred]  # the shorter last window
    bar = tqdm(total=len(starts), desc="evaluate", unit="window", disable=not progress_enabled(), mininterval=1.0)
    for group, width in groups:
        x = torch.stack([data[a : a + width] for a in group]).to(device.torch_device)
        y = torch.stack([data[a + 1 : a + 1 + width] for a in group]).to(device.torch_device)
        with device.autocast():
            logits = model(x)
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nll = nll.view(y.shape).cpu().numpy()  # rows of classes: 2.6x faster than (batch, classes, time) on a CPU
        for row, a in zip(nll, group):
            out[a : a + width] = row
        bar.update(len(group))
    bar.close()
    return out


def evaluate(params: Params, layout: Layout, register: bool = True) -> dict:
    """Bits per byte of the final model on the val documents within evaluate.max_tokens ->
    metrics/eval.json. register: add the model to the MLflow registry and gate its `champion` alias."""
    lay = layout
    device = pick_device(params.train.device)
    model, tok, info = load_final(lay.final, device.torch_device)
    docs = cover_val(lay.shards, params.evaluate.max_tokens)
    n_bytes = int(sum(docs.n_bytes))
    log.info("evaluate: %d of %d val documents (%s of %s tokens, %s bytes)%s", len(docs.spans), docs.split["documents"],
             f"{len(docs.stream):,}", f"{docs.split['tokens']:,}", f"{n_bytes:,}",
             f"; capped at evaluate.max_tokens={params.evaluate.max_tokens:,}" if docs.capped else "")
    started = time.perf_counter()
    nll = token_nll(model, docs.stream, model.config.block_size, params.evaluate.batch_size, device)
    total = float(nll.sum())
    val_loss = total / len(nll)
    seconds = time.perf_counter() - started
    log.info("evaluate: the model's loss in %.1f s (%s tokens/s); now the baselines", seconds,
             f"{len(nll) / max(seconds, 1e-9):,.0f}")

    started = time.perf_counter()
    n_text, sizes = compressed_sizes(text.encode("utf-8") for text in docs.texts(tok, tok.eos_id))
    assert n_text == n_bytes, "decoded val text differs from the shards' byte count"
    baselines = {name: 8 * size / n_bytes for name, size in sizes.items()}
    train_counts = token_counts(lay.shards, "train", tok.vocab_size)
    baselines["unigram"] = bits_per_byte(unigram_nats(train_counts, docs.stream[1:]), n_bytes)
    log.info("evaluate: gzip, bz2, xz and unigram baselines in %.1f s", time.perf_counter() - started)
    result = {
        "val_loss": round(val_loss, 5),
        "val_ppl": round(math.exp(val_loss), 3),
        "val_bpb": round(bits_per_byte(total, n_bytes), 5),
        "val_tokens": int(len(docs.stream)),
        "val_bytes": n_bytes,
        "val_documents": len(docs.spans),
        "covered": {"tokens": int(len(docs.stream)), "bytes": n_bytes, "documents": len(docs.spans),
                    "capped": docs.capped, "max_tokens": params.evaluate.max_tokens},
        "val_split": docs.split,
        "baseline_bpb": {k: round(v, 5) for k, v in baselines.items()},
    }
    result["beats"] = {k: result["val_bpb"] < v for k, v in result["baseline_bpb"].items()}
    by_source = _per_source(nll, docs)
    if len(by_source) > 1:
        result["per_source"] = by_source
    if params.tracking.enabled:
        _track(params, lay, result, register)
    write_json(lay.metrics("eval"), result)
    log.info(
        "evaluate: val_bpb %.4f (loss %.4f, ppl %.1f); baselines: %s",
        result["val_bpb"], val_loss, result["val_ppl"],
        ", ".join(f"{k} {v:.3f}" for k, v in result["baseline_bpb"].items()),
    )
    return result


def _per_source(nll: np.ndarray, docs: ValDocs) -> dict:
    """bpb per source: each predicted token counts for the document it belongs to."""
    out: dict[str, dict] = {}
    for (start, stop), source, nb in zip(docs.spans, docs.sources, docs.n_bytes):
        # nll[i] predicts stream[i + 1]: a document's tokens start..stop-1 are nll[start-1..stop-2].
        s = nll[max(0, start - 1) : stop - 1].sum()
        entry = out.setdefault(source, {"nats": 0.0, "bytes": 0, "documents": 0})
        entry["nats"] += float(s)
        entry["bytes"] += nb
        entry["documents"] += 1
    return {k: {"val_bpb": round(bits_per_byte(v["nats"], v["bytes"]), 5), "bytes": v["bytes"],
                "documents": v["documents"]}
            for k, v in sorted(out.items())}


def _track(params: Params, lay: Layout, result: dict, register: bool) -> None:
    from llm.common import flatten
    from llm.stage_log import RunLog, log_to_run

    metrics = {k: v for k, v in flatten(result).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log_to_run(RunLog(metrics=metrics, champion_bpb=result["val_bpb"] if register else None), params, lay)
