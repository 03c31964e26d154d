"""Counts by reason and a sample of removed documents, merged across shards into report.json.

Every step reports one by one: how many documents reached it, what it removed and why, and what
it changed (PII replaced, boilerplate lines dropped). Samples are the first removed documents of
each reason in corpus order, so the same input always keeps the same samples.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

_SAMPLE_CHARS = 300


@dataclass
class Tally:
    samples_per_reason: int = 3
    removed: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    step_in: Counter = field(default_factory=Counter)
    step_removed: dict[str, Counter] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)

    def reached(self, step: str, count: int = 1) -> None:
        self.step_in[step] += count

    def remove(self, step: str, reason: str, doc: dict) -> None:
        self.removed[reason] += 1
        self.step_removed.setdefault(step, Counter())[reason] += 1
        kept = self.samples.setdefault(reason, [])
        if len(kept) < self.samples_per_reason:
            text = doc.get("text") or ""
            kept.append({"id": doc.get("id"), "source": doc.get("source"), "uri": doc.get("uri"),
                         "text": text[:_SAMPLE_CHARS] + ("…" if len(text) > _SAMPLE_CHARS else "")})

    def merge(self, other: Tally) -> None:
        self.removed.update(other.removed)
        self.changed.update(other.changed)
        self.step_in.update(other.step_in)
        for step, counts in other.step_removed.items():
            self.step_removed.setdefault(step, Counter()).update(counts)
        for reason, rows in other.samples.items():
            kept = self.samples.setdefault(reason, [])
            kept.extend(rows[: self.samples_per_reason - len(kept)])

    def steps(self, order: list[str]) -> list[dict]:
        """One row per step in pipeline order: documents in, documents out, removed by reason."""
        rows = []
        for name in order:
            removed = dict(sorted(self.step_removed.get(name, Counter()).items()))
            rows.append({"step": name, "documents_in": self.step_in[name],
                         "documents_out": self.step_in[name] - sum(removed.values()), "removed": removed})
        return rows
