"""The document: one row of the raw and curated corpora, its schema and its Parquet I/O.

A document's ``id`` is the SHA-256 of its text, so the same text from two places is stored once.
Collection writes these rows, curation and validation read them; this module is the one place
the columns are named.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.core.workspace import atomic_write_bytes

DOCUMENT_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("uri", pa.string()),
    ("title", pa.string()), ("fetched_at", pa.string()), ("content_type", pa.string()),
    ("meta", pa.string()),
])
DOCUMENT_COLUMNS = tuple(DOCUMENT_SCHEMA.names)


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_documents(path: Path, rows: list[dict]) -> None:
    """Write rows with the document columns to a Parquet file atomically."""
    table = pa.Table.from_pylist([{c: row[c] for c in DOCUMENT_COLUMNS} for row in rows], schema=DOCUMENT_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_documents(path: Path) -> list[dict]:
    """Every row of one Parquet file with the document columns."""
    return pq.read_table(path, schema=DOCUMENT_SCHEMA).to_pylist()
