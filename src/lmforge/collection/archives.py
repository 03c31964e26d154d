"""Compressed files and archives, read transparently and safely.

Single-file compression (``.gz``, ``.zst``, ``.bz2``, ``.xz``) is undone as a stream; archives
(``.zip``, ``.tar`` and ``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz``/``.tar.zst``) are read member
by member without ever writing to disk. Members are still judged as if they were extracted under a
root: tar members go through ``tarfile.data_filter`` (the policy of ``extractall(filter="data")``:
no absolute paths, no ``..`` escapes, no links or devices), and zip members whose normalized path
would leave the root, or that are symlinks, are refused and counted (``unsafe_archive_member``).
Every read is bounded (``limit`` bytes after decompression) so a compression bomb is skipped, not
unpacked.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Protocol

from lmforge.collection.types import Tally

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")
_VIRTUAL_ROOT = "/lmforge-archive-root"  # members are judged against it; nothing is written there
_DRIVE = re.compile(r"^[A-Za-z]:")


class TooLarge(Exception):
    """A stream grew past its limit while being read."""


class ByteReader(Protocol):
    """What reading needs of a binary stream: files, ``GzipFile``/``BZ2File``/``LZMAFile``, archive members."""

    def read(self, size: int = -1, /) -> bytes: ...


def _zstd_reader(stream: IO[bytes]) -> IO[bytes]:
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(stream, closefd=False)
    return io.BufferedReader(reader)  # type: ignore[arg-type]  # zstandard's reader: raw I/O by duck typing


COMPRESSIONS: dict[str, Callable[[IO[bytes]], ByteReader]] = {
    # Each opener returns a stream its caller reads and closes.
    ".gz": lambda s: gzip.GzipFile(fileobj=s, mode="rb"),
    ".zst": _zstd_reader,
    ".bz2": lambda s: bz2.BZ2File(s),
    ".xz": lambda s: lzma.LZMAFile(s),  # noqa: SIM115 - the caller reads and closes the stream
}


def archive_kind(name: str) -> str | None:
    lowered = name.lower()
    if lowered.endswith(".zip"):
        return "zip"
    if lowered.endswith(_TAR_SUFFIXES):
        return "tar"
    return None


def compression_of(name: str) -> str | None:
    """The single-file compression suffix of ``name`` (``.gz``...), or None."""
    lowered = name.lower()
    for suffix in COMPRESSIONS:
        if lowered.endswith(suffix):
            return suffix
    return None


def decompressed(stream: IO[bytes], suffix: str) -> ByteReader:
    return COMPRESSIONS[suffix](stream)


def read_bounded(stream: ByteReader, limit: int) -> bytes:
    """Read all of ``stream``; raise :class:`TooLarge` past ``limit`` bytes (before holding more)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(1 << 20, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"more than {limit} bytes")
        chunks.append(chunk)


class BoundedReader(io.RawIOBase):
    """A read-only stream that raises :class:`TooLarge` once more than ``limit`` bytes were read."""

    def __init__(self, inner: ByteReader, limit: int) -> None:
        self._inner, self._limit, self._read = inner, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")  # BufferedReader passes a byte-wide view already; cast() is then a no-op
        data = self._inner.read(len(view))
        self._read += len(data)
        if self._read > self._limit:
            raise TooLarge(f"more than {self._limit} bytes after decompression")
        view[:len(data)] = data
        return len(data)


def safe_zip_name(name: str) -> str | None:
    """The member's normalized relative path, or None when extracting it would leave the root."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        return None
    normalized = posixpath.normpath(unified)
    if normalized == ".." or normalized.startswith("../") or "/../" in f"/{normalized}/":
        return None
    return normalized


def zip_members(source: IO[bytes], tally: Tally, where: str, limit: int) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) of each safe regular file in a zip archive, in archive order."""
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            member = safe_zip_name(info.filename)
            mode = (info.external_attr >> 16) & 0o170000
            if member is None or mode == stat.S_IFLNK:
                tally.skip("unsafe_archive_member", f"{where}!/{info.filename}",
                           "member would leave the extraction root" if member is None else "symlink member")
                continue
            if info.file_size > limit:
                tally.skip("too_large", f"{where}!/{member}", f"{info.file_size} bytes > max_file_bytes {limit}")
                continue
            try:
                with archive.open(info) as fh:
                    yield member, read_bounded(fh, limit)
            except TooLarge as exc:
                tally.skip("too_large", f"{where}!/{member}", str(exc))
            except (zipfile.BadZipFile, RuntimeError, OSError, EOFError) as exc:  # RuntimeError: encrypted
                tally.skip("unreadable_archive_member", f"{where}!/{member}", f"{type(exc).__name__}: {exc}")


def tar_members(source: IO[bytes], name: str, tally: Tally, where: str, limit: int) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) of each regular file in a tar archive that passes the ``data`` filter."""
    stream: IO[bytes] = source
    if name.lower().endswith((".tar.zst", ".tzst")):
        stream = _zstd_reader(source)
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if member.isdir():
                continue
            try:
                member = tarfile.data_filter(member, _VIRTUAL_ROOT)
            except tarfile.FilterError as exc:
                tally.skip("unsafe_archive_member", f"{where}!/{member.name}", f"{type(exc).__name__}: {exc}")
                continue
            if not member.isfile():
                tally.skip("unsafe_archive_member", f"{where}!/{member.name}", "link or special file")
                continue
            if member.size > limit:
                tally.skip("too_large", f"{where}!/{member.name}", f"{member.size} bytes > max_file_bytes {limit}")
                continue
            fh = archive.extractfile(member)
            if fh is not None:
                yield posixpath.normpath(member.name), read_bounded(fh, limit)
