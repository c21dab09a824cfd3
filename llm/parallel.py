"""Order-preserving parallel map with bounded memory.

`multiprocessing.Pool.imap` reads its whole input ahead of the workers; this keeps at most
`window` batches in flight, so memory is bounded by the batch size, not the corpus.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(requested: int) -> int:
    """0 means one worker per usable CPU core."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    window_per_worker: int = 2,
) -> Iterator[R]:
    """fn over items in worker processes, results in input order. workers == 1 runs inline."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    window = max(1, workers * window_per_worker)
    # spawn: the parent may hold threads (pyarrow, tqdm) that fork would copy mid-lock.
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
