"""Curation of the instruction/chat set (``sft/``) and the preference set (``preferences/``).

Each set is small next to the corpus, so it is curated in memory, in three parts the curate stage
(:mod:`lmforge.stages.curate`) calls around the document passes:

  :func:`load_sets`     the collected train/test records of each set that has a train file
  :func:`clean_set`     per record: ``pii``, ``length`` (list order); then exact and near dedup of the
                        rendered conversations, test records first, so a train record that repeats a
                        test record is dropped (``duplicate_of_test``, ``near_duplicate_of_test``)
  :func:`decontaminate_set`  train records holding an n-gram of the evaluation sets (the test
                        splits and the held-out documents, known once the documents are curated)
  :func:`write_set`     train.jsonl, test.jsonl and report.json in one rename

Records never change sides: a test record stays in test, a train record in train; ids are kept.
The report names the SHA-256 of the collected files, which :func:`lmforge.data.sft.record_file`
checks before later stages read the curated set instead of the collected one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.config.curation import CurationConfig, RecordCurationConfig
from lmforge.core.errors import DataError
from lmforge.core.hashing import sha256_file
from lmforge.core.workspace import Workspace, atomic_dir, atomic_write_json
from lmforge.curation.decontaminate import EvalIndex, record_contaminated
from lmforge.curation.dedup import EXACT, KEEP, NEAR, NEAR_PREVIOUS, MinHasher, find_duplicates
from lmforge.curation.records import RecordLength, RecordStep, ScrubRecord, dump_records, record_text
from lmforge.curation.report import Tally
from lmforge.curation.text import text_key, tokens, word_hashes
from lmforge.data.preferences import read_preferences
from lmforge.data.sft import CURATED_INPUTS, read_sft

SPLITS = ("train", "test")
_REASONS = {EXACT: ("exact_dedup", "exact_duplicate"), NEAR: ("near_dedup", "near_duplicate"),
            NEAR_PREVIOUS: ("near_dedup", "near_duplicate_of_test")}
_FIXES = {
    "contaminated": "the set repeats its test split or the held-out documents; remove `decontaminate` from "
                    "curation.{name}.steps only if that overlap is intended",
    "too_long": "raise curation.{name}.max_chars or curation.{name}.max_turns",
    "too_many_turns": "raise curation.{name}.max_turns",
    "too_short": "lower curation.{name}.min_chars",
}


@dataclass
class RecordSet:
    """One set being curated: its records per split, where it lives, and what curation did to it."""

    name: str  # "instructions" or "preferences", as in the data section
    collected: Path
    curated: Path
    cfg: RecordCurationConfig
    records: dict[str, list[dict]]
    inputs: dict[str, str]  # collected file name -> SHA-256
    tally: Tally
    records_in: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        """Counts per split, removals by reason, per-step rows and PII replaced (the report's head)."""
        changed = {k: n for k, n in sorted(self.tally.changed.items()) if n}
        return {
            **{f"{split}_in": self.records_in[split] for split in SPLITS},
            **{f"{split}_out": len(self.records[split]) for split in SPLITS},
            "removed": {r: n for r, n in sorted(self.tally.removed.items()) if n},
            "steps": [{"step": row["step"], "records_in": row["documents_in"], "records_out": row["documents_out"],
                       "removed": row["removed"]} for row in self.tally.steps(self.order())],
            "pii_replaced": {k.split(".", 1)[1]: n for k, n in changed.items() if k.startswith("pii.")},
        }

    def order(self) -> list[str]:
        """The configured steps in the order they run: per record, dedup, then decontamination."""
        per_record = [s for s in self.cfg.steps if s in ("pii", "length")]
        return per_record + [s for s in ("exact_dedup", "near_dedup", "decontaminate") if s in self.cfg.steps]


def load_sets(ws: Workspace, cfg: CurationConfig) -> list[RecordSet]:
    """The sets whose collected train file exists (a test file alone is only an evaluation set)."""
    sets = []
    for name, collected, curated, section in (
            ("instructions", ws.sft_dir, ws.curated_sft_dir, cfg.instructions),
            ("preferences", ws.preferences_dir, ws.curated_preferences_dir, cfg.preferences)):
        if not (collected / "train.jsonl").exists():
            continue
        records, inputs = {}, {}
        for split in SPLITS:
            path = collected / f"{split}.jsonl"
            records[split] = (read_sft(path) if name == "instructions" else read_preferences(path)) if path.exists() else []
            if path.exists():
                inputs[path.name] = sha256_file(path)
        sets.append(RecordSet(name, collected, curated, section, records, inputs, Tally(cfg.samples_per_reason),
                              {split: len(rows) for split, rows in records.items()}))
    return sets


def clean_set(rs: RecordSet, cfg: CurationConfig) -> None:
    """The per-record steps, then dedup, on both splits (test first); removals counted in ``rs.tally``."""
    builders: dict[str, Callable[[], RecordStep]] = {"pii": lambda: ScrubRecord(cfg.pii), "length": lambda: RecordLength(rs.cfg)}
    steps = [builders[name]() for name in rs.cfg.steps if name in builders]
    for split in ("test", "train"):
        kept = []
        for record in rs.records[split]:
            for step in steps:
                rs.tally.reached(step.name)
                reason = step(record)
                if reason:
                    rs.tally.remove(step.name, reason, _sample(record, split))
                    break
            else:
                kept.append(record)
        rs.records[split] = kept
    for step in steps:
        for key, value in step.counts.items():
            rs.tally.changed[f"{step.name}.{key}"] += value
    _dedup(rs, cfg)


def _dedup(rs: RecordSet, cfg: CurationConfig) -> None:
    dedup_steps: list[str] = [s for s in ("exact_dedup", "near_dedup") if s in rs.cfg.steps]
    if not dedup_steps:
        return
    near = cfg.near_dedup if "near_dedup" in dedup_steps else None
    hasher = MinHasher(cfg.near_dedup) if near is not None else None
    exact = "exact_dedup" in dedup_steps
    features = {split: _features(rs.records[split], hasher) for split in SPLITS}
    test_keys, test_sigs = features["test"]
    test_codes = find_duplicates(test_keys, test_sigs, 0, near, exact)
    _drop(rs, "test", test_codes, set(), dedup_steps)
    kept = test_codes == KEEP
    train_keys, train_sigs = features["train"]
    signatures = np.concatenate([test_sigs[kept], train_sigs]) if hasher is not None else None
    codes = find_duplicates(np.concatenate([test_keys[kept], train_keys]), signatures, int(kept.sum()), near, exact)
    _drop(rs, "train", codes, set(test_keys[kept].tolist()), dedup_steps)


def _features(records: list[dict], hasher: MinHasher | None) -> tuple[np.ndarray, np.ndarray]:
    texts = [record_text(r) for r in records]
    keys = np.array([text_key(t) for t in texts], dtype=np.uint64)
    width = len(hasher.a) if hasher is not None else 0
    signatures = (np.stack([hasher.signature(word_hashes(tokens(t))) for t in texts])
                  if hasher is not None and texts else np.zeros((len(texts), width), dtype=np.uint32))
    return keys, signatures


def _drop(rs: RecordSet, split: str, codes: np.ndarray, test_keys: set[int], dedup_steps: list[str]) -> None:
    """Keep the records whose code is KEEP and whose key is no test record's; count the others."""
    kept = []
    for record, code in zip(rs.records[split], codes.tolist()):
        step, reason = _REASONS.get(code, ("", ""))
        if code == KEEP and int(text_key(record_text(record))) in test_keys:
            # find_duplicates keeps a copy of an earlier row as "the same document again"; here the
            # earlier row is a test record, so the copy is a train record that would leak it.
            step, reason = dedup_steps[0], "duplicate_of_test"
        removed = False
        for name in dedup_steps:
            rs.tally.reached(name)
            if name == step:
                rs.tally.remove(name, reason, _sample(record, split))
                removed = True
                break
        if not removed:
            kept.append(record)
    rs.records[split] = kept


def decontaminate_set(rs: RecordSet, index: EvalIndex) -> None:
    """Drop the train records that hold an n-gram of the evaluation texts in ``index``."""
    if "decontaminate" not in rs.cfg.steps:
        return
    kept = []
    for record in rs.records["train"]:
        rs.tally.reached("decontaminate")
        if record_contaminated(record, index):
            rs.tally.remove("decontaminate", "contaminated", _sample(record, "train"))
        else:
            kept.append(record)
    rs.records["train"] = kept


def write_set(rs: RecordSet, config: dict) -> dict:
    """Write the curated set in one rename and return its summary; no train record left is a DataError."""
    summary = rs.summary()
    if rs.records_in["train"] and not rs.records["train"]:
        removed = summary["removed"]
        reason = max(sorted(removed), key=lambda r: removed[r])
        fix = _FIXES.get(reason, "add different records, or remove the step that reports `{reason}` from "
                         "curation.{name}.steps").format(name=rs.name, reason=reason)
        counts = ", ".join(f"{r}: {n}" for r, n in removed.items())
        raise DataError(f"curation removed all {rs.records_in['train']} train records of the {rs.name} set "
                        f"({rs.collected}); `{reason}` removed the most ({counts})", fix)
    with atomic_dir(rs.curated) as out:
        for split in SPLITS:
            (out / f"{split}.jsonl").write_text(dump_records(rs.records[split]), encoding="utf-8")
        atomic_write_json(out / "report.json", {**summary, CURATED_INPUTS: rs.inputs, "samples": rs.tally.samples,
                                                "collected": str(rs.collected), "config": config})
    return summary


def _sample(record: dict, split: str) -> dict:
    return {"id": record.get("id"), "text": record_text(record), "source": split}
