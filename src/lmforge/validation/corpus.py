"""The curated-corpus suite: the frame (documents of both splits plus derived columns) and its
expectations.

Derived columns turn checks GX cannot express into plain columns it can: ``has_pii`` (the PII
detector of :mod:`lmforge.curation.pii` still finds something), ``eval_overlap`` (a training
document equals or nearly duplicates a held-out document, or holds an n-gram of the SFT or
preference test set, chats included), ``language`` (written by curation's language step).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from lmforge.config.curation import DecontaminationConfig, NearDedupConfig
from lmforge.config.validation import ValidationConfig
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace
from lmforge.curation.decontaminate import EvalIndex, eval_texts
from lmforge.curation.dedup import NEAR_PREVIOUS, MinHasher, find_duplicates
from lmforge.curation.pii import find_pii
from lmforge.curation.text import text_key, tokens, word_hashes
from lmforge.data.documents import read_documents
from lmforge.data.sft import preference_file, sft_file
from lmforge.validation.gx_suite import user_expectations


def load_frame(ws: Workspace) -> Any:
    import pandas as pd

    frames = []
    for split in ("train", "validation"):
        path = ws.curated_dir / f"{split}.parquet"
        if not path.exists():
            raise DataError(f"curated data {path} does not exist", "run `lmforge curate CONFIG` first")
        frame = pd.DataFrame(read_documents(path))
        if "text" not in frame.columns:
            raise DataError(f"{path} has no `text` column", "rerun `lmforge curate CONFIG`")
        frame["split"] = split
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    texts = [t if isinstance(t, str) else "" for t in frame["text"]]
    frame["language"] = [_meta(m).get("language") for m in frame["meta"]]
    frame["has_pii"] = [int(bool(_pii(t))) for t in texts]
    frame["eval_overlap"] = _eval_overlap(ws, texts, frame["split"].tolist())
    return frame


def _meta(raw: Any) -> dict:
    try:
        return json.loads(raw) if isinstance(raw, str) and raw else {}
    except json.JSONDecodeError:
        return {}


def _pii(text: str) -> list:
    return find_pii(text)


def _eval_overlap(ws: Workspace, texts: list[str], splits: list[str]) -> list[int]:
    """1 for a training document that overlaps an evaluation set, else 0."""
    decon = DecontaminationConfig()
    tests = [sft_file(ws, "test"), preference_file(ws, "test")]  # the test splits curate decontaminated against
    index = EvalIndex([t for path in tests for t in eval_texts(path, decon.fields)], decon)
    near = NearDedupConfig(previous_versions=0)
    hasher = MinHasher(near)
    held = [i for i, s in enumerate(splits) if s != "train"]
    train = [i for i, s in enumerate(splits) if s == "train"]
    order = held + train  # held-out documents play the earlier version: a near twin in train overlaps
    keys = np.array([text_key(texts[i]) for i in order], dtype=np.uint64)
    hashes = [word_hashes(tokens(texts[i])) for i in order]
    signatures = np.stack([hasher.signature(h) for h in hashes]) if order else np.zeros((0, near.num_perm), np.uint32)
    codes = find_duplicates(keys, signatures, len(held), near, exact=False)
    held_keys = set(keys[: len(held)].tolist())
    overlap = [0] * len(texts)
    for position, i in enumerate(order):
        in_train = position >= len(held)
        twin = in_train and (int(keys[position]) in held_keys or codes[position - len(held)] == NEAR_PREVIOUS)
        overlap[i] = int(twin or bool(index and index.covered(hashes[position]).any()))
    return overlap


def expectations(cfg: ValidationConfig, rows: int) -> list[tuple[str, Any]]:
    """(our name, GX expectation) pairs of the corpus suite, then the user's own."""
    import great_expectations.expectations as gxe  # seconds to import: only when a suite is built

    def mostly(allowed: int) -> float:
        return max(0.0, 1.0 - allowed / rows) if rows else 1.0

    # A proportion of unique values of 1 - f allows a share f of duplicate texts.
    named: list[tuple[str, Any]] = [
        ("row_count", gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_documents)),
        ("text_not_null", gxe.ExpectColumnValuesToNotBeNull(column="text")),
        ("text_length", gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=cfg.min_chars, max_value=cfg.max_chars)),
        ("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id")),
        ("text_duplicate_share", gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="text", min_value=1.0 - cfg.max_duplicate_fraction, max_value=1.0)),
        ("no_pii", gxe.ExpectColumnValuesToBeInSet(column="has_pii", value_set=[0],
                                                    mostly=mostly(cfg.max_pii_documents))),
        ("no_eval_overlap", gxe.ExpectColumnValuesToBeInSet(column="eval_overlap", value_set=[0],
                                                             mostly=mostly(cfg.max_eval_overlap_documents))),
    ]
    if cfg.allowed_sources:
        named.append(("source_allowed", gxe.ExpectColumnValuesToBeInSet(
            column="source", value_set=list(cfg.allowed_sources))))
    if cfg.languages:
        named.append(("language_share", gxe.ExpectColumnValuesToBeInSet(
            column="language", value_set=list(cfg.languages), mostly=cfg.min_language_share)))
    return named + user_expectations(list(cfg.expectations))
