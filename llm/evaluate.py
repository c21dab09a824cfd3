"""Stage `evaluate`: the final model on the val split -> metrics/eval.json.

val_bpb is bits per byte of the original UTF-8 val text: the model's total negative
log-likelihood (nats) / ln 2 / bytes. Unlike loss per token it compares models across
tokenizers, and it compares with compressors: gzip, bz2 and xz at their strongest settings,
and a unigram model of the train split's tokens, all on the same val text.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import math
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
from llm.shards import open_split, token_stream

log = logging.getLogger(__name__)
LN2 = math.log(2)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    return total_nats / LN2 / n_bytes


def compressor_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of the strongest settings of three standard compressors."""
    n = len(data)
    return {
        "gzip": 8 * len(gzip.compress(data, compresslevel=9, mtime=0)) / n,
        "bz2": 8 * len(bz2.compress(data, compresslevel=9)) / n,
        "xz": 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / n,
    }


def unigram_nats(train_counts: np.ndarray, val_tokens: np.ndarray) -> float:
    """Total nats of the val tokens under the train split's token frequencies (add-one)."""
    counts = train_counts.astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_tokens].sum())


class ValDocs:
    """The val split as one token stream plus, per document, its span, source and bytes."""

    def __init__(self, shards_dir: Path, max_tokens: int = 0):
        tokens, spans, sources, n_bytes = [], [], [], []
        total = 0
        for table in open_split(shards_dir, "val"):
            for doc_tokens, source, nb in zip(table.column("tokens").to_pylist(), table.column("source").to_pylist(),
                                              table.column("n_bytes").to_pylist()):
                if max_tokens and total >= max_tokens:
                    break
                arr = np.asarray(doc_tokens, dtype=np.int64)
                tokens.append(arr)
                spans.append((total, total + len(arr)))
                sources.append(source)
                n_bytes.append(nb)
                total += len(arr)
        self.stream = np.concatenate(tokens)
        self.spans, self.sources, self.n_bytes = spans, sources, n_bytes

    def texts(self, tokenizer, eos_id: int) -> list[str]:
        out = []
        for start, stop in self.spans:
            ids = self.stream[start:stop].tolist()
            if ids and ids[-1] == eos_id:
                ids = ids[:-1]
            out.append(tokenizer.decode(ids))
        return out


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
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").cpu().numpy()
        for row, a in zip(nll, group):
            out[a : a + width] = row
        bar.update(len(group))
    bar.close()
    return out


def evaluate(params: Params, layout: Layout, register: bool = True) -> dict:
    """Bits per byte of the final model on the whole val split -> metrics/eval.json. register:
    add the model to the MLflow registry and gate its `champion` alias."""
    lay = layout
    device = pick_device(params.train.device)
    model, tok, info = load_final(lay.final, device.torch_device)
    docs = ValDocs(lay.shards, params.evaluate.max_tokens)
    n_bytes = int(sum(docs.n_bytes))
    log.info("evaluate: %d val documents, %s tokens, %s bytes", len(docs.spans), f"{len(docs.stream):,}", f"{n_bytes:,}")
    nll = token_nll(model, docs.stream, model.config.block_size, params.evaluate.batch_size, device)
    total = float(nll.sum())
    val_loss = total / len(nll)

    texts = docs.texts(tok, tok.eos_id)
    data = "".join(texts).encode("utf-8")
    assert len(data) == n_bytes, "decoded val text differs from the shards' byte count"
    train_counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for table in open_split(lay.shards, "train"):
        for arr in token_stream(table):
            train_counts += np.bincount(arr, minlength=tok.vocab_size)
    baselines = compressor_bpb(data)
    baselines["unigram"] = bits_per_byte(unigram_nats(train_counts, docs.stream[1:]), n_bytes)
    result = {
        "val_loss": round(val_loss, 5),
        "val_ppl": round(math.exp(val_loss), 3),
        "val_bpb": round(bits_per_byte(total, n_bytes), 5),
        "val_tokens": int(len(docs.stream)),
        "val_bytes": n_bytes,
        "val_documents": len(docs.spans),
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
    return {k: {"val_bpb": round(bits_per_byte(v["nats"], v["bytes"]), 5), "bytes": v["bytes"], "documents": v["documents"]}
            for k, v in sorted(out.items())}


def _track(params: Params, lay: Layout, result: dict, register: bool) -> None:
    import mlflow

    from llm.tracking import flatten, register_and_gate, resume_run

    with resume_run(lay.metrics("train"), lay.root, params) as run:
        metrics = {k: v for k, v in flatten(result).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(metrics)
        if register:
            register_and_gate(lay.root, params.tracking.registered_model, run, "model", result["val_bpb"])
