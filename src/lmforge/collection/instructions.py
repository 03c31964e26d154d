"""Instruction and preference records from the configured sources, each file read and reported.

The listing and fetching are the document sources' own (:mod:`.local`'s file selection, :mod:`.s3`'s
listing and download, :mod:`.hf`'s ``load``, :mod:`.fetch`'s polite fetcher); what differs is what a
file becomes: not documents but records, normalized to the canonical SFT or preference form by
:mod:`lmforge.data.record_files`. Record files are ``.jsonl``/``.ndjson`` and ``.json``, plain or
``.gz``/``.zst``/``.bz2``/``.xz``; a ``datasets`` split gives its rows. Other files a directory or
prefix holds are listed in the report as skipped. A configured file that cannot be read, or that
gives no usable record, stops the stage with a DataError naming it; a bad record is only counted.

    >>> records, report = read_record_sources(cfg.instructions.sources, "sft", ws.collect_cache_dir, 2000)
"""

from __future__ import annotations

import io
import tempfile
import zlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit

from lmforge.collection import hf, s3
from lmforge.collection.archives import BoundedReader, TooLarge, compression_of, decompressed, read_bounded
from lmforge.collection.fetch import Fetcher, FetchError
from lmforge.collection.local import LocalFiles
from lmforge.collection.types import Tally
from lmforge.collection.urls import redact_url
from lmforge.config.base import Section
from lmforge.config.data import HFSource, LocalSource, S3Source
from lmforge.config.instructions import HFRecords, LocalRecords, RecordSource, S3Records, WebRecords
from lmforge.config.locations import FileSelection, HFLocation, LocalPaths, S3Location, source_labels
from lmforge.core.errors import DataError
from lmforge.data.record_files import FileReport, Item, RecordSet, json_items, jsonl_items, read_file, require_records
from lmforge.data.stdlib_docs import build_instruction_pairs

RECORD_FILES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
_SPOOL_BYTES = 16 * 2**20  # S3 objects up to this size stay in memory, larger ones spill to a temp file
# What a broken file raises while it is read: bad compression, truncation, a bound passed.
# RecursionError: JSON nested deeper than the parser's stack (`[` x 200,000).
_UNREADABLE = (TooLarge, OSError, EOFError, zlib.error, RecursionError)

Opened = tuple[str, Iterator[Item]]  # (uri, its items)


def record_kind(name: str) -> str | None:
    """``jsonl`` or ``json`` for a record file name (compression suffix allowed), else None."""
    suffix = compression_of(name)
    inner = name[: -len(suffix)] if suffix else name
    return RECORD_FILES.get(PurePosixPath(inner.lower()).suffix)


def file_items(name: str, stream: IO[bytes], uri: str, limit: int) -> Iterator[Item]:
    """The records of one file's bytes; a name without a record suffix is read as JSON (or JSON lines)."""
    suffix = compression_of(name)
    body: Any = stream
    if suffix:
        body = io.BufferedReader(BoundedReader(decompressed(stream, suffix), limit))
    if record_kind(name) == "jsonl":
        yield from jsonl_items(body, uri)
    else:
        yield from json_items(read_bounded(body, limit), uri)


def read_record_sources(sources: list[Any], kind: str, scratch_dir: Path,
                        stdlib_records: int = 0) -> tuple[list[dict], dict[str, dict]]:
    """(canonical records of every source, report per source label) for one set.

    ``kind`` is ``sft`` or ``preference``; ``stdlib_records`` is how many pairs a ``stdlib`` source
    derives (``data.instructions.max_records``).
    """
    records = RecordSet()
    reports: dict[str, dict] = {}
    for label, src in zip(source_labels(sources), sources):
        if src.type == "stdlib":
            report = FileReport("stdlib://docstrings", "stdlib")
            records.add([(f"stdlib://{p['instruction']}", p) for p in build_instruction_pairs(stdlib_records)], report)
            reports[label] = _source_report(src.type, [report], Tally())
            continue
        skipped, files = Tally(), []
        for uri, items in _opened_files(src, skipped, scratch_dir / "instructions"):
            report = FileReport(uri)
            try:
                records.add(read_file(items, src.format, kind, report), report)
            except _UNREADABLE as exc:
                raise DataError(f"{uri} cannot be read: {type(exc).__name__}: {exc}",
                                "check that the file is whole (not truncated) and, for a large one, raise "
                                "max_file_bytes (or fetch.max_bytes for a web source)") from None
            require_records(report)
            files.append(report)
        if not files:
            raise DataError(f"data.{'instructions' if kind == 'sft' else 'preferences'} source {label} found no "
                            f"record file ({_first_skip(skipped)})",
                            "point it at .jsonl or .json files (plain or compressed), or at a `datasets` split")
        reports[label] = _source_report(src.type, files, skipped)
    return list(records.records.values()), reports


