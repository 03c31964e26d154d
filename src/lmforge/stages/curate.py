"""Curate stage: raw documents in, a clean, deduplicated, PII-scrubbed, decontaminated corpus out.

Run it with ``lmforge curate CONFIG [--json]`` (or ``python -m lmforge.stages.curate [CONFIG]``) after
collect. The steps are listed in ``curation.steps`` (cleaning, boilerplate, length, language,
quality, PII, decontamination, exact and near dedup, and the optional classic NLP steps); each one
lives in :mod:`lmforge.curation` and is reported one by one. The passes over the shards are in
:mod:`lmforge.curation.pipeline`. Cleaning changes text, so ids are recomputed (id = sha256 of the
curated text) and the raw id is kept in ``meta.raw_id`` for lineage. The held-out split is by hash
of the id, so the same input always gives the same split and the same ``dataset_digest``.

The instruction/chat and preference sets collect wrote (``ws.sft_dir``, ``ws.preferences_dir``) are
curated here too (:mod:`lmforge.curation.record_sets`, steps in ``curation.instructions`` and
``curation.preferences``): PII, length, dedup of the rendered conversations, and decontamination of
their train records against the test splits and the held-out documents. Documents are
decontaminated against the curated test splits (chats, pairs and preference records alike).

Outputs: ws.curated_dir/train.parquet, validation.parquet (document columns) and report.json
(counts by reason, per-step rows, PII replaced, a sample of removed documents per reason);
ws.curated_sft_dir and ws.curated_preferences_dir (train.jsonl, test.jsonl, report.json), which
later stages read through :func:`lmforge.data.sft.sft_file`.

Inputs and outputs go through the workspace's store (lmforge.core.storage): raw shards are read as
local files (``store.cached_path``: the shard itself locally, a cached copy of an object), the
curated directory is committed with ``store.atomic_dir`` and the dedup versions are published
beside it; the record sets are curated on a local view (lmforge.core.storage.view) whose curated
sets are committed to the store; so with ``LMFORGE_HOME=s3://...`` every output is in the bucket.

Scratch space is ``ws.data_dir/.curate-work-*``, owned by the run through an flock on its
``owner.lock`` (the kernel releases it when the process dies, kill -9 included). A run first removes
the work directories no live process owns: a free lock, or (left by an older version) no lock file
and no change for an hour.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lmforge.config.curation import CurationConfig
from lmforge.config.loader import load_config
from lmforge.core.errors import DataError
from lmforge.core.storage import Store, open_store
from lmforge.core.storage.view import local_view
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.curation.base import Context
from lmforge.curation.clean import boilerplate_lines
from lmforge.curation.decontaminate import EvalIndex, eval_texts
from lmforge.curation.dedup import KEEP, VersionStore, find_duplicates
from lmforge.curation.pipeline import (
    Unit,
    clean_unit,
    filter_unit,
    finish_units,
    read_keys,
    run_map,
    stack_signatures,
    write_splits,
)
from lmforge.curation.record_sets import RecordSet, clean_set, decontaminate_set, load_sets, write_set
from lmforge.curation.records import eval_texts_of
from lmforge.curation.report import Tally
from lmforge.data.documents import read_texts
from lmforge.data.splits import heldout_ids
from lmforge.stages.collect import raw_shard_paths


@dataclass(frozen=True)
class CurateResult:
    documents_in: int
    documents_out: int
    removed: dict[str, int]
    dataset_digest: str
    train_documents: int = 0
    validation_documents: int = 0
    pii_replaced: dict[str, int] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    steps: tuple[dict, ...] = ()
    previous_versions: tuple[str, ...] = ()
    record_sets: dict[str, dict] = field(default_factory=dict)  # "instructions"/"preferences" -> record_sets summary

    def as_dict(self) -> dict:
        data = asdict(self)
        data["steps"] = list(self.steps)
        data["previous_versions"] = list(self.previous_versions)
        return data


def raw_shards(ws: Workspace, store: Store) -> list[Path]:
    """The raw shards to curate, named under ``ws.raw_dir`` (read them through ``store``)."""
    shards = raw_shard_paths(ws, store)
    if not shards and not store.exists(ws.raw_dir / "manifest.json"):
        # No manifest: shards written by hand (or by an older collect) count in name order.
        names = [key.rsplit("/", 1)[-1] for key in store.list_files(ws.raw_dir)]
        shards = [ws.raw_dir / name for name in sorted(fnmatch.filter(names, "docs-*.parquet"))]
    if not shards:
        raise DataError(f"no raw documents in {store.uri(ws.raw_dir)}", "run `lmforge collect CONFIG` first")
    return shards


def curate(cfg: CurationConfig, ws: Workspace) -> CurateResult:
    """Run every step over the raw shards and write the train/validation split with its report."""
    store = open_store(ws)
    shards = raw_shards(ws, store)
    # Each unit is a local file (the shard itself locally, a cached copy of an object).
    units = [Unit(i, str(store.cached_path(path))) for i, path in enumerate(shards)]
    total = sum(pq.ParquetFile(u.path).metadata.num_rows for u in units)
    use_ray = bool(cfg.ray_min_documents) and total >= cfg.ray_min_documents and len(units) > 1
    # The record sets' engine reads and writes JSONL by path: on an object store it works on a local view.
    with owned_work_dir(ws.data_dir) as work, local_view(ws, (ws.sft_dir, ws.preferences_dir),
                                                         (ws.curated_sft_dir, ws.curated_preferences_dir)) as sets_ws:
        return _curate(cfg, ws, sets_ws, store, units, [path.name for path in shards], work, use_ray)


WORK_PREFIX = ".curate-work-"
_NEW_PREFIX = ".curate-new-"  # a work directory before its lock is held: never judged by its lock
_OWNER = "owner.lock"
_UNOWNED_AGE_S = 3600.0


@contextlib.contextmanager
def owned_work_dir(data_dir: Path) -> Iterator[Path]:
    """A scratch directory under ``data_dir`` held by this process, removed afterwards; the work
    directories of killed runs are removed first (:func:`remove_stale_work_dirs`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(data_dir)
    fresh = Path(tempfile.mkdtemp(dir=data_dir, prefix=_NEW_PREFIX))
    work = data_dir / (WORK_PREFIX + fresh.name[len(_NEW_PREFIX):])
    try:
        with open(fresh / _OWNER, "w") as owner:
            fcntl.flock(owner, fcntl.LOCK_EX)
            # Renamed only once locked: a directory under WORK_PREFIX with a free lock is always a dead run's.
            os.rename(fresh, work)
            yield work
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def remove_stale_work_dirs(data_dir: Path) -> list[Path]:
    """Remove the work directories no live process owns; returns them."""
    removed = []
    for path in [*data_dir.glob(WORK_PREFIX + "*"), *data_dir.glob(_NEW_PREFIX + "*")]:
        lock = path / _OWNER
        if path.name.startswith(WORK_PREFIX) and lock.exists():
            try:
                with open(lock, "a") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:  # BlockingIOError: a running curate holds it; else it was removed meanwhile
                continue
        else:
            try:
                idle = time.time() - path.stat().st_mtime
            except OSError:
                continue  # removed meanwhile
            if idle < _UNOWNED_AGE_S:
                continue  # an older version's run (no lock file) may still be using it
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _curate(cfg: CurationConfig, ws: Workspace, sets_ws: Workspace, store: Store, units: list[Unit],
            shard_names: list[str], work: Path, use_ray: bool) -> CurateResult:
    tally = Tally(cfg.samples_per_reason)
    sets = load_sets(sets_ws, cfg)
    for record_set in sets:
        clean_set(record_set, cfg)  # first: documents are decontaminated against the curated test splits
    ctx = Context(eval_index=EvalIndex(_test_texts(sets_ws, sets, cfg, ("instructions", "preferences")),
                                       cfg.decontaminate) if "decontaminate" in cfg.steps else None)
    cleaned = "boilerplate" in cfg.steps
    documents_in = 0
    if cleaned:
        lines: dict = {}
        for part in run_map(clean_unit, units, (cfg, work), use_ray):
            tally.merge(part["tally"])
            documents_in += part["documents_in"]
            for source, counter in part["lines"].items():
                lines.setdefault(source, counter.__class__()).update(counter)
        ctx = replace(ctx, boilerplate=boilerplate_lines(lines, cfg.boilerplate))
    for part in run_map(filter_unit, units, (cfg, work, ctx, cleaned), use_ray):
        tally.merge(part["tally"])
        documents_in += 0 if cleaned else part["documents_in"]

    versions_in, versions_out = version_stores(ws, store, work, "near_dedup" in cfg.steps)
    keys, signatures, previous, used = _dedup_inputs(cfg, versions_in, units, work)
    codes = find_duplicates(keys, signatures, previous, cfg.near_dedup if signatures is not None else None,
                            exact="exact_dedup" in cfg.steps)
    ids = finish_units(units, cfg, work, codes, tally)
    removed = {r: n for r, n in sorted(tally.removed.items()) if n}
    if not ids:
        raise _empty_error(documents_in, removed, cfg)

    heldout = heldout_ids(ids, cfg.heldout_fraction)
    digest = digest_of_ids(ids, heldout)
    pii = {k.split(".", 1)[1]: n for k, n in sorted(tally.changed.items()) if k.startswith("pii.")}
    with store.atomic_dir(ws.curated_dir) as out:
        write_splits(units, work, out, heldout)
        # The sets are written first: one that curation empties stops the stage before the documents commit.
        record_sets = _finish_sets(sets_ws, sets, cfg, out / "validation.parquet")
        result = CurateResult(documents_in, len(ids), removed, digest, len(ids) - len(heldout), len(heldout), pii,
                              dict(sorted(tally.changed.items())), tuple(tally.steps(list(cfg.steps))), tuple(used),
                              record_sets)
        report = {**result.as_dict(), "samples": tally.samples, "config": cfg.model_dump(mode="json"),
                  "raw_shards": shard_names, "ray": use_ray}
        atomic_write_json(out / "report.json", report)
    if signatures is not None:
        kept = np.flatnonzero(codes == KEEP)
        versions_out.save(digest, keys[previous:][kept], np.asarray(signatures[previous:][kept]), cfg.near_dedup)
        publish_version(ws, store, versions_out, digest)
    return result


def version_stores(ws: Workspace, store: Store, work: Path, needed: bool) -> tuple[VersionStore, VersionStore]:
    """(where earlier versions' dedup keys are read, where this version's are saved).

    Locally both are ``ws.curated_versions_dir`` itself. On an object store the earlier versions are
    read from cached copies and this version is saved in ``work``, then published by
    :func:`publish_version` (cached entries are read-only and shared: never written in place).
    """
    if store.location.is_local:
        versions = VersionStore(ws.curated_versions_dir)
        return versions, versions
    read_root, save_root = work / "versions-in", work / "versions-out"
    read_root.mkdir()
    save_root.mkdir()
    index = ws.curated_versions_dir / "versions.json"
    if needed and store.exists(index):
        data = store.read_bytes(index)
        (read_root / "versions.json").write_bytes(data)
        (save_root / "versions.json").write_bytes(data)
        for entry in json.loads(data)["versions"]:
            folder = ws.curated_versions_dir / entry["digest"]
            if store.is_committed(folder):
                (read_root / entry["digest"]).symlink_to(store.cached_dir(folder))
    return VersionStore(read_root), VersionStore(save_root)


def publish_version(ws: Workspace, store: Store, saved: VersionStore, digest: str) -> None:
    """Put the version :func:`version_stores` saved in scratch on the store: its folder, then the index."""
    if store.location.is_local:
        return
    with store.atomic_dir(ws.curated_versions_dir / digest) as out:
        for name in ("keys.npy", "signatures.npy"):
            shutil.copyfile(saved.root / digest / name, out / name)
    store.atomic_write_bytes(ws.curated_versions_dir / "versions.json", (saved.root / "versions.json").read_bytes())


def _test_texts(ws: Workspace, sets: list[RecordSet], cfg: CurationConfig, names: tuple[str, ...]) -> list[str]:
    """Evaluation texts of the named sets' test splits: curated records when the set was loaded, else
    the collected test file (a test set without a train set is still an evaluation set)."""
    loaded = {rs.name: rs for rs in sets}
    fields = cfg.decontaminate.fields
    texts: list[str] = []
    for name in names:
        if name in loaded:
            texts += [t for record in loaded[name].records["test"] for t in eval_texts_of(record, fields)]
        else:
            texts += eval_texts((ws.sft_dir if name == "instructions" else ws.preferences_dir) / "test.jsonl", fields)
    return texts


def _finish_sets(ws: Workspace, sets: list[RecordSet], cfg: CurationConfig, heldout_path: Path) -> dict[str, dict]:
    """Decontaminate each set's train records (against the test splits it is evaluated with and the
    held-out documents), write it, and return its summary by set name."""
    heldout = read_texts(heldout_path) if any("decontaminate" in rs.cfg.steps for rs in sets) else []
    summaries = {}
    for rs in sets:
        if "decontaminate" in rs.cfg.steps:
            # A preference-tuned model is evaluated on the SFT test set too, so preferences avoid both.
            names = ("instructions",) if rs.name == "instructions" else ("preferences", "instructions")
            decontaminate_set(rs, EvalIndex(_test_texts(ws, sets, cfg, names) + heldout, cfg.decontaminate))
        summaries[rs.name] = write_set(rs, {"set": rs.cfg.model_dump(mode="json"), "pii": cfg.pii.model_dump(mode="json"),
                                            "decontaminate": cfg.decontaminate.model_dump(mode="json"),
                                            "near_dedup": cfg.near_dedup.model_dump(mode="json")})
    return summaries


def _dedup_inputs(cfg: CurationConfig, store: VersionStore, units: list[Unit], work: Path):
    """(keys, signatures or None, rows from earlier versions, their digests) for find_duplicates."""
    keys = read_keys(work, units)
    if "near_dedup" not in cfg.steps:
        return keys, None, 0, []
    near = cfg.near_dedup
    prev_keys, prev_sigs, used = store.previous(near) if near.previous_versions else (
        np.empty(0, dtype=np.uint64), np.empty((0, near.num_perm), dtype=np.uint32), [])
    signatures = stack_signatures(work, units, prev_sigs, near.num_perm)
    return np.concatenate([prev_keys, keys]), signatures, len(prev_keys), used


def digest_of_ids(ids: list[str], heldout: set[str]) -> str:
    """sha256 over the split's ids; ids hash the text, so this pins the exact curated content."""
    lines = [f"train {i}" for i in sorted(ids) if i not in heldout]
    lines += [f"validation {i}" for i in sorted(heldout)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def dataset_digest(train: list[dict], validation: list[dict]) -> str:
    ids = [d["id"] for d in train + validation]
    return digest_of_ids(ids, {d["id"] for d in validation})


# What to change when a reason removed everything.
_FIXES = {
    "empty": "the sources hold only whitespace, markup or control characters; add sources with real text",
    "boilerplate_only": "raise curation.boilerplate.min_documents / min_fraction, or remove `boilerplate` "
                        "from curation.steps",
    "exact_duplicate": "the sources repeat the same text; add sources with different documents",
    "near_duplicate": "the sources repeat nearly the same text; add different documents or raise "
                      "curation.near_dedup.threshold",
    "near_duplicate_previous_version": "the new documents repeat an earlier dataset version; set "
                                       "curation.near_dedup.previous_versions: 0 to keep them",
    "too_short": "lower curation.min_chars (now {min_chars}) or add longer documents",
    "too_long": "raise curation.max_chars (now {max_chars}) or split the documents into smaller files",
    "language": "add the corpus's language to curation.language.keep (now {keep}; detected: {detected})",
    "language_uncertain": "lower curation.language.min_score (now {min_score})",
    "contaminated": "the documents hold the evaluation set; set curation.decontaminate.mode: span",
}


def _empty_error(documents_in: int, removed: dict[str, int], cfg: CurationConfig) -> DataError:
    if not removed:
        return DataError("the raw shards hold no documents", "run `lmforge collect CONFIG` with a source that has text")
    reason = max(sorted(removed), key=lambda r: removed[r])
    counts = ", ".join(f"{r}: {n}" for r, n in sorted(removed.items()))
    if reason.startswith("quality."):
        fix = (f"relax the thresholds of curation.quality behind `{reason}` (see `lmforge config schema`) "
               "or remove `quality` from curation.steps")
    else:
        fix = _FIXES.get(reason, f"relax or remove the curation step that reports `{reason}`").format(
            min_chars=cfg.min_chars, max_chars=cfg.max_chars, keep=list(cfg.language.keep),
            min_score=cfg.language.min_score, detected="see report samples")
    return DataError(f"curation removed all {documents_in} documents; the `{reason}` filter removed "
                     f"the most ({counts})", fix)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0] if args else None)
    print(json.dumps(curate(cfg.curation, Workspace.from_env().ensure()).as_dict(), sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
