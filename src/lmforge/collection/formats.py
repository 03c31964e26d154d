"""File formats to documents: one function for a file on disk, one for bytes (members, S3 objects).

Formats are chosen by file name: ``.txt .text .md .markdown .html .htm .xhtml`` (one document per
file; HTML reduced to its main text), ``.jsonl .ndjson .json .csv .tsv .parquet`` (one document per
record, text and metadata from the configured fields), ``.pdf .epub`` (one document per book).
Compression and archives around any of them are undone first (:mod:`lmforge.collection.archives`).
Record files stream, so a large JSONL, CSV or Parquet file never sits in memory whole, and no
document larger than ``max_document_bytes`` is ever held whole: a longer text file or line is
skipped (``too_large``) after reading at most that much of it. Problems with one item (a malformed
JSONL line, a record without the text field, a binary file with a text extension, an oversized
member) are counted in the tally with where they happened; the rest of the file is kept. A file
that breaks its parser (JSON nested past the interpreter's stack, a corrupt PDF, any library error)
is one skipped file with the error as its reason, never the end of its source.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from lmforge.collection import archives, books
from lmforge.collection.html import main_text
from lmforge.collection.textdecode import decode_line, decode_text, repair_mojibake
from lmforge.collection.types import Tally, make_document

FORMATS = {
    ".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".pdf": "pdf", ".epub": "epub",
}
CONTENT_TYPES = {
    "text": "text/plain", "markdown": "text/markdown", "html": "text/html", "jsonl": "application/x-ndjson",
    "json": "application/json", "csv": "text/csv", "parquet": "application/vnd.apache.parquet",
    "pdf": "application/pdf", "epub": "application/epub+zip",
}
_MAX_NESTING = 2  # an archive inside an archive is read; deeper nesting is skipped
_ONE_DOCUMENT = ("text", "markdown", "html")  # the whole file is one document's text
_FIRST_LINE = re.compile(r"\s*([^\n]*)")  # the first non-blank line, without copying the rest of the text


@dataclass(frozen=True)
class FormatOptions:
    source: str  # the source type written in each document's `source` column
    text_field: str = "text"
    title_field: str | None = "title"
    meta_fields: tuple[str, ...] = ()
    max_bytes: int = 256 * 2**20
    max_document_bytes: int = 16 * 2**20

    @classmethod
    def of(cls, cfg: Any) -> FormatOptions:
        return cls(cfg.type, cfg.text_field, cfg.title_field, tuple(cfg.meta_fields), cfg.max_file_bytes,
                   cfg.max_document_bytes)


def format_of(name: str) -> str | None:
    """The format of a plain (uncompressed, non-archive) file name."""
    return FORMATS.get(PurePosixPath(name.lower()).suffix)


def is_supported(name: str) -> bool:
    if archives.archive_kind(name):
        return True
    suffix = archives.compression_of(name)
    return format_of(name[: -len(suffix)] if suffix else name) is not None


def open_file(path: Path) -> BinaryIO:
    """``path`` opened for reading, refusing a symbolic link (OSError) even one swapped in after listing."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def documents_from_path(path: Path, uri: str, opts: FormatOptions, tally: Tally) -> Iterator[dict]:
    """Documents of one file on disk; record formats and archives stream from the file."""
    with open_file(path) as fh:
        yield from documents_from_stream(path.name, fh, uri, opts, tally)


def documents_from_bytes(name: str, data: bytes, uri: str, opts: FormatOptions, tally: Tally,
                         depth: int = 0) -> Iterator[dict]:
    yield from documents_from_stream(name, io.BytesIO(data), uri, opts, tally, depth)


def documents_from_stream(name: str, stream: IO[bytes], uri: str, opts: FormatOptions, tally: Tally,
                          depth: int = 0) -> Iterator[dict]:
    """Documents of a seekable binary stream named ``name`` (the name decides the format)."""
    kind = archives.archive_kind(name)
    if kind is not None:
        yield from _archive(kind, name, stream, uri, opts, tally, depth)
        return
    suffix = archives.compression_of(name)
    inner = name[: -len(suffix)] if suffix else name
    fmt = format_of(inner)
    if fmt is None:
        tally.skip("unsupported_format", uri, f"no reader for {PurePosixPath(name).suffix or 'files without a suffix'}")
        return
    body: IO[bytes] = stream
    if suffix:
        body = io.BufferedReader(archives.BoundedReader(archives.decompressed(stream, suffix), opts.max_bytes))
    try:
        yield from _read_format(fmt, inner, body, uri, opts, tally, depth)
    except archives.TooLarge as exc:
        tally.skip("too_large", uri, f"{exc} (max_file_bytes)")
    except RecursionError:
        tally.skip("unreadable", uri, "RecursionError: nested deeper than the parser's stack allows")
    except Exception as exc:  # noqa: BLE001 - corrupt compression, a truncated file, any parser's own error: one file's skip, named, never its source's end
        tally.skip("unreadable", uri, f"{type(exc).__name__}: {exc}")


