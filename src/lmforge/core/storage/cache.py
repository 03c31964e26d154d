"""This machine's read cache of remote objects, keyed by content digest, and the layer's counters.

Layout under ``cache_root()`` (``LMFORGE_CACHE``, default ``~/.cache/lmforge``):
``objects/<d[:2]>/<d>``  one object's bytes, named by its digest (``sha256-<hex>`` from a committed
                          directory's manifest, or ``id-<hex>`` of URL, size and mtime for a lone object);
``dirs/<d>/``            a committed directory rebuilt from objects (hard links), named by the digest
                          of its manifest: what ``from_pretrained`` and tokenizers open;
``tmp/``                 downloads and staging in progress, renamed into place when complete.
Every entry appears by one ``os.replace``, so two readers filling the same entry at once both
succeed and a reader never opens half a file; a killed download leaves only a file in ``tmp/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.core import hashing


@dataclass
class Stats:
    """Requests this process made to a store: how a test (or a benchmark) proves a cache hit was one."""

    metadata: int = 0  # lookups that fetch no content: info, listings, manifest reads
    downloads: int = 0
    bytes_downloaded: int = 0
    uploads: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def object_id(url: str, size: int, mtime_ns: int) -> str:
    """A lone object's cache key when no manifest records its sha256: a rewrite changes size or mtime."""
    return "id-" + hashlib.sha256(f"{url}\0{size}\0{mtime_ns}".encode()).hexdigest()


class ReadCache:
    """Content-addressed local copies of remote objects and directories."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def object_path(self, digest: str) -> Path:
        return self.root / "objects" / digest[-2:] / digest

    def dir_path(self, digest: str) -> Path:
        return self.root / "dirs" / digest

    def scratch(self) -> Path:
        """A fresh private directory under ``tmp/`` (the caller removes it)."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=tmp))

    def fill_object(self, digest: str, download: Callable[[Path], None]) -> Path:
        """The cached object ``digest``; ``download(path)`` writes it when it is missing.

        A ``sha256-`` digest is checked after the download, so a store that changed under a manifest
        (or a corrupt transfer) is an error rather than a wrong cache entry.
        """
        final = self.object_path(digest)
        if final.exists():
            return final
        scratch = self.scratch()
        try:
            part = scratch / "object"
            download(part)
            if digest.startswith("sha256-"):
                actual = sha256_file(part)
                if actual != digest:
                    raise OSError(f"downloaded content has digest {actual}, its manifest says {digest}")
            part.chmod(0o444)  # entries are shared by hard links: nobody edits them in place
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return final

    def fill_dir(self, digest: str, files: dict[str, Path]) -> Path:
        """The cached directory ``digest`` holding ``files`` (relative name -> cached object)."""
        final = self.dir_path(digest)
        if final.exists():
            return final
        scratch = self.scratch()
        try:
            for name, source in files.items():
                target = scratch / "dir" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, target)
                except OSError:  # another filesystem or no hard links: a copy is as good
                    shutil.copyfile(source, target)
            (scratch / "dir").mkdir(exist_ok=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(scratch / "dir", final)
            except OSError:
                if not final.exists():  # else a concurrent reader published the same entry first
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return final


def sha256_file(path: Path) -> str:
    """The file's digest as the manifests and cache keys spell it: ``sha256-<hex>``."""
    return "sha256-" + hashing.sha256_file(path)
