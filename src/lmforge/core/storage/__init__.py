"""The storage layer: every output of a run is read and written through one :class:`Store`, on the
workspace's local directory (the default, unchanged) or an object store (``LMFORGE_HOME=s3://...``).

Design note, for the stage code that moves onto it:

- **Where.** ``open_store(ws)`` gives the workspace's store. Keys are '/'-separated and relative to
  the home; the workspace's names still apply: ``store.atomic_write_json(ws.state_dir / "x.json", p)``
  takes a path under ``ws.home`` and turns it into the key ``state/x.json``. On a remote workspace
  ``ws.home`` is this machine's side (``<cache>/homes/<id>``: Ray's temp dir, logs), never outputs.
  ``store.uri(key)`` is the URL for Ray Train's ``storage_path`` or MLflow; ``store.fs`` and
  ``store.path(key)`` are for pyarrow calls of one's own (``filesystem=store.fs``).
- **Files.** ``atomic_write_bytes/text/json(where, ...)`` and ``write_table(where, table)``: locally
  core.workspace's temporary file + rename; on a store the object is written at the temporary key
  ``<parent>/.<name>.<id>.tmp`` and then moved (a server-side copy: the object appears whole or not
  at all), the temporary deleted on success and on failure. Readers: ``read_bytes/text/json``,
  ``read_table``, ``exists``, ``list_files`` (which never shows temporaries or markers).
- **Directories.** ``with store.atomic_dir(where) as tmp:`` fill a local directory (``save_pretrained``,
  shards...). Locally: core.workspace.atomic_dir. On a store, on success: upload under
  ``<parent>/.<name>.<id>.tmp/``, remove the old ``_COMMITTED`` (the old output stops being visible),
  replace the files, then write ``<where>/_COMMITTED`` last: the manifest, ``{"format", "committed_at",
  "files": {name: {"size", "sha256"}}}``. A directory without the marker is not an output:
  ``is_committed``, ``committed_files``, ``read_table`` and ``cached_dir`` refuse it. A crash leaves
  at worst an invisible ``.tmp`` prefix (or, mid-publish, an uncommitted directory, never a wrong one).
- **Cache.** ``cached_path(where)`` and ``cached_dir(where)`` give local files for tools that need a
  path (tokenizers, ``from_pretrained``, memory-mapped shards): on a local store the file itself,
  else copies under ``LMFORGE_CACHE`` (default ``~/.cache/lmforge``) keyed by content digest (the
  manifest's sha256; size + mtime for a lone object). A cached directory costs one manifest read.
  ``store.stats`` counts requests, downloads and cache hits.
- **Errors.** ``check(ws)`` is the preflight the CLI runs before any work: the scheme is known, the
  bucket exists, and a probe object can be written, read and deleted. A missing bucket, refused
  credentials and an unreachable endpoint are StorageErrors (a ConfigError) naming LMFORGE_HOME and
  the fix, at check time and during any later call. Credentials never appear in a location.
- pyarrow's S3 filesystem keeps an empty ``<dir>/`` object for a parent left empty by a delete or a
  move; it is not a file: ``list_files`` and the manifests never show it.
- Two writers publishing the same directory at once are not arbitrated (stages own their outputs).
- **State.** ``ws.write_state`` / ``ws.read_state`` (the stages' JSON hand-offs) of a remote workspace
  are objects ``state/<name>.json`` on its store: this package installs :class:`StoreState` into
  core.workspace when it is imported (core.workspace cannot import it: this package imports it).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from lmforge.core.storage.cache import ReadCache, Stats
from lmforge.core.storage.location import SETTING, Location, StorageError, parse, translated
from lmforge.core.storage.store import MARKER, Store, is_hidden, open_store
from lmforge.core.workspace import Workspace, install_remote_state

__all__ = [
    "MARKER",
    "SETTING",
    "Location",
    "ReadCache",
    "Stats",
    "StorageError",
    "Store",
    "StoreState",
    "check",
    "is_hidden",
    "open_store",
    "parse",
]


def check(where: Workspace | str | os.PathLike[str] | None = None, setting: str = SETTING) -> Store:
    """Preflight a store before any work: it exists and we may write, read and delete under its root.

    Raises StorageError (naming ``setting`` and the fix) for an unknown scheme, a missing bucket,
    refused credentials or an unreachable endpoint; returns the store when all is well.
    """
    store = open_store(where, setting)
    location = store.location
    if location.is_local:
        try:
            os.makedirs(location.root, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{setting}={location.url} cannot be created: {exc.strerror}",
                               f"choose a writable directory for {setting}") from None
    elif location.bucket:
        with translated(location, "look up the bucket", setting):
            info = store.fs.get_file_info(location.bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{setting}={location.url}: the bucket '{location.bucket}' does not exist",
                               f"create the bucket, or point {setting} at one that exists")
    probe = f".lmforge-check.{uuid.uuid4().hex[:12]}.tmp"  # a temporary's name: never listed
    try:
        store.atomic_write_bytes(probe, b"lmforge storage check\n")
        if store.read_bytes(probe) != b"lmforge storage check\n":
            raise StorageError(f"{setting}={location.url} returned other bytes than were written",
                               "check the store (or the S3-compatible server) behind the endpoint")
        store.remove(probe)  # we must be allowed to delete too: replacing an output deletes
    except PermissionError as exc:
        raise StorageError(f"{setting}={location.url} is not writable: {exc.strerror}",
                           f"choose a directory you may write for {setting}") from None
    return store


class StoreState:
    """The stages' hand-offs on a remote workspace's store (installed into core.workspace below)."""

    def write(self, ws: Workspace, path: Path, payload: dict[str, Any]) -> None:
        open_store(ws).atomic_write_json(path, payload)

    def read(self, ws: Workspace, path: Path) -> dict[str, Any] | None:
        store = open_store(ws)
        try:
            return store.read_json(path)
        except FileNotFoundError:
            return None


install_remote_state(StoreState())