def _source_report(kind: str, files: list[FileReport], skipped: Tally) -> dict:
    _, _, examples = skipped.snapshot()
    return {"type": kind, "read": sum(f.read for f in files), "skipped": sum(f.skipped for f in files),
            "files": [f.as_dict() for f in files], "files_skipped": examples}


def _first_skip(tally: Tally) -> str:
    _, _, examples = tally.snapshot()
    return f"{examples[0]['where']}: {examples[0]['detail']}" if examples else "nothing matched"


def _opened_files(src: RecordSource, skipped: Tally, cache_dir: Path) -> Iterator[Opened]:
    if isinstance(src, LocalRecords):
        yield from _local(src, skipped)
    elif isinstance(src, S3Records):
        yield from _s3(src, skipped)
    elif isinstance(src, HFRecords):
        yield _hf(src, cache_dir)
    elif isinstance(src, WebRecords):
        yield from _web(src)


def _location(src: Any, *bases: type[Section]) -> dict:
    """The location keys of ``src``, to build the document source whose listing code is reused."""
    return src.model_dump(include={name for base in bases for name in base.model_fields})


def _local(src: LocalRecords, skipped: Tally) -> Iterator[Opened]:
    for path in LocalFiles(LocalSource(**_location(src, LocalPaths, FileSelection))).files(skipped):
        uri = str(path)
        if record_kind(path.name) is None:
            skipped.skip("not_a_record_file", uri, "not .jsonl, .ndjson or .json")
        elif path.stat().st_size > src.max_file_bytes:
            skipped.skip("too_large", uri, f"{path.stat().st_size} bytes > max_file_bytes {src.max_file_bytes}")
        else:
            with path.open("rb") as fh:
                yield uri, file_items(path.name, fh, uri, src.max_file_bytes)


def _s3(src: S3Records, skipped: Tally) -> Iterator[Opened]:
    from botocore.exceptions import BotoCoreError, ClientError

    cfg = S3Source(**_location(src, S3Location, FileSelection))
    client = s3.make_client(cfg)
    for key, size, _etag in s3.S3Objects(cfg).listing(skipped):
        uri = f"s3://{cfg.bucket}/{key}"
        name = key.rsplit("/", 1)[-1]
        if record_kind(name) is None:
            skipped.skip("not_a_record_file", uri, "not .jsonl, .ndjson or .json")
            continue
        if size > src.max_file_bytes:
            skipped.skip("too_large", uri, f"{size} bytes > max_file_bytes {src.max_file_bytes}")
            continue
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
            try:
                s3.download(client, cfg.bucket, key, spool)
            except (ClientError, BotoCoreError) as exc:
                raise DataError(f"{uri} cannot be downloaded: {type(exc).__name__}",
                                "check the object and that these credentials may read it (s3:GetObject)") from None
            yield uri, file_items(name, spool, uri, src.max_file_bytes)


def _hf(src: HFRecords, cache_dir: Path) -> Opened:
    dataset = hf.load(HFSource(**_location(src, HFLocation)), cache_dir)
    base = f"hf://{src.dataset}" + (f"/{src.config_name}" if src.config_name else "") + f"/{src.split}"
    rows = islice(iter(dataset), src.max_records)
    return base, ((f"{base}#{row}", record) for row, record in enumerate(rows))


def _web(src: WebRecords) -> Iterator[Opened]:
    fetcher = Fetcher(src.fetch, src.allow_private, src.allow_networks)
    for url in src.urls:
        try:
            response = fetcher.get(url)
        except FetchError as exc:
            raise DataError(f"{redact_url(url)} could not be fetched ({exc.reason}: {exc.detail})",
                            "check the URL; a private address needs allow_networks (or allow_private)") from None
        name = PurePosixPath(urlsplit(response.url).path).name or "records.json"
        yield url, file_items(name, io.BytesIO(response.body), url, src.fetch.max_bytes)
