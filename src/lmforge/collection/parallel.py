"""Work shards of a large input, run in parallel: in the caller's thread, a process pool, or Ray.

A source splits its input (a file list, an S3 listing) into chunks with :func:`chunked`, then
:func:`run_chunks` maps one top-level function over them and yields the results **in chunk
order**, keeping at most ``2 × workers`` chunks in flight. Memory is therefore bounded by the chunk
size times the window, never by the size of the corpus, and the output order (hence which URI a
duplicated text is recorded under) does not depend on timing.

The backend follows :class:`lmforge.config.data.ParallelConfig`: ``auto`` reads small inputs
serially, uses Ray when a cluster address is configured (``parallel.ray_address`` or
``RAY_ADDRESS``) and the input reaches ``ray_min_files``, and a local process pool otherwise. On
Ray, chunks of objects (S3) run on any node; chunks of this machine's files run with ``local=True``,
pinned to this machine's node (:func:`lmforge.core.ray_cluster.on_this_node`): no worker is assumed
to see the driver's disk.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, TypeVar

from lmforge.core.ray_cluster import connect_ray, on_this_node
from lmforge.core.runtime import cpu_count

T = TypeVar("T")
R = TypeVar("R")


def choose_backend(cfg: Any, items: int) -> str:
    """``serial``, ``processes`` or ``ray`` for an input of ``items`` files or objects."""
    if cfg.backend != "auto":
        return cfg.backend
    if items < cfg.min_files or (cfg.workers or cpu_count()) < 2:
        return "serial"
    if (cfg.ray_address or os.environ.get("RAY_ADDRESS")) and items >= cfg.ray_min_files:
        return "ray"
    return "processes"


def chunked(items: Sequence[T], sizes: Sequence[int], max_items: int, max_bytes: int) -> list[list[T]]:
    """Consecutive groups of ``items`` with at most ``max_items`` items and about ``max_bytes`` bytes."""
    chunks: list[list[T]] = []
    current: list[T] = []
    weight = 0
    for item, size in zip(items, sizes):
        if current and (len(current) >= max_items or weight + size > max_bytes):
            chunks.append(current)
            current, weight = [], 0
        current.append(item)
        weight += size
    if current:
        chunks.append(current)
    return chunks


def run_chunks(fn: Callable[[T], R], chunks: Iterable[T], backend: str, workers: int = 0,
               ray_address: str | None = None, local: bool = False) -> Iterator[R]:
    """``fn(chunk)`` for every chunk, results in chunk order; ``fn`` must be a picklable top-level function.

    ``local``: the chunks name files on this machine's disk (on Ray, run them on this node only)."""
    workers = workers or cpu_count()
    if backend == "serial" or (backend == "processes" and workers == 1):
        for chunk in chunks:
            yield fn(chunk)
    elif backend == "processes":
        yield from _in_processes(fn, chunks, workers)
    elif backend == "ray":
        yield from _on_ray(fn, chunks, workers, ray_address, local)
    else:
        raise ValueError(f"unknown parallel backend {backend!r}")


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[R]:
    """``fn`` over ``items`` on a thread pool, results in item order, at most ``window`` in flight
    (so a crawl level of thousands of pages never holds more than ``window`` pages in memory)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _in_processes(fn: Callable[[T], R], chunks: Iterable[T], workers: int) -> Iterator[R]:
    # spawn, not fork: the stage runs several source threads, and forking a threaded process can
    # copy a held lock into the child and deadlock it.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        window: deque[Future] = deque()
        for chunk in chunks:
            window.append(pool.submit(fn, chunk))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _on_ray(fn: Callable[[T], R], chunks: Iterable[T], workers: int, address: str | None,
            local: bool) -> Iterator[R]:
    import ray

    # Ray's unix sockets live under its temp dir; keep that path short (PITFALLS).
    started = connect_ray(address, num_cpus=workers,
                          _temp_dir=os.path.join(tempfile.gettempdir(), f"lmforge-ray-collect-{os.getpid()}"))
    try:
        remote = ray.remote(num_cpus=1, **(on_this_node() if local else {}))(fn)
        window: deque = deque()
        for chunk in chunks:
            window.append(remote.remote(chunk))
            if len(window) >= 2 * workers:
                yield ray.get(window.popleft())
        while window:
            yield ray.get(window.popleft())
    finally:
        if started:  # leave no Ray behind that a later stage would inherit with our settings
            ray.shutdown()
