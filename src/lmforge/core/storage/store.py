"""One workspace's store: atomic writes, committed directories, Parquet and cached reads, on a local
directory or an object store alike (the package docstring, lmforge.core.storage, has the layout)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from lmforge.core.storage.cache import ReadCache, Stats, object_id, sha256_file
from lmforge.core.storage.location import SETTING, Location, filesystem, parse, translated
from lmforge.core.workspace import Workspace, atomic_dir, atomic_write_bytes, cache_root

MARKER = "_COMMITTED"
TMP_SUFFIX = ".tmp"


def open_store(where: Workspace | str | os.PathLike[str] | None = None, setting: str = SETTING) -> Store:
    """The store of a workspace, a URL or a path (default: the workspace ``LMFORGE_HOME`` names)."""
    ws = where if isinstance(where, Workspace) else Workspace.from_env(where)
    location = parse(ws.url or ws.home, setting)
    return Store(location, filesystem(location, setting), ReadCache(cache_root()), anchor=ws.home)


def is_hidden(name: str) -> bool:
    """Names readers never see: commit markers and temporaries (``.<name>.<id>.tmp``)."""
    return name == MARKER or (name.startswith(".") and name.endswith(TMP_SUFFIX))


class Store:
    """Keys ('/'-separated, relative to the root) on one filesystem; see lmforge.core.storage."""

    def __init__(self, location: Location, fs: pafs.FileSystem, cache: ReadCache,
                 anchor: Path | None = None) -> None:
        self.location = location
        self.fs = fs
        self.cache = cache
        # Paths under ``anchor`` (a workspace's home) are accepted for keys, so stage code that names
        # locations as ``ws.raw_dir / "x"`` keeps doing so.
        self.anchor = anchor
        self.stats = Stats()

    def __repr__(self) -> str:
        return f"Store({self.location.url!r})"

    def __reduce__(self):
        # Sent to a Ray worker, a store reopens there by its location: the worker's own
        # credentials chain, cache (LMFORGE_CACHE) and local side, never the driver's paths.
        return (open_store, (self.location.url,))

    # Names.
    def key(self, where: str | PurePath) -> str:
        """The key of ``where``: a key, or a path under the workspace home."""
        if isinstance(where, PurePath):
            base = self.anchor if self.anchor is not None else Path(self.location.root)
            try:
                where = where.relative_to(base).as_posix()
            except ValueError:
                raise ValueError(f"{where} is not inside the workspace at {base}") from None
        key = posixpath.normpath(where.strip("/") or ".")
        if key == ".." or key.startswith("../"):
            raise ValueError(f"key {where!r} leaves the store's root")
        return "" if key == "." else key

    def path(self, where: str | PurePath) -> str:
        """The filesystem path of ``where`` (for pyarrow calls that take ``filesystem=store.fs``)."""
        return self.location.join(self.key(where))

    def uri(self, where: str | PurePath = "") -> str:
        """``where`` as a URL for other tools (Ray Train's storage_path, MLflow's artifact location)."""
        return self.location.uri(self.key(where))

    # Reads.
    def info(self, where: str | PurePath) -> pafs.FileInfo:
        self.stats.metadata += 1
        with translated(self.location, f"look up {self.key(where)}"):
            return self.fs.get_file_info(self.path(where))

    def exists(self, where: str | PurePath) -> bool:
        return self.info(where).type != pafs.FileType.NotFound

    def read_bytes(self, where: str | PurePath) -> bytes:
        path = self.path(where)
        with translated(self.location, f"read {self.key(where)}"), self.fs.open_input_stream(path) as src:
            data = src.read()
        self.stats.downloads += 1
        self.stats.bytes_downloaded += len(data)
        return data

    def read_text(self, where: str | PurePath) -> str:
        return self.read_bytes(where).decode("utf-8")

    def read_json(self, where: str | PurePath) -> Any:
        return json.loads(self.read_bytes(where))

    def list_files(self, where: str | PurePath = "", recursive: bool = False) -> list[str]:
        """Keys of the files below ``where`` (sorted), without markers, temporaries and what is inside them."""
        key = self.key(where)
        selector = pafs.FileSelector(self.location.join(key), allow_not_found=True, recursive=recursive)
        self.stats.metadata += 1
        with translated(self.location, f"list {key or 'the root'}"):
            infos = self.fs.get_file_info(selector)
        root = self.location.root.rstrip("/") + "/"
        keys = []
        for info in infos:
            relative = info.path[len(root):] if info.path.startswith(root) else info.path
            if info.type == pafs.FileType.File and not any(is_hidden(part) for part in relative.split("/")):
                keys.append(relative)
        return sorted(keys)

    # Writes: a temporary name, then one publish step.
    def atomic_write_bytes(self, where: str | PurePath, data: bytes) -> None:
        """Write ``data`` at ``where``: readers see the old object or the new one, never part of it."""
        key = self.key(where)
        if self.location.is_local:
            atomic_write_bytes(Path(self.location.join(key)), data)
            return
        with self._temporary(key) as tmp:
            with translated(self.location, f"write {key}"), self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self._publish(tmp, key)

    def atomic_write_text(self, where: str | PurePath, text: str) -> None:
        self.atomic_write_bytes(where, text.encode("utf-8"))

    def atomic_write_json(self, where: str | PurePath, payload: Any) -> None:
        self.atomic_write_text(where, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")

    @contextlib.contextmanager
    def atomic_dir(self, where: str | PurePath) -> Iterator[Path]:
        """Yield a local directory to fill; on success it becomes the committed directory ``where``.

        Locally this is core.workspace.atomic_dir (one rename). On an object store the files are
        uploaded under a temporary prefix, the old marker is removed (the old output stops being
        visible), the files are moved to their keys and the manifest is written last as ``_COMMITTED``.
        On any exception nothing under ``where`` changes.
        """
        key = self.key(where)
        if self.location.is_local:
            with atomic_dir(Path(self.location.join(key))) as tmp:
                yield tmp
            return
        staging = self.cache.scratch()
        try:
            yield staging
            with self._temporary(key) as tmp:
                files = self._upload_tree(staging, tmp)
                self._replace_committed(key, tmp, files)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write_table(self, where: str | PurePath, table: pa.Table, **options: Any) -> None:
        """Write ``table`` as one Parquet file at ``where``, atomically, directly on the store."""
        import pyarrow.parquet as pq

        key = self.key(where)
        with self._temporary(key) as tmp:
            with translated(self.location, f"write {key}"):
                if self.location.is_local:
                    self.fs.create_dir(posixpath.dirname(tmp), recursive=True)
                pq.write_table(table, tmp, filesystem=self.fs, **options)
                if self.location.is_local:  # on disk before the rename, as core.workspace's atomic writes
                    with open(tmp, "rb") as fh:
                        os.fsync(fh.fileno())
            self._publish(tmp, key)

    def read_table(self, where: str | PurePath, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file, or every ``.parquet`` file of a committed directory, read on the store."""
        import pyarrow.dataset as ds

        key = self.key(where)
        info = self.info(key)
        if info.type == pafs.FileType.File:
            paths = [self.path(key)]
        else:
            paths = [self.path(f) for f in self.committed_files(key) if f.endswith(".parquet")]
        with translated(self.location, f"read {key}"):
            table = ds.dataset(paths, format="parquet", filesystem=self.fs).to_table(columns=columns)
        self.stats.downloads += len(paths)
        self.stats.bytes_downloaded += table.nbytes
        return table

    # Committed directories.
    def is_committed(self, where: str | PurePath) -> bool:
        """Locally the rename was the commit (a directory that exists is whole); remotely, the marker."""
        key = self.key(where)
        if self.location.is_local:
            return self.info(key).type == pafs.FileType.Directory
        return self.exists(posixpath.join(key, MARKER))

    def manifest(self, where: str | PurePath) -> dict[str, Any] | None:
        """A committed remote directory's manifest (files with size and sha256); None if not committed."""
        key = self.key(where)
        try:
            self.stats.metadata += 1
            with translated(self.location, f"read {key}/{MARKER}"), \
                    self.fs.open_input_stream(self.location.join(posixpath.join(key, MARKER))) as src:
                return json.loads(src.read())
        except FileNotFoundError:
            return None

    def committed_files(self, where: str | PurePath) -> list[str]:
        """Keys of a committed directory's files; FileNotFoundError names it when it is not committed."""
        key = self.key(where)
        if self.location.is_local:
            if not self.is_committed(key):
                raise FileNotFoundError(f"{self.uri(key)} does not exist")
            return self.list_files(key, recursive=True)
        manifest = self.manifest(key)
        if manifest is None:
            raise FileNotFoundError(f"{self.uri(key)} is not a committed directory (no {MARKER})")
        return [posixpath.join(key, name) for name in sorted(manifest["files"])]

    def remove(self, where: str | PurePath) -> None:
        """Remove a file or a directory; a directory stops being visible first (its marker goes first)."""
        key = self.key(where)
        info = self.info(key)
        with translated(self.location, f"remove {key}"):
            if info.type == pafs.FileType.File:
                self.fs.delete_file(self.path(key))
            elif info.type == pafs.FileType.Directory:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(self.location.join(posixpath.join(key, MARKER)))
                self.fs.delete_dir(self.path(key))

    # Cached reads.
    def cached_path(self, where: str | PurePath, digest: str | None = None) -> Path:
        """A local file with the content of ``where``: the file itself on a local store, else a cache entry.

        With ``digest`` (``sha256-...`` as a manifest records it) a hit makes no request at all.
        """
        key = self.key(where)
        if self.location.is_local:
            return Path(self.path(key))
        if digest is None:
            info = self.info(key)
            if info.type != pafs.FileType.File:
                raise FileNotFoundError(f"{self.uri(key)} does not exist")
            digest = object_id(self.uri(key), info.size or 0, info.mtime_ns or 0)
        return self._cached_object(key, digest)

    def cached_dir(self, where: str | PurePath) -> Path:
        """A local directory with a committed directory's files (one manifest read when cached)."""
        key = self.key(where)
        if self.location.is_local:
            self.committed_files(key)  # the error when it does not exist
            return Path(self.path(key))
        manifest = self.manifest(key)
        if manifest is None:
            raise FileNotFoundError(f"{self.uri(key)} is not a committed directory (no {MARKER})")
        digest = "sha256-" + hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
        if self.cache.dir_path(digest).exists():
            self.stats.cache_hits += 1
            return self.cache.dir_path(digest)
        files = {name: self._cached_object(posixpath.join(key, name), entry["sha256"])
                 for name, entry in manifest["files"].items()}
        return self.cache.fill_dir(digest, files)

    # Internals.
    def _cached_object(self, key: str, digest: str) -> Path:
        if self.cache.object_path(digest).exists():
            self.stats.cache_hits += 1
            return self.cache.object_path(digest)
        self.stats.cache_misses += 1
        return self.cache.fill_object(digest, lambda target: self._download(key, target))

    def _download(self, key: str, target: Path) -> None:
        with translated(self.location, f"read {key}"), self.fs.open_input_stream(self.path(key)) as src, \
                open(target, "wb") as out:
            while block := src.read(8 << 20):
                out.write(block)
        self.stats.downloads += 1
        self.stats.bytes_downloaded += target.stat().st_size

    @contextlib.contextmanager
    def _temporary(self, key: str) -> Iterator[str]:
        """A temporary sibling path of ``key``, removed afterwards whether the block succeeded or not."""
        parent, name = posixpath.split(key)
        tmp = self.location.join(posixpath.join(parent, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"))
        try:
            yield tmp
        finally:
            # Cleanup must not hide the block's own error (an unreachable store fails here too);
            # a temporary left behind is invisible to readers.
            with contextlib.suppress(OSError):
                info = self.fs.get_file_info(tmp)
                if info.type == pafs.FileType.File:
                    self.fs.delete_file(tmp)
                elif info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(tmp)

    def _publish(self, tmp: str, key: str) -> None:
        # S3 and friends have no rename: move is a server-side copy (one atomic PUT of the whole
        # object) and a delete; locally it is a rename.
        with translated(self.location, f"publish {key}"):
            self.fs.move(tmp, self.location.join(key))

    def _upload_tree(self, local: Path, tmp: str) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            name = path.relative_to(local).as_posix()
            if is_hidden(posixpath.basename(name)):
                raise ValueError(f"{name}: names like {MARKER} and .*.tmp are reserved by the store")
            with translated(self.location, f"upload {name}"), open(path, "rb") as src, \
                    self.fs.open_output_stream(posixpath.join(tmp, name)) as out:
                while block := src.read(8 << 20):
                    out.write(block)
            self.stats.uploads += 1
            files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        return files

    def _replace_committed(self, key: str, tmp: str, files: dict[str, dict[str, Any]]) -> None:
        final = self.location.join(key)
        with translated(self.location, f"publish {key}"):
            if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
                with contextlib.suppress(FileNotFoundError):  # from here the old output is invisible
                    self.fs.delete_file(posixpath.join(final, MARKER))
                self.fs.delete_dir(final)
            for name in files:
                self.fs.move(posixpath.join(tmp, name), posixpath.join(final, name))
            manifest = {"format": 1, "committed_at": datetime.now(UTC).isoformat(), "files": files}
            with self.fs.open_output_stream(posixpath.join(final, MARKER)) as out:
                out.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
