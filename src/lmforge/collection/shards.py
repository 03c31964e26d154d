"""The raw corpus on disk: immutable Parquet shards, unit-state deltas, and the manifest that commits them.

Layout of ``ws.raw_dir``::

    docs-NNNNN.parquet    documents (DOCUMENT_SCHEMA), each id written once, ever
    units-NNNNN.parquet   unit states changed since the previous commit (see state.py)
    manifest.json         the commit: which shards and deltas count, counts, bytes, digest, stats

A commit writes the new shard and delta (each atomically: temp file, fsync, rename) and then the
manifest (the same way); the manifest's rename is the commit point. Files the manifest does not
name are leftovers of a killed run and are deleted when the store opens, so a run killed at any
moment (kill -9 included) leaves the previous commit intact, and the next run resumes from it:
units already committed are recognised as unchanged, nothing is lost and nothing is doubled.
Documents of a unit whose collection was interrupted may sit in a committed shard without being
live; readers skip them, and the re-run's unit makes them live without writing them again.

Every file goes through the workspace's :class:`~lmforge.core.storage.Store`: on a local workspace
the steps above exactly; on an object store each shard, delta and manifest is written at a
temporary key and then moved into place (one whole object), so the manifest's publish is still the
commit point and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.collection.state import LiveSet, read_units, write_units
from lmforge.collection.types import Fingerprint, Unit, UnitState, now_iso
from lmforge.core.errors import DataError
from lmforge.core.storage import Store
from lmforge.data.documents import read_documents, write_documents

MANIFEST = "manifest.json"
FORMAT = 2
_COMPACT_UNIT_FILES = 8  # more deltas than this are merged into one at the end of a run


class Interrupted(Exception):
    """Raised in source threads after :meth:`RawStore.stop`; never reported as a source error."""


def load_manifest(store: Store, raw_dir: Path) -> dict:
    path = raw_dir / MANIFEST
    return json.loads(store.read_bytes(path)) if store.exists(path) else {}


def iter_live_documents(store: Store, raw_dir: Path) -> Iterator[dict]:
    """Every live document of the committed corpus, one shard in memory at a time."""
    manifest = load_manifest(store, raw_dir)
    shards = [raw_dir / s["path"] for s in manifest.get("shards", [])]
    live: set[str] | None = None
    if manifest.get("format") == FORMAT:
        states = read_units(store, (raw_dir / name for name in manifest.get("units", [])))
        live = {doc_id for state in states.values() for doc_id in state.doc_ids}
    emitted: set[str] = set()
    for shard in shards:
        for row in read_documents(shard, store):
            if (live is None or row["id"] in live) and row["id"] not in emitted:
                emitted.add(row["id"])
                yield row


@contextlib.contextmanager
def exclusive(lock: Path, raw_dir: str) -> Iterator[None]:
    """Hold the workspace's collect lock file ``lock`` (released by the kernel even on kill -9).

    It is a local file: on an object-store workspace it guards this machine's runs only (the store
    has no lock; two machines collecting into one workspace are not arbitrated).
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another `lmforge collect` is writing {raw_dir}",
                            "wait for it to finish, or give this run its own LMFORGE_HOME") from None
        yield


