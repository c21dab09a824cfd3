"""Train/val assignment by document hash.

A document's split depends on its id (a hash of its content) and the salt alone: the same
document always lands on the same side, and adding documents never moves an old one.
"""

from __future__ import annotations

import hashlib

from llm.config import SplitParams

SPLITS = ("train", "val")


def split_of(doc_id: str, params: SplitParams) -> str:
    digest = hashlib.sha256(f"{params.salt}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < params.val_fraction else "train"
