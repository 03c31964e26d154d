"""Incremental state: what each unit yielded last time, and which documents are live.

Unit states are stored as Parquet deltas (``units-NNNNN.parquet``), one per commit, read in
manifest order so a later row for a URI replaces an earlier one. A document is *live* while at
least one unit's latest state lists it: a changed file replaces its old documents, and the same
text reached through two URIs is one document referenced twice. The corpus digest is the SHA-256
of the sorted live ids, so it names the exact set of documents whatever the order of collection.
The deltas are read and written on the workspace's store (lmforge.core.storage).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from lmforge.collection.types import Fingerprint, UnitState
from lmforge.core.storage import Store

UNIT_SCHEMA = pa.schema([
    ("uri", pa.string()), ("source", pa.string()), ("hash", pa.string()), ("etag", pa.string()),
    ("last_modified", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
    ("doc_ids", pa.list_(pa.string())), ("doc_bytes", pa.list_(pa.int64())), ("links", pa.list_(pa.string())),
    ("canonical", pa.string()),
])


def write_units(store: Store, path: Path, states: Iterable[UnitState]) -> int:
    rows = [{"uri": s.uri, "source": s.source, "hash": s.fingerprint.hash, "etag": s.fingerprint.etag,
             "last_modified": s.fingerprint.last_modified, "size": s.fingerprint.size,
             "mtime_ns": s.fingerprint.mtime_ns, "doc_ids": list(s.doc_ids), "doc_bytes": list(s.doc_bytes),
             "links": list(s.links), "canonical": s.canonical} for s in states]
    store.write_table(path, pa.Table.from_pylist(rows, schema=UNIT_SCHEMA))
    return len(rows)


def read_units(store: Store, paths: Iterable[Path]) -> dict[str, UnitState]:
    """Latest state per URI over the delta files, in order."""
    states: dict[str, UnitState] = {}
    for path in paths:
        for row in store.read_table(path).cast(UNIT_SCHEMA).to_pylist():
            fingerprint = Fingerprint(row["hash"] or "", row["etag"], row["last_modified"], row["size"], row["mtime_ns"])
            states[row["uri"]] = UnitState(row["uri"], row["source"], fingerprint, tuple(row["doc_ids"] or ()),
                                           tuple(row["doc_bytes"] or ()), tuple(row["links"] or ()),
                                           row["canonical"] or "")
    return states


class LiveSet:
    """Reference counts of document ids over the latest unit states."""

    def __init__(self, states: Iterable[UnitState]) -> None:
        self.refs: Counter[str] = Counter()
        self.sizes: dict[str, int] = {}
        for state in states:
            self._add(state.doc_ids, state.doc_bytes)
        self.initially_live = frozenset(self.refs)
        self.born: set[str] = set()  # live now, not live when the run started

    def _add(self, ids: Iterable[str], sizes: Iterable[int]) -> list[str]:
        became_live = []
        for doc_id, size in zip(ids, sizes):
            if self.refs[doc_id] == 0:
                became_live.append(doc_id)
            self.refs[doc_id] += 1
            self.sizes[doc_id] = size
        return became_live

    def replace(self, old_ids: Iterable[str], new_ids: tuple[str, ...], new_sizes: tuple[int, ...]) -> int:
        """Swap one unit's documents; returns how many ids became live that were not live at the start."""
        new = 0
        for doc_id in self._add(new_ids, new_sizes):
            if doc_id not in self.initially_live:
                self.born.add(doc_id)
                new += 1
        for doc_id in old_ids:
            self.refs[doc_id] -= 1
            if self.refs[doc_id] <= 0:
                del self.refs[doc_id]
                self.born.discard(doc_id)
        return new

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.refs

    def __len__(self) -> int:
        return len(self.refs)

    def total_bytes(self) -> int:
        return sum(self.sizes[doc_id] for doc_id in self.refs)

    def digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.refs)).encode()).hexdigest()
