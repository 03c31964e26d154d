"""Curate stage: clean, deduplicate and filter the raw documents, then split off a held-out set.

Run it with ``lmforge curate CONFIG`` (or ``python -m lmforge.curate [CONFIG]``) after collect.
Curation is a list of small steps (:data:`STEPS`), each a function from documents to documents that
reports what it removed; the report of every step lands in ``report.json``. Cleaning changes text,
so ids are recomputed (id = sha256 of the curated text) and the raw id is kept in ``meta.raw_id``
for lineage. The split is by hash of the id, so the same input always gives the same split and the
same ``dataset_digest``.

Outputs: ws.curated_dir/train.parquet, validation.parquet (document columns) and report.json.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass
from typing import Callable

from lmforge.collect import hash_split, read_documents, text_id, write_documents
from lmforge.config.stages import CurationConfig
from lmforge.errors import DataError
from lmforge.workspace import Workspace, atomic_dir, atomic_write_json

# Control characters other than newline and tab are noise from PDFs, terminals and bad encodings.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]+")
_BLANK_LINES = re.compile(r"\n{3,}")

# step(docs, cfg) -> (docs kept, {reason: count removed})
Step = Callable[[list[dict], CurationConfig], tuple[list[dict], dict[str, int]]]


def normalize_unicode(docs: list[dict], cfg: CurationConfig) -> tuple[list[dict], dict[str, int]]:
    if cfg.normalize == "none":
        return docs, {}
    return [{**d, "text": unicodedata.normalize(cfg.normalize, d["text"])} for d in docs], {}


def clean_whitespace(docs: list[dict], cfg: CurationConfig) -> tuple[list[dict], dict[str, int]]:
    """Drop control characters, unify newlines, squeeze spaces inside lines (indentation stays)."""
    kept = []
    for doc in docs:
        text = _CONTROL.sub("", doc["text"].replace("\r\n", "\n").replace("\r", "\n"))
        lines = [_INNER_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
        text = _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")
        if text.strip():
            kept.append({**doc, "text": text})
    return kept, {"empty": len(docs) - len(kept)}


def exact_dedup(docs: list[dict], cfg: CurationConfig) -> tuple[list[dict], dict[str, int]]:
    """Keep the first document of each curated text (ids are recomputed here from that text)."""
    kept, seen = [], set()
    for doc in docs:
        new_id = text_id(doc["text"])
        if cfg.exact_dedup and new_id in seen:
            continue
        seen.add(new_id)
        meta = json.loads(doc["meta"] or "{}")
        meta.setdefault("raw_id", doc["id"])
        kept.append({**doc, "id": new_id, "meta": json.dumps(meta, sort_keys=True)})
    return kept, {"exact_duplicate": len(docs) - len(kept)}


def length_filter(docs: list[dict], cfg: CurationConfig) -> tuple[list[dict], dict[str, int]]:
    kept = [d for d in docs if cfg.min_chars <= len(d["text"]) <= cfg.max_chars]
    too_short = sum(1 for d in docs if len(d["text"]) < cfg.min_chars)
    return kept, {"too_short": too_short, "too_long": len(docs) - len(kept) - too_short}


STEPS: list[tuple[str, Step]] = [
    ("normalize_unicode", normalize_unicode),
    ("clean_whitespace", clean_whitespace),
    ("exact_dedup", exact_dedup),
    ("length_filter", length_filter),
]

# What to change when a reason removed everything.
_FIXES = {
    "empty": "the sources hold only whitespace or control characters; add sources with real text",
    "exact_duplicate": "the sources repeat the same text; add sources with different documents",
    "too_short": "lower curation.min_chars (now {min_chars}) or add longer documents",
    "too_long": "raise curation.max_chars (now {max_chars}) or split the documents into smaller files",
}


@dataclass(frozen=True)
class CurateResult:
    documents_in: int
    documents_out: int
    removed: dict[str, int]
    dataset_digest: str
    train_documents: int = 0
    validation_documents: int = 0
    steps: tuple[dict, ...] = ()

    def as_dict(self) -> dict:
        data = asdict(self)
        data["steps"] = list(self.steps)
        return data


def curate(cfg: CurationConfig, ws: Workspace) -> CurateResult:
    """Run every step over the raw shards and write the train/validation split with its report."""
    shards = sorted(ws.raw_dir.glob("docs-*.parquet"))
    if not shards:
        raise DataError(f"no raw documents in {ws.raw_dir}", "run `lmforge collect CONFIG` first")
    docs: list[dict] = []
    for shard in shards:
        docs.extend(read_documents(shard))
    documents_in = len(docs)

    removed: dict[str, int] = {}
    reports: list[dict] = []
    for name, step in STEPS:
        before = len(docs)
        docs, counts = step(docs, cfg)
        for reason, count in counts.items():
            removed[reason] = removed.get(reason, 0) + count
        reports.append({"step": name, "documents_in": before, "documents_out": len(docs), "removed": counts})
    if not docs:
        raise _empty_error(documents_in, removed, cfg)

    train, validation = hash_split(docs, cfg.heldout_fraction)
    digest = dataset_digest(train, validation)
    report = {
        "documents_in": documents_in, "documents_out": len(docs), "removed": removed,
        "dataset_digest": digest, "train_documents": len(train), "validation_documents": len(validation),
        "steps": reports, "config": cfg.model_dump(mode="json"), "raw_shards": [s.name for s in shards],
    }
    with atomic_dir(ws.curated_dir) as out:
        write_documents(out / "train.parquet", train)
        write_documents(out / "validation.parquet", validation)
        atomic_write_json(out / "report.json", report)
    return CurateResult(documents_in, len(docs), removed, digest, len(train), len(validation), tuple(reports))


def dataset_digest(train: list[dict], validation: list[dict]) -> str:
    """sha256 over the split's ids; ids hash the text, so this pins the exact curated content."""
    lines = [f"train {d['id']}" for d in sorted(train, key=lambda d: d["id"])]
    lines += [f"validation {d['id']}" for d in sorted(validation, key=lambda d: d["id"])]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _empty_error(documents_in: int, removed: dict[str, int], cfg: CurationConfig) -> DataError:
    reason = max(sorted(removed), key=lambda r: removed[r])
    counts = ", ".join(f"{r}: {n}" for r, n in sorted(removed.items()) if n)
    fix = _FIXES[reason].format(min_chars=cfg.min_chars, max_chars=cfg.max_chars)
    return DataError(f"curation removed all {documents_in} documents; the `{reason}` filter removed "
                     f"the most ({counts})", fix)


def main(argv: list[str] | None = None) -> int:
    from lmforge.config.loader import load_config

    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else None)
    print(json.dumps(curate(cfg.curation, Workspace.from_env().ensure()).as_dict(), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
