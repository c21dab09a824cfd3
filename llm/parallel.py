"""Order-preserving parallel map with bounded memory, on one of two engines.

The data stages split into units (files, Parquet row groups) and hand them to `ordered_map`:
- local: worker processes on this machine. `multiprocessing.Pool.imap` reads its whole input
  ahead of the workers; this keeps at most `window` units in flight, so memory is bounded by
  the unit size, not the corpus.
- ray (compute.data_engine): the same function as Ray tasks on a cluster, results in the same
  order, the same bound on units in flight. A worker that dies is retried (compute.max_retries),
  then the stage fails with one line naming the unit. `import ray` happens here only.

Results come back in input order on both engines, so what the driver writes is the same bytes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from llm.config import ComputeParams
from llm.errors import UserError
from llm.faults import fault_point

log = logging.getLogger(__name__)
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


def engine_name(compute: ComputeParams, workers: int) -> str:
    """Where the units run, for the stages' log lines."""
    return "ray" if compute.data_engine == "ray" else f"{workers} local worker(s)"


def row_group_name(task: tuple[str, int]) -> str:
    """How a (Parquet file, row group) unit is named in errors."""
    return f"{Path(task[0]).name} row group {task[1]}"


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    window_per_worker: int = 2,
    *,
    compute: ComputeParams | None = None,
    stage: str = "",
    unit_name: Callable[[T], str] = str,
) -> Iterator[R]:
    """fn over items, results in input order. With compute.data_engine ray, on Ray (workers is
    then the cluster's CPUs); otherwise in `workers` local processes, inline for workers == 1.
    `initializer(*initargs)` runs once per worker process before its first item."""
    if compute is not None and compute.data_engine == "ray":
        yield from _ray_map(fn, items, initializer, initargs, window_per_worker, compute, stage, unit_name)
        return
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


# ----------------------------------------------------------------------------- ray
def _ray_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    initializer: Callable[..., Any] | None,
    initargs: tuple,
    window_per_worker: int,
    compute: ComputeParams,
    stage: str,
    unit_name: Callable[[T], str],
) -> Iterator[R]:
    import ray

    started = connect_ray(compute)
    pending: deque[tuple[T, Any]] = deque()
    try:
        # The init travels once into the object store; a worker runs it when the key is new to it
        # (its first unit of this map), like the local pool's initializer.
        state = ray.put((uuid.uuid4().hex, initializer, initargs))
        task = ray.remote(_run_unit).options(max_retries=compute.max_retries, **_forwarded_env())
        window = max(1, int(ray.cluster_resources().get("CPU", 1)) * window_per_worker)
        for item in items:
            pending.append((item, task.remote(fn, state, item)))
            if len(pending) >= window:
                yield _ray_result(*pending.popleft(), compute, stage, unit_name)
        while pending:
            yield _ray_result(*pending.popleft(), compute, stage, unit_name)
    finally:
        for _, ref in pending:  # left only when the stage failed: its other units stop
            ray.cancel(ref)
        if started:
            ray.shutdown()


def connect_ray(compute: ComputeParams) -> bool:
    """Connect to compute.ray_address, or start a local cluster; True when this call started
    one (the caller shuts it down). A process that already called ray.init keeps its cluster."""
    import ray

    if ray.is_initialized():
        return False
    address = compute.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    if address == "local":
        kwargs.update(num_cpus=compute.num_cpus or None, include_dashboard=False)
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"compute.ray_address {address!r}: cannot connect to Ray ({_first_line(e)})") from None
    log.info("ray: %s, %d CPU(s)", "a local cluster" if address == "local" else address,
             int(ray.cluster_resources().get("CPU", 0)))
    return address == "local"


def _forwarded_env() -> dict[str, Any]:
    """The driver's LLM_* variables (progress, fault hooks) reach Ray workers as they reach the
    local pool's processes by inheritance."""
    env = {k: v for k, v in os.environ.items() if k.startswith("LLM_")}
    return {"runtime_env": {"env_vars": env}} if env else {}


_WORKER: dict[str, Any] = {"key": None}


def _run_unit(fn: Callable[[T], R], state: tuple[str, Callable[..., Any] | None, tuple], item: T) -> R:
    """One unit in a Ray worker process; the map's initializer first if this process has not run it."""
    key, initializer, initargs = state
    _fault_hook()
    if _WORKER["key"] != key:
        if initializer is not None:
            initializer(*initargs)
        _WORKER["key"] = key
    return fn(item)


def _fault_hook() -> None:
    """Test hook: LLM_FAULT_POINT=ray.task SIGKILLs the worker at the start of every unit; with
    LLM_FAULT_MARKER=PATH as well, only the first (the kill creates PATH), so the retry succeeds."""
    if os.environ.get("LLM_FAULT_POINT") != "ray.task":
        return
    if marker := os.environ.get("LLM_FAULT_MARKER"):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # one worker wins, the others run
        except FileExistsError:
            return
    fault_point("ray.task")


def _ray_result(item: T, ref: Any, compute: ComputeParams, stage: str, unit_name: Callable[[T], str]) -> R:
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise e.cause from None  # the unit's own one-line error, as the local engine shows it
        raise
    except ray.exceptions.RayError as e:  # the worker or its node died, more times than max_retries
        raise UserError(
            f"{stage}: {unit_name(item)}: the Ray worker died ({type(e).__name__}) and compute.max_retries "
            f"({compute.max_retries}) reruns did not finish it; nothing was written (a previous output is kept), run "
            "the stage again"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
