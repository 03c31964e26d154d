"""A local view of an object-store workspace, for engines that read and write local files.

Some engines take a Workspace and open its files by path (pandas and GX in validation, the record
sets' JSONL in curation). On a local workspace :func:`local_view` yields the workspace itself; on
an object store (``LMFORGE_HOME=s3://...``) it yields a scratch Workspace under the read cache whose
``inputs`` are links to cached copies of committed directories (``store.cached_dir``), and commits
each of its ``outputs`` that the block wrote to the store at the end (``store.atomic_dir``), also when
the block failed: an engine that wrote an output whole (a failed gate's results) keeps it, as a
local workspace would. The scratch home is removed afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.core.storage import open_store
from lmforge.core.workspace import Workspace


@contextlib.contextmanager
def local_view(ws: Workspace, inputs: Iterable[Path], outputs: Iterable[Path]) -> Iterator[Workspace]:
    """``ws`` with ``inputs`` readable and ``outputs`` writable as local paths (see the module doc).

    ``inputs`` and ``outputs`` are directories named under ``ws.home`` (``ws.curated_dir``...).
    """
    if not ws.is_remote:
        yield ws
        return
    store = open_store(ws)
    scratch = store.cache.scratch()
    view = Workspace(scratch)
    try:
        for where in inputs:
            if store.is_committed(where):
                link = view.home / where.relative_to(ws.home)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(store.cached_dir(where))
        try:
            yield view
        finally:
            for where in outputs:
                written = view.home / where.relative_to(ws.home)
                if written.is_dir():
                    with store.atomic_dir(where) as out:
                        shutil.copytree(written, out, dirs_exist_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
