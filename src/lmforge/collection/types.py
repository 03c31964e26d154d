"""The shapes every source shares: documents, units of incremental work, tallies, the Source protocol.

A *document* is one row of the raw corpus (``DOCUMENT_SCHEMA``); its ``id`` is the SHA-256 of its
text, so the same text from two places is stored once. A *unit* is what a source fetches or reads
as one piece (a file, a page, an S3 object, a chunk of dataset rows) and what incremental state is
kept for: its URI, a fingerprint (content hash, ETag, Last-Modified, size and mtime), the documents
it yielded and, for pages, its links. A source that sees a unit unchanged since the last run yields
it with ``docs=None`` and the store keeps that unit's previous documents.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from lmforge.collection.urls import redact_url
from lmforge.data.documents import text_id

MAX_EXAMPLES = 20  # skipped items listed by name per source; the rest are only counted


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def make_document(text: str, *, source: str, uri: str, title: str, content_type: str,
                  meta: dict[str, Any] | None = None) -> dict:
    """One raw document row; ``meta`` is stored as sorted JSON so equal inputs give equal rows."""
    return {"id": text_id(text), "text": text, "source": source, "uri": redact_url(uri), "title": title or "",
            "fetched_at": now_iso(), "content_type": content_type,
            "meta": json.dumps(meta or {}, sort_keys=True, ensure_ascii=False, default=str)}


@dataclass(frozen=True)
class Fingerprint:
    """What tells whether a unit changed: a content hash, and the cheaper hints we can check first."""

    hash: str = ""
    etag: str | None = None
    last_modified: str | None = None
    size: int | None = None
    mtime_ns: int | None = None


@dataclass
class Unit:
    uri: str
    fingerprint: Fingerprint
    docs: Iterable[dict] | None  # None: unchanged since the last run, keep its documents
    links: list[str] = field(default_factory=list)
    canonical: str = ""  # the URI its documents are filed under, when not ``uri`` (web pages)


@dataclass(frozen=True)
class UnitState:
    """What the last committed run recorded for one unit."""

    uri: str
    source: str
    fingerprint: Fingerprint
    doc_ids: tuple[str, ...]
    doc_bytes: tuple[int, ...]
    links: tuple[str, ...]
    canonical: str = ""


class Tally:
    """Per-source counts of skipped items (by reason, with a few examples) and of repaired text.

    Safe to use from a crawler's threads; picklable so a pool worker can return one to be merged.
    """

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()
        self.examples: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped item; ``where`` and ``detail`` are kept with credentials in URLs redacted."""
        with self._lock:
            self.skipped[reason] += 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append({"reason": reason, "where": redact_url(where),
                                      "detail": redact_url(detail[:4000])[:300]})

    def repair(self, kind: str) -> None:
        with self._lock:
            self.repaired[kind] += 1

    def snapshot(self) -> tuple[dict[str, int], dict[str, int], list[dict[str, str]]]:
        """(skipped, repaired, examples) copied under the lock: safe while other threads count."""
        with self._lock:
            return dict(sorted(self.skipped.items())), dict(sorted(self.repaired.items())), list(self.examples)

    def merge(self, other: Tally) -> None:
        with self._lock:
            self.skipped.update(other.skipped)
            self.repaired.update(other.repaired)
            room = MAX_EXAMPLES - len(self.examples)
            self.examples.extend(other.examples[:max(room, 0)])

    def __getstate__(self) -> dict:
        return {"skipped": self.skipped, "repaired": self.repaired, "examples": self.examples}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


@dataclass
class SourceContext:
    """What the stage hands a source: its label, prior state, tally, scratch space and settings.

    ``expect(n)`` tells the progress display how many units the source will yield, once known.
    """

    label: str
    known: Callable[[str], UnitState | None]
    tally: Tally
    scratch_dir: Path
    parallel: Any  # lmforge.config.data.ParallelConfig
    expect: Callable[[int], None] = lambda total: None


class Source(Protocol):
    """A place documents come from, yielding units; chosen by its config's ``type``."""

    def units(self, ctx: SourceContext) -> Iterator[Unit]: ...