def _read_format(fmt: str, name: str, body: IO[bytes], uri: str, opts: FormatOptions, tally: Tally,
                 depth: int) -> Iterator[dict]:
    if fmt == "jsonl":
        yield from _jsonl(body, uri, opts, tally)
    elif fmt == "csv":
        yield from _csv(body, uri, opts, tally, "\t" if name.lower().endswith(".tsv") else ",")
    elif fmt == "parquet":
        yield from _parquet(body, uri, opts, tally)
    elif fmt in _ONE_DOCUMENT:
        limit = min(opts.max_bytes, opts.max_document_bytes)
        try:
            data = archives.read_bounded(body, limit)
        except archives.TooLarge:
            tally.skip("too_large", uri, f"a {fmt} file is one document, and this one is over {limit} bytes "
                       "(max_document_bytes, max_file_bytes)")
            return
        yield from _whole_file(fmt, name, data, uri, opts, tally)
    else:
        data = archives.read_bounded(body, opts.max_bytes)
        yield from _whole_file(fmt, name, data, uri, opts, tally)


def _whole_file(fmt: str, name: str, data: bytes, uri: str, opts: FormatOptions, tally: Tally) -> Iterator[dict]:
    stem = PurePosixPath(name).stem
    if fmt == "pdf":
        yield from books.pdf_documents(data, uri, stem, opts.source, tally)
        return
    if fmt == "epub":
        yield from books.epub_documents(data, uri, stem, opts.source, tally)
        return
    text = decode_text(data, tally, uri)
    if text is None:
        return
    if fmt == "json":
        yield from _json(text, uri, opts, tally)
        return
    title = stem
    if fmt == "html":
        title, text = main_text(text, uri)
        title = title or stem
    else:
        title = _heading(text) or stem
    if not text or text.isspace():
        tally.skip("empty", uri, "no text")
        return
    yield make_document(text, source=opts.source, uri=uri, title=title, content_type=CONTENT_TYPES[fmt])


def _heading(text: str) -> str | None:
    match = _FIRST_LINE.match(text)
    first = match.group(1).strip() if match else ""
    return first.lstrip("#").strip() or None if first.startswith("#") else None


