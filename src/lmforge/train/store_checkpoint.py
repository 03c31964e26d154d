"""In-line runs on an object-store workspace: checkpoints mirrored to the store, restored from it.

An in-line run (``training.placement.use_ray: false``) writes its checkpoints to a local directory
(:mod:`lmforge.train.checkpoint`). On a local workspace that directory is the workspace's
``checkpoints/<run_id>/`` and nothing more is needed. On an object store (``LMFORGE_HOME=s3://...``)
the local directory is this machine's side of the workspace, so after each checkpoint
:func:`publisher` commits the newest one (with what lies beside it, as Ray Train's reports hold:
:func:`lmforge.train.ray_checkpoint.stage_latest`) to ``<home>/checkpoints/<run_id>/`` as one
committed directory, and :func:`restore` brings it back before a resumed run reads it, on this
machine or another. The upload is synchronous: the loop waits for it, as it waits for the local write.

A sharded checkpoint (every rank wrote its shards: :func:`lmforge.train.checkpoint.save_sharded`) is
committed the same way, by rank 0 alone: the ranks share this directory, the save ended in a barrier
after the last rank's file was on disk, so rank 0 commits the whole of it as one directory (a crash
before the commit leaves the previous one on the store). Runs of several nodes report to Ray Train
instead (:mod:`lmforge.train.ray_checkpoint`), where each rank uploads its own files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmforge.core.storage import open_store
from lmforge.core.workspace import Workspace
from lmforge.train.ray_checkpoint import stage_latest
from lmforge.train.worker import Publish


def publisher(ws: Workspace, run_id: str) -> Publish:
    """What commits each new checkpoint of ``run_id`` to ``ws``'s store (rank 0 only writes one)."""
    store = open_store(ws)

    def publish(root: Path, written: Path | None, metrics: dict[str, Any]) -> None:
        if written is None or (dist.is_initialized() and dist.get_rank() != 0):
            return  # other ranks' shards are in root already (a shared directory): rank 0 commits them all
        with store.atomic_dir(ws.checkpoints_dir / run_id) as out:
            stage_latest(root, written, out)

    return publish


def restore(ws: Workspace, run_id: str, root: Path) -> bool:
    """Replace ``root`` with the run's checkpoint on the store; False (``root`` untouched) when there is none."""
    store = open_store(ws)
    where = ws.checkpoints_dir / run_id
    if not store.is_committed(where):
        return False
    cached = store.cached_dir(where)
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(cached, root)  # a copy: the loop writes new checkpoints beside it, never into the cache
    return True


def remove(ws: Workspace, run_id: str) -> None:
    """Drop the run's mirrored checkpoint once the run is complete (as its local one is)."""
    store = open_store(ws)
    if store.exists(ws.checkpoints_dir / run_id):
        store.remove(ws.checkpoints_dir / run_id)
