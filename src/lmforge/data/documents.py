"""The document: one row of the raw and curated corpora, its schema and its Parquet I/O.

A document's ``id`` is the SHA-256 of its text, so the same text from two places is stored once.
Collection writes these rows, curation and validation read them, and tokenizing, training and
evaluation read their texts (:func:`iter_texts`); this module is the one place the columns are named.
With a ``store`` (:mod:`lmforge.core.storage`), a shard is written and read by pyarrow on the
workspace's store (a local directory or an object store); ``path`` then names it under ``ws.home``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.core.errors import DataError
from lmforge.core.workspace import atomic_write_bytes

if TYPE_CHECKING:
    from lmforge.core.storage import Store

DOCUMENT_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("uri", pa.string()),
    ("title", pa.string()), ("fetched_at", pa.string()), ("content_type", pa.string()),
    ("meta", pa.string()),
])
DOCUMENT_COLUMNS = tuple(DOCUMENT_SCHEMA.names)


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_documents(path: Path, rows: list[dict], store: Store | None = None) -> None:
    """Write rows with the document columns to a Parquet file atomically (on ``store`` when given)."""
    table = pa.Table.from_pylist([{c: row[c] for c in DOCUMENT_COLUMNS} for row in rows], schema=DOCUMENT_SCHEMA)
    if store is not None:
        store.write_table(path, table)
        return
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_documents(path: Path, store: Store | None = None) -> list[dict]:
    """Every row of one Parquet file with the document columns (read on ``store`` when given)."""
    if store is not None:
        return store.read_table(path, columns=list(DOCUMENT_COLUMNS)).cast(DOCUMENT_SCHEMA).to_pylist()
    return pq.read_table(path, schema=DOCUMENT_SCHEMA).to_pylist()


def iter_texts(path: Path, batch_size: int = 1024) -> Iterator[list[str]]:
    """The non-empty ``text`` values of a curated Parquet file, ``batch_size`` rows at a time.

    The file and its column are checked before the first batch, so a missing input is named at once.
    """
    if not path.exists():
        raise DataError(f"no curated text at {path}", "run the curate stage first (`lmforge curate`)")
    parquet = pq.ParquetFile(path)
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no `text` column (columns: {parquet.schema_arrow.names})",
                        "recreate it with `lmforge curate`")
    return ([t for t in batch.column(0).to_pylist() if t]
            for batch in parquet.iter_batches(batch_size=batch_size, columns=["text"]))


def read_texts(path: Path) -> list[str]:
    """Every non-empty ``text`` value of a curated Parquet file, in file order."""
    return [text for batch in iter_texts(path) for text in batch]