def _archive(kind: str, name: str, stream: IO[bytes], uri: str, opts: FormatOptions, tally: Tally,
             depth: int) -> Iterator[dict]:
    if depth >= _MAX_NESTING:
        tally.skip("nested_too_deep", uri, f"archives nested more than {_MAX_NESTING} deep")
        return
    try:
        members = (archives.zip_members(stream, tally, uri, opts.max_bytes) if kind == "zip"
                   else archives.tar_members(stream, name, tally, uri, opts.max_bytes))
        for member, data in members:
            if not is_supported(member):
                tally.skip("unsupported_format", f"{uri}!/{member}", "no reader for this member")
                continue
            yield from documents_from_bytes(member, data, f"{uri}!/{member}", opts, tally, depth + 1)
    except archives.TooLarge as exc:
        tally.skip("too_large", uri, str(exc))
    except Exception as exc:  # noqa: BLE001 - zipfile.BadZipFile, tarfile.ReadError (not an OSError), zstd errors: the archive's skip
        tally.skip("unreadable", uri, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- record formats


def record_document(record: Any, uri: str, opts: FormatOptions, tally: Tally, content_type: str) -> dict | None:
    """The document of one record, or None (counted) when it has no usable text."""
    if not isinstance(record, dict):
        tally.skip("not_a_record", uri, f"a {type(record).__name__}, not an object")
        return None
    text = record.get(opts.text_field)
    if not isinstance(text, str):
        tally.skip("missing_text_field", uri, f"no string field '{opts.text_field}' (set text_field)")
        return None
    if not text.strip():
        tally.skip("empty", uri, f"field '{opts.text_field}' is empty")
        return None
    if len(text) > opts.max_document_bytes:  # characters: a lower bound of its bytes, and no copy to count them
        tally.skip("too_large", uri, f"field '{opts.text_field}' holds more than max_document_bytes "
                   f"{opts.max_document_bytes}")
        return None
    title = record.get(opts.title_field) if opts.title_field else None
    keep = opts.meta_fields or [k for k in record if k not in (opts.text_field, opts.title_field)]
    meta = {k: record[k] for k in keep if k in record}
    return make_document(repair_mojibake(text, tally), source=opts.source, uri=uri,
                         title=str(title) if title is not None else "", content_type=content_type, meta=meta)


def bounded_lines(body: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a binary stream; None for a line longer than ``limit`` bytes, which is
    read past in small pieces and never held whole."""
    number = 0
    while line := body.readline(limit + 1):
        number += 1
        if len(line) <= limit or line.endswith(b"\n"):
            yield number, line
            continue
        del line  # the head of the long line goes before its rest is read
        while (piece := body.readline(1 << 16)) and not piece.endswith(b"\n"):
            pass
        yield number, None


def _too_long(tally: Tally, where: str, number: int, limit: int) -> None:
    tally.skip("too_large", where, f"line {number} is longer than max_document_bytes {limit}")


def _jsonl(body: IO[bytes], uri: str, opts: FormatOptions, tally: Tally) -> Iterator[dict]:
    for number, raw in bounded_lines(body, opts.max_document_bytes):
        if raw is None:
            _too_long(tally, f"{uri}#L{number}", number, opts.max_document_bytes)
            continue
        line = decode_line(raw, tally).strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            tally.skip("malformed_line", f"{uri}#L{number}", f"line {number} is not JSON: {exc.msg}")
            continue
        except RecursionError:
            tally.skip("malformed_line", f"{uri}#L{number}", f"line {number} nests deeper than the JSON parser "
                       "allows (RecursionError)")
            continue
        doc = record_document(record, f"{uri}#L{number}", opts, tally, CONTENT_TYPES["jsonl"])
        if doc is not None:
            yield doc


def _json(text: str, uri: str, opts: FormatOptions, tally: Tally) -> Iterator[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        tally.skip("malformed_json", uri, f"line {exc.lineno}: {exc.msg}")
        return
    except RecursionError:
        tally.skip("malformed_json", uri, "nested deeper than the JSON parser allows (RecursionError)")
        return
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        where = f"{uri}#{index}" if isinstance(data, list) else uri
        doc = record_document(record, where, opts, tally, CONTENT_TYPES["json"])
        if doc is not None:
            yield doc


def _csv(body: IO[bytes], uri: str, opts: FormatOptions, tally: Tally, delimiter: str) -> Iterator[dict]:
    limit = opts.max_document_bytes
    csv.field_size_limit(max(limit, 131072))  # a longer field is that row's csv.Error, counted below

    def lines() -> Iterator[str]:
        for number, raw in bounded_lines(body, limit):
            if raw is None:
                _too_long(tally, f"{uri}#line={number}", number, limit)
            else:
                yield decode_line(raw, tally).lstrip("\ufeff") if number == 1 else decode_line(raw, tally)

    reader = csv.DictReader(lines(), delimiter=delimiter)
    try:
        columns = reader.fieldnames or []
    except csv.Error as exc:
        tally.skip("malformed_row", f"{uri}#row=0", f"header: {exc}")
        return
    if opts.text_field not in columns:
        tally.skip("missing_text_field", uri, f"no column '{opts.text_field}' (set text_field)")
        return
    row = 0
    while True:
        row += 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            tally.skip("malformed_row", f"{uri}#row={row}", str(exc))
            continue
        doc = record_document(record, f"{uri}#row={row}", opts, tally, CONTENT_TYPES["csv"])
        if doc is not None:
            yield doc


def _parquet(body: IO[bytes], uri: str, opts: FormatOptions, tally: Tally) -> Iterator[dict]:
    import pyarrow.parquet as pq

    source = body if body.seekable() else io.BytesIO(archives.read_bounded(body, opts.max_bytes))
    reader = pq.ParquetFile(source)
    if opts.text_field not in reader.schema_arrow.names:
        tally.skip("missing_text_field", uri, f"no column '{opts.text_field}' (set text_field)")
        return
    row = 0
    for batch in reader.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            doc = record_document(record, f"{uri}#row={row}", opts, tally, CONTENT_TYPES["parquet"])
            if doc is not None:
                yield doc
