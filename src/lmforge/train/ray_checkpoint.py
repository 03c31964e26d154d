"""Our checkpoints inside Ray Train's: reported with ``ray.train.report``, restored from ``ray.train.get_checkpoint``.

Runs on Ray Train workers only (Ray is imported inside functions). A worker may be on any node, and
the driver's disk is not assumed visible: the checkpoint travels through Ray's checkpoint API to
the run's storage (:func:`lmforge.train.recovery.ray_storage`) and back. Each node keeps a scratch
directory (:func:`node_scratch`) in the layout of :mod:`lmforge.train.checkpoint`: rank 0 writes
checkpoints there as in-line runs do, and :func:`report` hands Ray a directory of hard links to the
newest one (``latest.json``, the ``<phase>-<step>/`` tensors and state) plus what a resumption needs
beside it (the adapter phase's ``base/``, DPO's reference log-probabilities). When Ray restarts the
workers after a failure, or ``--resume`` starts a trainer of the same name, :func:`prepare` copies
the latest reported checkpoint into every node's scratch before the loop reads it.

A sharded checkpoint (``strategy: fsdp``, :func:`lmforge.train.checkpoint.save_sharded`) is written by
every rank, each into its node's scratch: then every rank reports, rank 0 the checkpoint without the
other ranks' shard files, each other rank only its own shard files, and Ray Train uploads all of them
into the one checkpoint directory it names for that report (Train V2 agrees on the name across ranks).
Ray registers the checkpoint once every rank's upload is done, so a checkpoint missing a shard is
never the one restored; :func:`prepare` then gives every node the whole of it, for any worker count.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmforge.core.workspace import atomic_write_json
from lmforge.train import checkpoint as ckpt
from lmforge.train import sharded_checkpoint
from lmforge.train.preference_data import REFERENCE_FILE

# Saved next to the checkpoints by the phases (lmforge.train.worker), needed to resume them.
BESIDE = ("base", REFERENCE_FILE)


def node_scratch(run_id: str) -> Path:
    """This node's working copy of the run's checkpoints (its local rank 0 writes and cleans it)."""
    from ray import train

    node = train.get_context().get_node_rank()  # two Ray nodes may share one host (and its temp dir)
    return Path(tempfile.gettempdir()) / "lmforge-train" / f"{run_id}-node{node}"


def prepare(run_id: str) -> tuple[Path, bool]:
    """(scratch, restored): a fresh scratch on every node, holding Ray's latest checkpoint if any."""
    from ray import train

    context = train.get_context()
    saved = train.get_checkpoint()
    root = node_scratch(run_id)
    if context.get_local_rank() == 0:
        # What an earlier attempt left here may be newer than what Ray registered: Ray's is the truth.
        shutil.rmtree(root, ignore_errors=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        if saved is None:
            root.mkdir()
        else:
            with saved.as_directory() as path:
                shutil.copytree(path, root)
    if dist.is_initialized():
        dist.barrier()  # every rank of the node reads the scratch once it is complete
    return root, saved is not None


def report(root: Path, written: Path | None, metrics: dict[str, Any]) -> None:
    """Every rank, after each checkpoint: each rank that wrote part of it (``written`` set) reports its part
    (rank 0 the whole of a full checkpoint), the others report none.

    Ray's report is a barrier across ranks, so every rank calls it at every checkpoint. The upload is
    asynchronous: training goes on while Ray copies, and Ray deletes the linked directory afterwards.
    """
    from ray import train

    if written is None:
        train.report(metrics)
        return
    # Beside the scratch, not in it: Ray uploads after this returns, and removes the directory when done,
    # possibly after the run has ended and the scratch is gone (the links keep the files alive).
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-report-"))
    try:
        stage_latest(root, written, staging, rank=dist.get_rank() if dist.is_initialized() else 0)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    train.report(metrics, checkpoint=train.Checkpoint.from_directory(str(staging)),
                 checkpoint_upload_mode=train.CheckpointUploadMode.ASYNC)


def stage_latest(root: Path, written: Path, staging: Path, rank: int | None = None) -> None:
    """Fill ``staging`` with what resuming needs: the checkpoint ``written`` (in ``root``), what lies
    beside it, and a ``latest.json`` naming it; as hard links where the filesystem allows.

    ``rank``: only what that rank owns of a sharded checkpoint (rank 0: all but the other ranks' shard
    files; another rank: its shard files alone), for a report that Ray merges with the other ranks'."""
    shards = written / sharded_checkpoint.DCP_DIR
    if rank is not None and rank > 0:
        for path in sharded_checkpoint.rank_files(shards, rank):
            _link(path, staging / written.name / sharded_checkpoint.DCP_DIR / path.name)
        return
    _link(written, staging / written.name)
    if rank == 0 and shards.is_dir():
        mine = {path.name for path in sharded_checkpoint.rank_files(shards, 0)}
        for path in (staging / written.name / sharded_checkpoint.DCP_DIR).iterdir():
            if path.name not in mine:
                path.unlink()  # a link: the scratch's file stays; its own rank reports it
    for name in BESIDE:
        if (root / name).exists():
            _link(root / name, staging / name)
    atomic_write_json(staging / ckpt.LATEST, {"tag": written.name, "history": [written.name]})


def remove_scratch(root: Path) -> None:
    """After a successful run, on every node: its local rank 0 removes the scratch."""
    if dist.is_initialized():
        dist.barrier()  # no rank of the node still reads it
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shutil.rmtree(root, ignore_errors=True)


def _link(source: Path, target: Path) -> None:
    # Hard links: checkpoint files are never rewritten in place, so a link is a free, stable copy.
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_file)
    else:
        _link_file(str(source), str(target))


def _link_file(source: str, target: str) -> None:
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed there
        shutil.copy2(source, target)
