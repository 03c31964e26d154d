"""Training under torchrun, without Ray: ``torchrun --nproc-per-node N -m lmforge.train CONFIG``.

torchrun starts N copies of ``python -m lmforge.train``. Each joins the process group from torchrun's
environment (:func:`join`: NCCL on GPUs, each rank on GPU ``LOCAL_RANK``; gloo on CPUs). Rank 0 runs
the train stage as a lone process does (the checks, the run id, the tokenizer if missing, MLflow),
and where the stage hands its job to the workers (:func:`lmforge.train.launch.fit`) it broadcasts the
job (:func:`hand_over`); every other rank has waited for it since it started (:func:`follow`) and runs
the same worker function as rank 0, :func:`lmforge.train.launch.run_worker`, so the ranks train as
Ray Train's workers would (every strategy: ddp, fsdp, tensor and pipeline parallel, ZeRO). A rank 0
that fails before handing the job over broadcasts that there is none (:func:`leading`), so the
others exit instead of waiting. For a single machine, or several with a shared workspace; Ray adds
restarts after a failure and a driver apart from the ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lmforge.core.runtime import torchrun_world

# How long the other ranks wait for rank 0's job: its stage may train a tokenizer, download a base model
# or copy the inputs from an object store first, far longer than a collective of training may take.
_WAIT_FOR_JOB = timedelta(hours=4)
# One process is one rank, so module state suffices: the group the job goes over (gloo, with the long wait
# above; training's own group keeps its timeout), and whether rank 0 has sent it.
_handover_group: Any = None
_handed_over = False


def launched() -> bool:
    """Whether torchrun started this process (as one of its ranks, perhaps the only one)."""
    return torchrun_world() is not None


def join(use_gpu: bool) -> int:
    """Join torchrun's group (its environment names the rendezvous); return this process's rank."""
    global _handover_group
    if use_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if use_gpu else "gloo")
    _handover_group = dist.new_group(backend="gloo", timeout=_WAIT_FOR_JOB)
    return dist.get_rank()


def hand_over(job: dict[str, Any]) -> None:
    """Rank 0: give the other ranks the job they wait for in :func:`follow`."""
    global _handed_over
    dist.broadcast_object_list([job], src=0, group=_handover_group)
    _handed_over = True


def follow() -> dict[str, Any] | None:
    """Ranks above 0: the job rank 0 hands over, or None when it failed before training."""
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=_handover_group)
    return box[0]


@contextmanager
def leading() -> Iterator[None]:
    """Rank 0's stage: if it ends without handing over a job (a failed check), tell the others there is none."""
    try:
        yield
    finally:
        if not _handed_over:
            dist.broadcast_object_list([None], src=0, group=_handover_group)
