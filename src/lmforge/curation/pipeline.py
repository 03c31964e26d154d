"""The curation passes over raw shards, with bounded memory: one shard in memory at a time.

  A  clean      per shard: cleaning steps; counts lines per source for boilerplate (only when the
                boilerplate step is on — otherwise these steps run at the start of B)
  B  filter     per shard: boilerplate, then the per-document filters and transforms; computes each
                survivor's exact-dedup key and MinHash signature
  C  dedup      whole corpus, arrays only: exact + near duplicates, against earlier versions too
  D  write      survivors through the classic steps, final ids, deterministic split by id hash

A and B are independent per shard, so above ``curation.ray_min_documents`` they run as Ray tasks;
their outputs are files in a work directory, and what returns to the driver is counts.
Called by :func:`lmforge.stages.curate.curate`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.config.curation import CurationConfig
from lmforge.core.errors import DataError
from lmforge.core.ray_cluster import connect_ray, on_this_node
from lmforge.curation.base import Context, build_steps, steps_of_phase
from lmforge.curation.clean import count_lines
from lmforge.curation.dedup import EXACT, KEEP, NEAR, NEAR_PREVIOUS, REASONS, MinHasher
from lmforge.curation.report import Tally
from lmforge.curation.text import text_key, tokens, word_hashes
from lmforge.data.documents import DOCUMENT_COLUMNS, DOCUMENT_SCHEMA, read_documents, text_id

WORK_SCHEMA = DOCUMENT_SCHEMA.append(pa.field("key", pa.uint64()))
_STEP_OF = {EXACT: "exact_dedup", NEAR: "near_dedup", NEAR_PREVIOUS: "near_dedup"}


@dataclass(frozen=True)
class Unit:
    """One raw shard and its position in corpus order."""

    index: int
    path: str

    def file(self, work: Path, stage: str) -> Path:
        return work / f"{stage}-{self.index:05d}.parquet"


def run_steps(doc: dict, steps: list, tally: Tally) -> bool:
    """Pass ``doc`` through ``steps``; False (and counted) when one removes it."""
    for step in steps:
        tally.reached(step.name)
        reason = step(doc)
        if reason:
            tally.remove(step.name, reason, doc)
            return False
    return True


def _collect_counts(steps: list, tally: Tally) -> None:
    for step in steps:
        for key, value in step.counts.items():
            tally.changed[f"{step.name}.{key}"] += value


def _read(path: Path, raw: bool) -> list[dict]:
    if raw:
        columns = pq.ParquetFile(path).schema_arrow.names
        if "text" not in columns:
            raise DataError(f"raw shard {path} has no `text` column (columns: {', '.join(columns)})",
                            "write raw shards with `lmforge collect CONFIG` (or with the document columns "
                            "of lmforge.data.documents.DOCUMENT_SCHEMA)")
    docs = read_documents(path) if raw else pq.read_table(path).to_pylist()
    for doc in docs:
        doc["text"] = doc["text"] if isinstance(doc["text"], str) else ""  # a null text is an empty one
        meta = doc["meta"] if isinstance(doc["meta"], dict) else json.loads(doc["meta"] or "{}")
        if raw:
            meta.setdefault("raw_id", doc["id"])
        doc["meta"] = meta
    return docs


def _write(path: Path, docs: list[dict], schema: pa.Schema) -> None:
    rows = [{**doc, "meta": json.dumps(doc["meta"], sort_keys=True, ensure_ascii=False)} for doc in docs]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


# ---------------------------------------------------------------- A: clean


def clean_unit(unit: Unit, cfg: CurationConfig, work: Path) -> dict[str, Any]:
    tally = Tally(cfg.samples_per_reason)
    steps = build_steps(steps_of_phase(cfg, (0,)), cfg, Context())
    lines: dict[str, Counter] = {}
    kept = []
    docs = _read(Path(unit.path), raw=True)
    for doc in docs:
        if run_steps(doc, steps, tally):
            count_lines(doc, lines, cfg.boilerplate)
            kept.append(doc)
    _write(unit.file(work, "a"), kept, DOCUMENT_SCHEMA)
    _collect_counts(steps, tally)
    return {"documents_in": len(docs), "tally": tally, "lines": lines}


# ---------------------------------------------------------------- B: filter


def filter_unit(unit: Unit, cfg: CurationConfig, work: Path, ctx: Context, cleaned: bool) -> dict[str, Any]:
    """Per-document steps of one shard; writes survivors (with dedup keys) and their signatures."""
    tally = Tally(cfg.samples_per_reason)
    phases = (1, 2) if cleaned else (0, 1, 2)
    steps = build_steps(steps_of_phase(cfg, phases), cfg, ctx)
    hasher = MinHasher(cfg.near_dedup) if "near_dedup" in cfg.steps else None
    docs = _read(unit.file(work, "a") if cleaned else Path(unit.path), raw=not cleaned)
    kept, signatures = [], []
    for doc in docs:
        if not run_steps(doc, steps, tally):
            continue
        doc["key"] = text_key(doc["text"])
        if hasher is not None:
            signatures.append(hasher.signature(word_hashes(tokens(doc["text"]))))
        kept.append(doc)
    _write(unit.file(work, "b"), kept, WORK_SCHEMA)
    if hasher is not None:
        shape = (len(kept), cfg.near_dedup.num_perm)
        np.save(work / f"sig-{unit.index:05d}.npy", np.stack(signatures) if kept else np.zeros(shape, np.uint32))
    _collect_counts(steps, tally)
    return {"documents_in": len(docs), "documents_out": len(kept), "tally": tally}


def run_map(fn: Callable[..., dict], units: list[Unit], args: tuple, use_ray: bool) -> list[dict]:
    """``fn(unit, *args)`` for every unit, in order; as Ray tasks when ``use_ray``.

    The units read and write this machine's work directory, so on a cluster the tasks run on this
    machine's node only (:func:`lmforge.core.ray_cluster.on_this_node`), never on one that cannot see it."""
    if not use_ray:
        return [fn(unit, *args) for unit in units]
    import ray

    connect_ray(log_to_driver=False)
    remote = ray.remote(num_cpus=1, **on_this_node())(fn)
    shared = [ray.put(arg) for arg in args]
    return ray.get([remote.remote(unit, *shared) for unit in units])


