"""The ``local`` source: files and directories on disk, in every format :mod:`formats` reads.

A file whose size and modification time match the last run is not opened at all; a file whose
stat changed is hashed, and only a changed hash re-reads it. Many files are split into work shards
read in parallel (:mod:`lmforge.collection.parallel`); a file larger than a shard streams in the
source's own thread, so memory stays bounded by the shard size.

Nothing outside the configured paths is read: a file symlink whose target resolves outside the
directory it was found in is skipped and counted (``symlink_outside_source``); one whose target
stays inside is read (under the link's URI; the same text twice is one document). Directory links
are not descended. Files are opened without following a final symlink, so a file swapped for a
link after the listing is refused too.

    >>> from lmforge.config.data import LocalSource
    >>> source = LocalFiles(LocalSource(paths=["corpus/"], include=["*.md", "*.pdf"]))
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.collection.formats import (
    FormatOptions,
    documents_from_bytes,
    documents_from_path,
    is_supported,
    open_file,
)
from lmforge.collection.parallel import choose_backend, chunked, run_chunks
from lmforge.collection.types import Fingerprint, SourceContext, Tally, Unit
from lmforge.config.data import LocalSource
from lmforge.core.errors import DataError
from lmforge.core.hashing import sha256_stream


@dataclass(frozen=True)
class FileTask:
    path: str  # the file itself, symlinks resolved
    uri: str  # the path it was listed under
    size: int
    mtime_ns: int
    prior_hash: str


def _file_sha256(path: Path) -> str:
    with open_file(path) as fh:  # never through a link swapped in since listing (open_file's O_NOFOLLOW)
        return sha256_stream(fh)


def read_small_files(job: tuple[FormatOptions, list[FileTask]]) -> tuple[list[Unit], Tally]:
    """Read one work shard of files (runs in a pool worker or on Ray): units with their documents."""
    opts, tasks = job
    tally = Tally()
    units = []
    for task in tasks:
        path = Path(task.path)
        try:
            with open_file(path) as fh:
                data = fh.read()
        except OSError as exc:  # vanished, unreadable or swapped for a link since listing
            tally.skip("unreadable", task.uri, f"{type(exc).__name__}: {exc}")
            continue
        fingerprint = Fingerprint(hashlib.sha256(data).hexdigest(), size=task.size, mtime_ns=task.mtime_ns)
        if fingerprint.hash == task.prior_hash:
            units.append(Unit(task.uri, fingerprint, None))
        else:
            units.append(Unit(task.uri, fingerprint, list(documents_from_bytes(path.name, data, task.uri, opts, tally))))
    return units, tally


class LocalFiles:
    def __init__(self, cfg: LocalSource) -> None:
        self.cfg = cfg
        self.opts = FormatOptions.of(cfg)

    def units(self, ctx: SourceContext) -> Iterator[Unit]:
        tasks = self._tasks(ctx)
        ctx.expect(len(tasks))
        changed = []
        for task in tasks:
            prior = ctx.known(task.uri)
            if prior is not None and (prior.fingerprint.size, prior.fingerprint.mtime_ns) == (task.size, task.mtime_ns):
                yield Unit(task.uri, prior.fingerprint, None)
            else:
                changed.append(FileTask(task.path, task.uri, task.size, task.mtime_ns,
                                        prior.fingerprint.hash if prior else ""))
        limit = ctx.parallel.chunk_bytes
        small = [t for t in changed if t.size <= limit]
        chunks = chunked(small, [t.size for t in small], ctx.parallel.chunk_files, limit)
        backend = choose_backend(ctx.parallel, len(small))
        for units, tally in run_chunks(read_small_files, [(self.opts, c) for c in chunks], backend,
                                       ctx.parallel.workers, ctx.parallel.ray_address, local=True):
            ctx.tally.merge(tally)
            yield from units
        for task in changed:
            if task.size > limit:
                yield from self._large_file(task, ctx)

    def _large_file(self, task: FileTask, ctx: SourceContext) -> Iterator[Unit]:
        """A file bigger than a work shard: hash it in one pass, then stream its documents."""
        path = Path(task.path)
        try:
            fingerprint = Fingerprint(_file_sha256(path), size=task.size, mtime_ns=task.mtime_ns)
        except OSError as exc:
            ctx.tally.skip("unreadable", task.uri, f"{type(exc).__name__}: {exc}")
            return
        if fingerprint.hash == task.prior_hash:
            yield Unit(task.uri, fingerprint, None)
        else:
            yield Unit(task.uri, fingerprint, documents_from_path(path, task.uri, self.opts, ctx.tally))

    def _tasks(self, ctx: SourceContext) -> list[FileTask]:
        tasks = []
        for path in self.files(ctx.tally):
            try:
                target = path.resolve(strict=True)
                info = target.stat()
            except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
                ctx.tally.skip("unreadable", path.as_uri(), f"{type(exc).__name__}: {exc}")
                continue
            tasks.append(FileTask(str(target), path.as_uri(), info.st_size, info.st_mtime_ns, ""))
        return tasks

    def files(self, tally: Tally) -> list[Path]:
        """The files the config selects, sorted, as listed (a link inside its directory stays a link);
        those no reader knows, and links out of their directory, are counted in ``tally``."""
        files: list[Path] = []
        for raw in self.cfg.paths:
            root = Path(raw).expanduser().resolve()
            if root.is_file():
                candidates = [(root, root.name)]
            elif root.is_dir():
                candidates = list(self._walk(root, tally))
            else:
                raise DataError(f"local source path {raw} does not exist",
                                "fix or remove it in data.sources[].paths (relative paths are resolved from "
                                "the directory you run lmforge in)")
            for path, _relative in candidates:
                if not is_supported(path.name):
                    tally.skip("unsupported_format", path.as_uri(), "no reader for this file type")
                else:
                    files.append(path)
        return sorted(set(files))

    def _walk(self, root: Path, tally: Tally) -> Iterator[tuple[Path, str]]:
        for folder, dirs, names in os.walk(root):
            if not self.cfg.hidden:
                dirs[:] = [d for d in dirs if not d.startswith(".")]
            dirs.sort()
            for name in sorted(names):
                if name.startswith(".") and not self.cfg.hidden:
                    continue
                path = Path(folder) / name
                relative = path.relative_to(root).as_posix()
                if self._included(name, relative) and path.is_file() and self._inside(path, root, tally):
                    yield path, relative

    @staticmethod
    def _inside(path: Path, root: Path, tally: Tally) -> bool:
        """False (counted) for a symlink whose target lies outside ``root``, the resolved source directory."""
        if not path.is_symlink():
            return True
        target = path.resolve()
        if target.is_relative_to(root):
            return True
        tally.skip("symlink_outside_source", path.as_uri(), f"a link to {target}, outside {root}")
        return False

    def _included(self, name: str, relative: str) -> bool:
        def matches(patterns: list[str]) -> bool:
            return any(fnmatch.fnmatch(relative if "/" in p else name, p) for p in patterns)

        return matches(self.cfg.include) and not matches(self.cfg.exclude)
