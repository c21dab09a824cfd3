"""Train/val assignment: which text is held out.

The unit of the split is a document, or a piece of one: a document larger than 1/split.min_units
of the corpus (a single big file, say) is cut at line ends into pieces of about that size, so
even a one-file corpus has units to hold out. A unit's side depends on the hash of its id and the
salt alone, u in [0, 1): below the threshold it is val. The threshold is split.val_fraction,
  - lowered for a big corpus so that val holds about split.max_val_bytes (as a corpus grows it
    only ever moves val units to train, never train to val: nothing trained on is evaluated);
  - raised to the lowest u when no unit would be held out, and lowered below the highest when
    every one would, so every corpus of two bytes or more has both splits.
Near-duplicate documents are removed by clean before the split (clean.near_dedup). The plan is
computed from the clean table's ids and sizes alone, the same in every stage that reads it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm.config import SplitParams
from llm.errors import UserError

SPLITS = ("train", "val")


def unit_hash(salt: str, unit_id: str) -> float:
    digest = hashlib.sha256(f"{salt}:{unit_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def cut_lines(text: str, pieces: int) -> list[str]:
    """The text in `pieces` consecutive parts of about equal size, cut after a line end where
    there is one near the cut (else between characters); joined, they are the text."""
    if pieces <= 1:
        return [text]
    out, start = [], 0
    for k in range(1, pieces):
        target = max(start, round(len(text) * k / pieces))
        newline = text.rfind("\n", start, target + 1)
        cut = newline + 1 if newline >= start and newline + 1 > start else target
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return [p for p in out if p]


@dataclass(frozen=True)
class Holdout:
    """The split of one corpus: which units are val."""

    salt: str
    threshold: float
    max_unit_bytes: int
    """Documents larger than this are cut into ceil(bytes / max_unit_bytes) pieces."""

    def pieces_of(self, n_bytes: int) -> int:
        return max(1, math.ceil(n_bytes / self.max_unit_bytes))

    def unit_ids(self, doc_id: str, n_bytes: int) -> list[str]:
        k = self.pieces_of(n_bytes)
        return [doc_id] if k == 1 else [f"{doc_id}@{i}" for i in range(k)]

    def side(self, unit_id: str) -> str:
        return "val" if unit_hash(self.salt, unit_id) < self.threshold else "train"

    def units(self, doc_id: str, text: str, n_bytes: int) -> Iterator[tuple[str, str, str, int]]:
        """(side, unit id, text, UTF-8 bytes) of each unit of a document (most are one unit: the
        document itself, its byte count as given)."""
        ids = self.unit_ids(doc_id, n_bytes)
        if len(ids) == 1:
            yield self.side(doc_id), doc_id, text, n_bytes
            return
        for unit_id, piece in zip(ids, cut_lines(text, len(ids))):
            yield self.side(unit_id), unit_id, piece, len(piece.encode("utf-8"))


def plan_holdout(documents: Iterable[tuple[str, int]], params: SplitParams) -> Holdout:
    """The threshold and unit size for a corpus, from its documents' ids and UTF-8 sizes."""
    docs = list(documents)
    total = sum(n for _, n in docs)
    if total == 0:
        raise UserError("split: the corpus has no text")
    draft = Holdout(params.salt, params.val_fraction, max(1, -(-total // params.min_units)))
    u, size = [], []
    for doc_id, n_bytes in docs:
        ids = draft.unit_ids(doc_id, n_bytes)
        u += [unit_hash(params.salt, i) for i in ids]
        size += [n_bytes / len(ids)] * len(ids)
    order = np.argsort(np.asarray(u), kind="stable")
    us, held = np.asarray(u)[order], np.cumsum(np.asarray(size)[order])
    threshold = params.val_fraction
    n_val = int(np.searchsorted(us, threshold))  # units with u < threshold
    if n_val and held[n_val - 1] > params.max_val_bytes:  # the cap: the lowest-u units up to max_val_bytes
        n_val = max(1, int(np.searchsorted(held, params.max_val_bytes, side="right")))
        threshold = float(us[n_val]) if n_val < len(us) else threshold
    if n_val == 0:  # no unit below the threshold: the lowest goes to val
        threshold = float(np.nextafter(us[0], 1.0))
    elif n_val == len(us):  # every unit below it: the highest stays in train
        threshold = float(us[-1])
    return Holdout(params.salt, threshold, draft.max_unit_bytes)


def holdout_of(clean_dir: Path, params: SplitParams) -> Holdout:
    """The plan for the clean table (ids and sizes only, read column-wise)."""
    from llm.corpus.tables import iter_batches

    def documents() -> Iterator[tuple[str, int]]:
        for batch in iter_batches(clean_dir, ["doc_id", "n_bytes"], batch_size=65536):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())

    return plan_holdout(documents(), params)