# ---------------------------------------------------------------- C: signatures on disk


def stack_signatures(work: Path, units: list[Unit], previous: np.ndarray, num_perm: int) -> np.ndarray:
    """One memory-mapped (previous + current, num_perm) matrix, filled shard by shard."""
    parts = [np.load(work / f"sig-{u.index:05d}.npy", mmap_mode="r") for u in units]
    total = len(previous) + sum(len(p) for p in parts)
    out = np.lib.format.open_memmap(work / "signatures.npy", mode="w+", dtype=np.uint32, shape=(total, num_perm))
    row = 0
    for part in [previous, *parts]:
        out[row: row + len(part)] = part
        row += len(part)
    out.flush()
    return out


def read_keys(work: Path, units: list[Unit]) -> np.ndarray:
    keys = [pq.read_table(u.file(work, "b"), columns=["key"]).column("key").to_numpy() for u in units]
    return np.concatenate(keys).astype(np.uint64) if keys else np.empty(0, dtype=np.uint64)


# ---------------------------------------------------------------- D: write


def finish_units(units: list[Unit], cfg: CurationConfig, work: Path, codes: np.ndarray,
                 tally: Tally) -> list[str]:
    """Drop duplicates, run the classic steps, give final ids; returns the kept ids in order."""
    steps = build_steps(steps_of_phase(cfg, (4,)), cfg, Context())
    dedup_steps = [s for s in ("exact_dedup", "near_dedup") if s in cfg.steps]
    ids: list[str] = []
    seen: set[str] = set()
    offset = 0
    for unit in units:
        docs = _read(unit.file(work, "b"), raw=False)
        kept = []
        for doc, code in zip(docs, codes[offset: offset + len(docs)].tolist()):
            if not _passes_dedup(doc, code, dedup_steps, tally):
                continue
            if not run_steps(doc, steps, tally):
                continue
            doc["id"] = text_id(doc["text"])
            if doc["id"] in seen:  # the classic steps can make two documents identical
                tally.remove(steps[-1].name if steps else "exact_dedup", "exact_duplicate", doc)
                continue
            seen.add(doc["id"])
            ids.append(doc["id"])
            kept.append(doc)
        offset += len(docs)
        _write(unit.file(work, "c"), kept, DOCUMENT_SCHEMA)
    _collect_counts(steps, tally)
    return ids


def _passes_dedup(doc: dict, code: int, dedup_steps: Sequence[str], tally: Tally) -> bool:
    for name in dedup_steps:
        tally.reached(name)
        if code != KEEP and _STEP_OF[code] == name:
            tally.remove(name, REASONS[code], doc)
            return False
    return True


def write_splits(units: list[Unit], work: Path, out: Path, heldout: set[str]) -> tuple[int, int]:
    """Stream the final documents into train.parquet and validation.parquet."""
    writers = {name: pq.ParquetWriter(out / f"{name}.parquet", DOCUMENT_SCHEMA) for name in ("train", "validation")}
    counts = {"train": 0, "validation": 0}
    try:
        for unit in units:
            table = pq.read_table(unit.file(work, "c"), schema=DOCUMENT_SCHEMA)
            mask = np.array([i in heldout for i in table.column("id").to_pylist()], dtype=bool)
            for name, rows in (("train", table.filter(pa.array(~mask))), ("validation", table.filter(pa.array(mask)))):
                if rows.num_rows:
                    writers[name].write_table(rows.select(list(DOCUMENT_COLUMNS)))
                    counts[name] += rows.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    return counts["train"], counts["validation"]
