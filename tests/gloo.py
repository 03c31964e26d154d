"""Real processes in one gloo process group on loopback, for the sharded-training tests (fsdp, deepspeed,
tensor and pipeline parallel, sharded checkpoints): no Ray, seconds instead of a minute.

A module of its own, not part of helpers.py: every spawned process imports it (to unpickle its entry),
and helpers.py imports the serving engine and uvicorn, seconds more per process on a busy 2-core machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

# Weights of a sharded run against one worker's, after a few Adam steps: its first steps magnify rounding in
# near-zero gradients (the sharded matmuls and reductions sum in another order), so a handful of elements may
# move ~2e-5 on some CPU types (tensor parallel: 1 of 8,192 did, 1.7e-5; FSDP: 1 of 4,096, 1.2e-5); a wrong split,
# a missing all-reduce or a lost shard moves them by ~1e-2. The loss curves are compared to rel 1e-5.
WEIGHT_ATOL = 5e-5


@contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This process as ``rank`` of a ``world``-process gloo group on 127.0.0.1:``port``, destroyed on the way out."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _process(rank: int, world: int, port: int, out: Path, body: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)  # the processes share 2 cores; more threads each only contend
    with gloo_group(rank, world, port):
        results = body(rank, world, *args)
        if rank == 0:
            torch.save(results, out)


def spawn_gloo(body: Callable[..., Any], world: int, out: Path, *args: Any, label: str) -> Any:
    """Run ``body(rank, world, *args)`` in ``world`` fresh processes of one gloo group; return rank 0's result.

    ``body`` must be a module-level function (the processes import it by name); its result goes through
    ``out`` (torch.save), so it may hold tensors. A failing rank fails the call with its traceback.
    """
    started = time.perf_counter()
    mp.spawn(_process, args=(world, free_port(), out, body, args), nprocs=world)
    print(f"\n{world} gloo process(es), {label}: {time.perf_counter() - started:.1f} s")
    return torch.load(out, weights_only=False)
