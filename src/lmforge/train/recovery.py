"""Where a stopped training run can be resumed from, seen from the process that launches training.

Two kinds of checkpoint exist. An in-line run (``training.placement.use_ray: false``) writes its own
to ``checkpoints/<run_id>/`` (:mod:`lmforge.train.checkpoint`). A Ray Train run reports them through
``ray.train.report`` to Ray's storage, :func:`ray_storage`, under ``<storage>/<run_id>/``; Ray Train
restores them itself when a trainer of the same name starts there (its checkpoint manager snapshot),
which is how ``lmforge train --resume RUN_ID`` continues one. ``--resume`` without an id picks the
newest run of either kind (:func:`resolve_resume`).

Both follow the workspace: on an object store (``LMFORGE_HOME=s3://...``) Ray's storage is
``<home>/ray/train`` on it (:func:`ray_run_config` hands Ray the store's filesystem), and in-line
checkpoints are mirrored to ``<home>/checkpoints/<run_id>/`` (:mod:`lmforge.train.store_checkpoint`),
so a run stopped on one machine resumes on another. The storage is read through pyarrow's
filesystems, never as a local directory.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from lmforge.core.errors import ConfigError
from lmforge.core.storage import MARKER, open_store
from lmforge.core.workspace import Workspace

LATEST_RUN = "latest"  # the value of --resume without a run id
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it when it registers a checkpoint


def ray_storage(ws: Workspace, kind: str = "train") -> str:
    """Where Ray Train (``kind`` train) or Ray Tune (``tune``) keeps this workspace's runs, as a user
    names it: the one place that names it."""
    if ws.is_remote:
        return open_store(ws).uri(ws.ray_dir / kind)
    return str((ws.ray_dir / kind).resolve())


def ray_storage_args(ws: Workspace, kind: str = "train") -> dict:
    """``RunConfig`` keywords for :func:`ray_storage`: the store's own filesystem on an object store,
    so Ray's uploads use the workspace's endpoint and credentials chain (AWS_ENDPOINT_URL included)."""
    if not ws.is_remote:
        return {"storage_path": ray_storage(ws, kind)}
    store = open_store(ws)
    return {"storage_path": store.path(ws.ray_dir / kind), "storage_filesystem": store.fs}


def has_checkpoint(ws: Workspace, run_id: str) -> bool:
    """Whether an in-line run left a checkpoint to continue from (on an object store: its mirrored copy)."""
    from lmforge.train.checkpoint import LATEST, checkpoint_root  # torch, imported only when a run is looked for

    if ws.is_remote:
        return open_store(ws).is_committed(ws.checkpoints_dir / run_id)
    return (checkpoint_root(ws, run_id) / LATEST).exists()


def delete_ray_run(ws: Workspace, run_id: str) -> None:
    """Remove a finished run's Ray checkpoints (their purpose is served, as for in-line ones)."""
    fs, base = _storage(ws)
    path = f"{base}/{run_id}"
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def resolve_resume(ws: Workspace, resume: str | None) -> str | None:
    """The run id ``resume`` names: itself, or the newest resumable run for :data:`LATEST_RUN`."""
    if resume != LATEST_RUN:
        return resume
    runs = {**_local_times(ws), **{k: v for k, v in _ray_snapshot_times(ws).items() if v is not None}}
    if not runs:
        raise ConfigError(f"--resume without a run id, but no run in {ws.location} left a checkpoint to resume "
                          f"from (looked in {ws.shown(ws.checkpoints_dir)} and {ray_storage(ws)})",
                          "train anew without --resume, or give the run id (lmforge train CONFIG --resume RUN_ID)")
    return max(runs, key=lambda run: runs[run])


def _local_times(ws: Workspace) -> dict[str, float]:
    from lmforge.train.checkpoint import LATEST  # torch, imported only when a run is looked for

    if ws.is_remote:  # the mirrored in-line checkpoints: one committed directory per run
        store = open_store(ws)
        if not store.exists(ws.checkpoints_dir):
            return {}
        infos = store.fs.get_file_info(pafs.FileSelector(store.path(ws.checkpoints_dir)))
        runs = [ws.checkpoints_dir / info.base_name for info in infos if info.type == pafs.FileType.Directory]
        marks = {run.name: store.info(run / MARKER) for run in runs}
        return {name: info.mtime.timestamp() for name, info in marks.items()
                if info.type == pafs.FileType.File and info.mtime}
    if not ws.checkpoints_dir.is_dir():
        return {}
    latest = (run / LATEST for run in ws.checkpoints_dir.iterdir())
    return {path.parent.name: path.stat().st_mtime for path in latest if path.is_file()}


def _ray_snapshot_times(ws: Workspace) -> dict[str, float | None]:
    """Every run directory in Ray's storage: the time of its snapshot, None when it has none."""
    fs, base = _storage(ws)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return {}
    runs = [info for info in fs.get_file_info(pafs.FileSelector(base)) if info.type == pafs.FileType.Directory]
    snapshots = fs.get_file_info([f"{run.path}/{RAY_SNAPSHOT}" for run in runs])
    return {run.base_name: snap.mtime.timestamp() if snap.type == pafs.FileType.File and snap.mtime else None
            for run, snap in zip(runs, snapshots)}


def _storage(ws: Workspace):
    if ws.is_remote:
        store = open_store(ws)
        return store.fs, store.path(ws.ray_dir / "train")
    uri = ray_storage(ws)
    if "://" not in uri:
        uri = Path(uri).as_posix()
    return pafs.FileSystem.from_uri(uri)
