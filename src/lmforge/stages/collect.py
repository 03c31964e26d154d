"""Collect stage: gather raw documents from every configured source into the workspace, incrementally.

Run it with ``lmforge collect CONFIG [--json]`` (or ``python -m lmforge.stages.collect [CONFIG]``). Each
entry of ``data.sources`` (``stdlib``, ``local``, ``web``, ``feed``, ``s3``, ``hf``; see
:mod:`lmforge.config.data`) is one :class:`~lmforge.collection.types.Source`; sources run
concurrently and one that fails is reported while the others finish. A re-run reads only new or
changed units (by URI with content hash, ETag or Last-Modified) and never stores a text twice; a
run killed at any moment resumes from its last commit (:mod:`lmforge.collection.shards`).

Outputs (the contract with later stages):
  ws.raw_dir/docs-NNNNN.parquet  id, text, source, uri, title, fetched_at, content_type, meta (JSON)
  ws.raw_dir/units-NNNNN.parquet incremental state per unit (URI, fingerprint, document ids, links)
  ws.raw_dir/manifest.json       shards, counts, bytes, digest, per-source statistics, errors
  ws.sft_dir/{train,test}.jsonl  SFT records of data.instructions.sources (canonical chats, see
                                 lmforge.data.chat_formats; the built-in stdlib pairs stay
                                 {"id", "instruction", "response"}), split by the hash of each id
  ws.sft_dir/report.json         per source and file: records read and skipped, why and where
  ws.preferences_dir/...         the same three files for data.preferences.sources, when it has any
Read the documents with :func:`read_raw_documents` (only the live ones of committed shards).
Every output goes through the workspace's store (``open_store(ws)``, lmforge.core.storage), so with
``LMFORGE_HOME=s3://bucket/prefix`` they are objects in the bucket; only scratch (downloads, the
collect lock) stays on this machine.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.collection import make_source
from lmforge.collection.instructions import read_record_sources
from lmforge.collection.runner import SourceReport, new_reports, run_sources
from lmforge.collection.shards import FORMAT, RawStore, exclusive, iter_live_documents, load_manifest
from lmforge.collection.types import Source, now_iso
from lmforge.collection.urls import redact_urls
from lmforge.config.data import DataConfig, source_labels
from lmforge.config.loader import load_config
from lmforge.core.errors import DataError
from lmforge.core.storage import Store, open_store
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.data.splits import hash_split

__all__ = ["CollectResult", "collect", "raw_shard_paths", "read_raw_documents"]

Progress = Callable[[str, int, int], None]


def raw_shard_paths(ws: Workspace, store: Store | None = None) -> list[Path]:
    """The committed raw shards, in order, named under ``ws.raw_dir`` (read them through the
    workspace's store). After a finished collect every row of them is live.

    Raises when the last collect was interrupted: its committed shards may hold documents of units
    it did not finish; running collect again completes them.
    """
    store = store or open_store(ws)
    manifest = load_manifest(store, ws.raw_dir)
    if manifest.get("format") == FORMAT and not manifest.get("complete", False):
        raise DataError(f"the last collect into {store.uri(ws.raw_dir)} did not finish",
                        "run `lmforge collect CONFIG` again; it resumes where the interrupted run stopped")
    return [ws.raw_dir / shard["path"] for shard in manifest.get("shards", [])]


def iter_raw_documents(ws: Workspace) -> Iterator[dict]:
    """The collected corpus, document by document: live rows of the shards the manifest commits."""
    return iter_live_documents(open_store(ws), ws.raw_dir)


def read_raw_documents(ws: Workspace) -> list[dict]:
    return list(iter_raw_documents(ws))


@dataclass(frozen=True)
class CollectResult:
    documents_total: int
    documents_new: int
    bytes: int
    per_source: dict[str, dict]
    errors: list[dict[str, str]]
    digest: str
    sft_train: int = 0
    sft_test: int = 0
    instructions: dict = field(default_factory=dict)  # train, test and the report per source (see read_record_sets)
    preferences: dict = field(default_factory=dict)  # the same for the preference set; empty without sources
    shards: int = 0
    raw_dir: str = ""
    manifest: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("manifest")
        return data


def collect(cfg: DataConfig, ws: Workspace, progress: Progress | None = None) -> CollectResult:
    """Collect every source into the raw corpus, commit it, and write the SFT set.

    ``progress(label, sources_done, sources_total)`` is called as each source finishes, in config
    order, with labels such as ``stdlib[0]`` (a source's ``name``, else type and position), the keys
    of ``per_source``. The instruction and preference records are read first, so a bad file stops the
    stage before the documents are fetched; their sets are written when they have sources.
    """
    sets = read_record_sets(cfg, ws)
    labels = source_labels(cfg.sources)
    sources: list[tuple[str, str, Source]] = [(label, s.type, make_source(s)) for label, s in zip(labels, cfg.sources)]
    started = now_iso()
    reports: dict[str, SourceReport] = new_reports(sources)
    finished: list[str] = []
    written: dict[str, dict] = {}

    def run_info() -> dict:
        return {"last_run": _last_run(started, reports, labels),
                "sources": redact_urls([s.model_dump(mode="json") for s in cfg.sources]),
                "python": sys.version.split()[0], "sft": written.get("instructions", {}),
                "preferences": written.get("preferences", {})}

    def on_done(label: str) -> None:
        finished.append(label)
        if progress is not None:
            progress(label, len(finished), len(labels))

    ws_store = open_store(ws)
    # Locally the lock sits beside the corpus as before; for a remote workspace on this machine's side.
    lock = ws.raw_dir / ".collect.lock" if not ws.is_remote else ws.home / "locks" / "collect.lock"
    with exclusive(lock, ws_store.uri(ws.raw_dir)):
        store = RawStore(ws_store, ws.raw_dir, cfg.shard_max_documents, cfg.shard_max_bytes, run_info)
        scratch = ws.collect_cache_dir
        try:
            run_sources(sources, store, reports, scratch, cfg.parallel, cfg.source_concurrency,
                        cfg.progress_interval_s, on_done)
        except KeyboardInterrupt:
            store.commit()  # keep every unit that finished; the next run resumes after them
            raise
        errors = [r.error for r in reports.values() if r.error]
        if not len(store.live):
            failures = "; ".join(f"{e['source']}: {e['error']}" for e in errors) or _empty_reason(reports)
            fixes = "; ".join(f"{e['source']}: {e['fix']}" for e in errors)
            raise DataError(f"no documents were collected ({failures})",
                            fixes or "add a source with text, e.g. `- type: stdlib` under data.sources")
        written.update(write_record_sets(sets, ws, ws_store))
        manifest = store.commit(final=True) or {}
    per_source = {label: reports[label].summary() for label in labels}
    sft = written.get("instructions", {})
    return CollectResult(len(store.live), store.new_documents(), store.live.total_bytes(), per_source, errors,
                         store.live.digest(), sft.get("train", 0), sft.get("test", 0), sft,
                         written.get("preferences", {}), len(store.shards), ws_store.uri(ws.raw_dir), manifest)


def _last_run(started: str, reports: dict[str, SourceReport], labels: list[str]) -> dict:
    return {"started_at": started, "per_source": {label: reports[label].summary() for label in labels if label in reports},
            "errors": [r.error for r in reports.values() if r.error]}


def _empty_reason(reports: dict[str, SourceReport]) -> str:
    skipped = [f"{r.label}: skipped {dict(r.tally.skipped)} e.g. {r.tally.examples[0]['where']} "
               f"({r.tally.examples[0]['detail']})" for r in reports.values() if r.tally.examples]
    return "; ".join(skipped) or "every source was empty"


RecordSets = dict[str, tuple[list[dict], dict[str, dict], float]]  # name -> (records, report per source, test fraction)


def read_record_sets(cfg: DataConfig, ws: Workspace) -> RecordSets:
    """The instruction and preference records of their sources (a set without sources is left out)."""
    sets: RecordSets = {}
    for name, kind, section in (("instructions", "sft", cfg.instructions), ("preferences", "preference", cfg.preferences)):
        if section.sources:
            records, reports = read_record_sources(list(section.sources), kind, ws.collect_cache_dir,
                                                   cfg.instructions.max_records)
            sets[name] = (records, reports, section.test_fraction)
    return sets


def write_record_sets(sets: RecordSets, ws: Workspace, store: Store | None = None) -> dict[str, dict]:
    """Write each set's train/test JSONL (hash split by id) and report.json, all three committed at
    once (one rename locally; a committed directory on an object store).

    Returns, per set, ``{"train", "test", "sources"}``: the counts written and the report per source.
    """
    store = store or open_store(ws)
    written = {}
    for name, (records, reports, fraction) in sets.items():
        train, test = hash_split(records, fraction)
        final = ws.sft_dir if name == "instructions" else ws.preferences_dir
        summary = {"train": len(train), "test": len(test), "sources": reports}
        with store.atomic_dir(final) as tmp:
            for file, part in (("train.jsonl", train), ("test.jsonl", test)):
                (tmp / file).write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in part),
                                        encoding="utf-8")
            atomic_write_json(tmp / "report.json", summary)
        written[name] = summary
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else None)
    result = collect(cfg.data, Workspace.from_env().ensure())
    print(json.dumps(result.as_dict(), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
