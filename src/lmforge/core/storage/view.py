"""A local view of an object-store workspace, for engines that read and write local files.

Some engines take a Workspace and open its files by path (pandas and GX in validation, the record
sets' JSONL in curation, tokenizers, memory-mapped Arrow datasets in training). On a local workspace
:func:`local_view` yields the workspace itself; on an object store (``LMFORGE_HOME=s3://...``) it
yields a scratch Workspace under the read cache whose ``inputs`` are links to cached copies
(``store.cached_dir`` for committed directories, ``store.cached_path`` for single files; an input
that does not exist on the store is simply absent, as it would be locally), and commits each of its
``outputs`` that the block wrote to the store at the end (``store.atomic_dir``), also when the block
failed: an engine that wrote an output whole (a failed gate's results) keeps it, as a local
workspace would. The scratch home is removed afterwards.

It runs wherever the engine runs (a Ray worker on another node builds its own view from the store),
so nothing here assumes the driver's disk. Cached copies are shared and read-only: an engine must
write only to ``outputs`` (fresh directories in the scratch), never into an input.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.fs as pafs

from lmforge.core.storage.store import open_store
from lmforge.core.workspace import Workspace


@contextlib.contextmanager
def local_view(ws: Workspace, inputs: Iterable[Path], outputs: Iterable[Path] = ()) -> Iterator[Workspace]:
    """``ws`` with ``inputs`` readable and ``outputs`` writable as local paths (see the module doc).

    ``inputs`` (directories or files) and ``outputs`` (directories) are named under ``ws.home``
    (``ws.curated_dir``...). A directory in both is copied in, so the block adds to what it holds.
    """
    if not ws.is_remote:
        yield ws
        return
    store = open_store(ws)
    scratch = store.cache.scratch()
    view = Workspace(scratch)
    outputs = list(outputs)
    try:
        for where in inputs:
            if store.is_committed(where):
                cached = store.cached_dir(where)
            elif store.info(where).type == pafs.FileType.File:
                cached = store.cached_path(where)
            else:
                continue
            link = view.home / where.relative_to(ws.home)
            link.parent.mkdir(parents=True, exist_ok=True)
            if where in outputs:  # added to, then committed whole: a private copy, never the shared cache
                shutil.copytree(cached, link)
            else:
                link.symlink_to(cached)
        try:
            yield view
        finally:
            for where in outputs:
                written = view.home / where.relative_to(ws.home)
                if written.is_dir() and not written.is_symlink():
                    with store.atomic_dir(where) as out:
                        shutil.copytree(written, out, dirs_exist_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
