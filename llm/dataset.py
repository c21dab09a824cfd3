"""A PyTorch dataset over the token shards.

Only the blocks handed out are read, each with one `os.pread` per shard extent it spans: the
shards are not kept memory-mapped, so the process's resident memory does not grow with the
corpus or with the number of blocks read (a map's touched pages stay resident). A split's token
stream is cut into non-overlapping blocks of `block_size + 1` tokens (x = block[:-1],
y = block[1:]); each epoch visits the blocks in a seeded permutation. The position (epoch and
index) is the dataset's state, so training resumes exactly where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm.shards import token_extents


class TokenBlocks(torch.utils.data.IterableDataset):
    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        block_size: int,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        extents, self.dtype = token_extents(shards_dir, split)
        # kept open for the dataset's life (closed when it is collected), one per shard file
        self._files = {path: open(path, "rb", buffering=0) for path in {e.path for e in extents}}  # noqa: SIM115
        self.extents = [(self._files[e.path].fileno(), e.offset, e.n_tokens) for e in extents]
        self.starts = np.cumsum([0] + [e.n_tokens for e in extents])
        self.n_tokens = int(self.starts[-1])
        self.block_size = block_size
        self.n_blocks = (self.n_tokens - 1) // block_size
        if self.n_blocks < world_size:
            raise ValueError(
                f"split {split!r} has {self.n_tokens} tokens: too few for one block of {block_size + 1} per process"
            )
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.index = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # -- blocks
    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream, crossing shard boundaries where needed."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        i = first
        size = self.dtype.itemsize
        while start < stop:
            fd, at, n = self.extents[i]
            offset = start - int(self.starts[i])
            take = min(stop - start, n - offset)
            data = os.pread(fd, take * size, at + offset * size)
            if len(data) != take * size:
                raise OSError(f"short read from a shard ({len(data)} of {take * size} bytes): was it changed?")
            parts.append(np.frombuffer(data, dtype=self.dtype))
            start += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def block(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = b * self.block_size
        chunk = torch.from_numpy(self.tokens(start, start + self.block_size + 1).astype(np.int64))
        return chunk[:-1], chunk[1:]

    def order(self, epoch: int) -> np.ndarray:
        """This process's blocks for an epoch: a seeded permutation, dealt round-robin to ranks."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            else:
                perm = np.arange(self.n_blocks)
            usable = (self.n_blocks // self.world_size) * self.world_size  # equal count per rank
            self._order_cache = (epoch, perm[:usable][self.rank :: self.world_size])
        return self._order_cache[1]

    def __len__(self) -> int:
        return self.n_blocks // self.world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while self.epochs is None or self.epoch < self.epochs:
            order = self.order(self.epoch)
            while self.index < len(order):
                b = int(order[self.index])
                self.index += 1
                yield self.block(b)
            self.epoch += 1
            self.index = 0

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stacked (x, y) batches of shape (batch_size, block_size); the last partial batch of a
        finite pass is yielded too."""
        xs, ys = [], []
        for x, y in self:
            xs.append(x)
            ys.append(y)
            if len(xs) == batch_size:
                yield torch.stack(xs), torch.stack(ys)
                xs, ys = [], []
        if xs:
            yield torch.stack(xs), torch.stack(ys)

    # -- position
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "block_size": self.block_size,
            "n_tokens": self.n_tokens,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "block_size", "n_tokens", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: {key} was {state[key]}, is now {getattr(self, key)}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])


class DeviceBatches:
    """The training batches on the training device, and the data position that a checkpoint
    holds. On CUDA each batch is copied from pinned memory without blocking while the device is
    still busy with the one before (the next batch is fetched as soon as one is handed out). The
    position saved is that of the last batch handed out, not of the one fetched ahead, so a
    resumed run sees exactly the batches it has not trained on."""

    def __init__(self, data: TokenBlocks, batch_size: int, device: torch.device):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.ahead = device.type == "cuda"
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._next: tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]] | None = None
        self._position = data.state_dict()

    def _fetch(self) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
        if self._batches is None:
            self._batches = self.data.batches(self.batch_size)
        x, y = next(self._batches)
        position = self.data.state_dict()  # after this batch
        if self.ahead:
            x, y = x.pin_memory(), y.pin_memory()
        return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)), position

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, self._position = self._next if self._next is not None else self._fetch()
        self._next = self._fetch() if self.ahead else None
        return batch

    def state_dict(self) -> dict[str, Any]:
        return dict(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._batches is not None:
            raise RuntimeError("load the data position before the first batch")
        self.data.load_state_dict(state)
        self._position = self.data.state_dict()