class RawStore:
    """Adds units to the corpus from many source threads; commits every shard's worth of documents."""

    def __init__(self, store: Store, raw_dir: Path, max_documents: int, max_bytes: int,
                 run_info: Callable[[], dict] = dict) -> None:
        self.store = store
        self.raw_dir, self.max_documents, self.max_bytes = raw_dir, max_documents, max_bytes
        self.run_info = run_info  # the in-progress run's statistics, written into every manifest
        self._lock = threading.RLock()
        self.stopped = threading.Event()
        self._buffer: list[dict] = []
        self._buffer_bytes = 0
        self._pending: dict[str, UnitState] = {}
        self._seen: set[str] = set()  # unit URIs finished in this run
        try:
            self._open()
        except (OSError, ValueError, KeyError) as exc:  # pyarrow's errors are ValueError/OSError
            raise DataError(f"the raw corpus in {store.uri(raw_dir)} is unreadable ({type(exc).__name__}: {exc})",
                            f"delete {store.uri(raw_dir)} to collect from scratch") from None

    def _open(self) -> None:
        manifest = load_manifest(self.store, self.raw_dir)
        self.shards: list[dict] = list(manifest.get("shards", []))
        self.unit_files: list[str] = list(manifest.get("units", []))
        self._remove_leftovers()
        self.units = read_units(self.store, (self.raw_dir / name for name in self.unit_files))
        if manifest and manifest.get("format") != FORMAT:
            self._adopt_legacy()
        self.live = LiveSet(self.units.values())
        self.location: dict[str, str] = {}  # id -> shard holding it ("" while buffered)
        for shard in self.shards:
            ids = self.store.read_table(self.raw_dir / shard["path"], columns=["id"]).column("id").to_pylist()
            self.location.update(dict.fromkeys(ids, shard["path"]))
        self._seq = 1 + max([_seq_of(n) for n in [s["path"] for s in self.shards] + self.unit_files] or [-1])

    # ---------------------------------------------------------------- adding

    def known(self, uri: str) -> UnitState | None:
        return self.units.get(uri)

    def stop(self) -> None:
        """Make every source thread stop at its next unit (the run was interrupted)."""
        self.stopped.set()

    def add_unit(self, label: str, unit: Unit) -> dict[str, int]:
        """Store ``unit``'s documents (parsing them in the caller's thread) and record its state."""
        if self.stopped.is_set():
            raise Interrupted("the collect run was interrupted")
        prior = self.units.get(unit.uri)
        if unit.docs is None:
            return self._keep(unit)
        ids: dict[str, int] = {}
        added_bytes = 0
        for doc in unit.docs:
            if self.stopped.is_set():
                raise Interrupted("the collect run was interrupted")
            size = len(doc["text"].encode("utf-8"))
            ids.setdefault(doc["id"], size)
            with self._lock:
                if doc["id"] not in self.location:
                    self.location[doc["id"]] = ""
                    self._buffer.append(doc)
                    self._buffer_bytes += size
                    added_bytes += size
                    if len(self._buffer) >= self.max_documents or self._buffer_bytes >= self.max_bytes:
                        self.commit()
        with self._lock:
            current = self.units.get(unit.uri)  # re-read: another source may have shared this URI meanwhile
            repeated = unit.uri in self._seen
            if repeated and current is not None:  # the same URI twice in one run: keep the union
                for doc_id, size in zip(current.doc_ids, current.doc_bytes):
                    ids.setdefault(doc_id, size)
            changed = prior is not None and not repeated and set(prior.doc_ids) != set(ids)
            state = UnitState(unit.uri, label, unit.fingerprint, tuple(ids), tuple(ids.values()), tuple(unit.links),
                              unit.canonical)
            new = self.live.replace(current.doc_ids if current else (), state.doc_ids, state.doc_bytes)
            self._record(state)
        return {"units": 1, "documents": len(ids), "new": new, "bytes": added_bytes, "changed": int(changed)}

    def _keep(self, unit: Unit) -> dict[str, int]:
        with self._lock:
            prior = self.units.get(unit.uri)
            if prior is None:
                return {"units": 1, "unchanged": 1}
            links = tuple(unit.links) or prior.links
            if prior.fingerprint != unit.fingerprint or prior.links != links:
                self._record(UnitState(unit.uri, prior.source, _merge(prior.fingerprint, unit.fingerprint),
                                       prior.doc_ids, prior.doc_bytes, links, prior.canonical))
            self._seen.add(unit.uri)
        return {"units": 1, "unchanged": 1, "documents": len(prior.doc_ids)}

    def _record(self, state: UnitState) -> None:
        self.units[state.uri] = state
        self._pending[state.uri] = state
        self._seen.add(state.uri)

    # ---------------------------------------------------------------- committing

    def commit(self, final: bool = False) -> dict | None:
        """Write buffered documents and unit states, then the manifest that makes them count.

        The final commit of a run also rewrites shards holding documents no unit refers to any
        more (replaced by a changed unit) and merges small shards, so every committed shard holds
        live documents only and a reader may read shard files directly.
        """
        with self._lock:
            if not (self._buffer or self._pending or final):
                return None
            if self._buffer:
                self._write_shard(self._buffer, self._buffer_bytes)
            if self._pending:
                name = f"units-{self._seq:05d}.parquet"
                write_units(self.store, self.raw_dir / name, self._pending.values())
                self.unit_files.append(name)
                self._seq += 1
            self._buffer, self._buffer_bytes, self._pending = [], 0, {}
            obsolete = [*self._compact_units(), *self._compact_shards()] if final else []
            manifest = self.manifest(complete=final)
            self.store.atomic_write_json(self.raw_dir / MANIFEST, manifest)
            for name in obsolete:
                with contextlib.suppress(FileNotFoundError):
                    self.store.remove(self.raw_dir / name)
            return manifest

    def _write_shard(self, rows: list[dict], size: int) -> None:
        name = f"docs-{self._seq:05d}.parquet"
        self._seq += 1
        write_documents(self.raw_dir / name, rows, self.store)
        self.shards.append({"path": name, "documents": len(rows), "bytes": size})
        for row in rows:
            self.location[row["id"]] = name

    def _compact_shards(self) -> list[str]:
        dead = [doc_id for doc_id in self.location if doc_id not in self.live]
        victims = {self.location[doc_id] for doc_id in dead}
        small = [s["path"] for s in self.shards
                 if s["documents"] < self.max_documents // 4 and s["bytes"] < self.max_bytes // 4]
        if len(small) >= 4:  # many incremental runs leave many small shards; merge them now and then
            victims.update(small)
        if not victims:
            return []
        for doc_id in dead:
            del self.location[doc_id]
        old, self.shards = [s for s in self.shards if s["path"] in victims], [s for s in self.shards if s["path"] not in victims]
        rows: list[dict] = []
        size = 0
        for shard in old:
            for row in read_documents(self.raw_dir / shard["path"], self.store):
                if self.location.get(row["id"]) == shard["path"]:
                    rows.append(row)
                    size += len(row["text"].encode("utf-8"))
                    if len(rows) >= self.max_documents or size >= self.max_bytes:
                        self._write_shard(rows, size)
                        rows, size = [], 0
        if rows:
            self._write_shard(rows, size)
        return [s["path"] for s in old]

    def _compact_units(self) -> list[str]:
        if len(self.unit_files) <= _COMPACT_UNIT_FILES:
            return []
        name = f"units-{self._seq:05d}.parquet"
        write_units(self.store, self.raw_dir / name, self.units.values())
        self._seq += 1
        obsolete, self.unit_files = self.unit_files, [name]
        return obsolete

    def manifest(self, complete: bool) -> dict[str, Any]:
        return {
            "format": FORMAT, "complete": complete, "updated_at": now_iso(),
            "shards": self.shards, "units": self.unit_files,
            "documents": len(self.live), "documents_total": len(self.live), "bytes": self.live.total_bytes(),
            "digest": self.live.digest(), "sources_total": self.totals_by_source(), **self.run_info(),
        }

    def totals_by_source(self) -> dict[str, dict[str, int]]:
        """Live documents, bytes and units per source label over the whole corpus."""
        docs: dict[str, set[str]] = {}
        units: Counter[str] = Counter()
        for state in self.units.values():
            units[state.source] += 1
            docs.setdefault(state.source, set()).update(state.doc_ids)
        return {label: {"units": units[label], "documents": len(ids),
                        "bytes": sum(self.live.sizes.get(i, 0) for i in ids)} for label, ids in sorted(docs.items())}

    def new_documents(self) -> int:
        return len(self.live.born)

    # ---------------------------------------------------------------- opening

    def _remove_leftovers(self) -> None:
        named = {s["path"] for s in self.shards} | set(self.unit_files)
        for key in self.store.list_files(self.raw_dir):
            name = key.rsplit("/", 1)[-1]
            if name.startswith(("docs-", "units-")) and name.endswith(".parquet") and name not in named:
                self.store.remove(key)
        if self.store.location.is_local:
            # A killed run's local temporaries; on an object store they are invisible keys, which
            # the store never lists or reads.
            for path in self.raw_dir.glob(".*.tmp"):
                path.unlink()

    def _adopt_legacy(self) -> None:
        """A manifest from before unit states: every document of its shards stays live."""
        for shard in self.shards:
            table = self.store.read_table(self.raw_dir / shard["path"], columns=["id", "text"])
            ids = table.column("id").to_pylist()
            sizes = [len(t.encode("utf-8")) for t in table.column("text").to_pylist()]
            uri = f"legacy:{shard['path']}"
            self.units[uri] = self._pending[uri] = UnitState(uri, "legacy", Fingerprint(), tuple(ids), tuple(sizes), ())


def _seq_of(name: str) -> int:
    return int(name.split("-", 1)[1].split(".", 1)[0])


def _merge(old: Fingerprint, new: Fingerprint) -> Fingerprint:
    """The newer fingerprint, keeping the content hash when the new one was judged without reading."""
    return Fingerprint(new.hash or old.hash, new.etag or old.etag, new.last_modified or old.last_modified,
                       new.size if new.size is not None else old.size,
                       new.mtime_ns if new.mtime_ns is not None else old.mtime_ns)
