"""The tokenized-dataset suite: one row per training row of every built dataset and split.

Columns: ``length_fraction`` (non-padding tokens / seq_len), ``unknown_fraction``, ``supervised``
(tokens with a label), ``labels_sane`` (labels equal the inputs wherever they are set, and SFT
rows mask their first token, the prompt), ``in_other_split`` (the same token row also appears in
another split of the same dataset).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xxhash

from lmforge.config.validation import ValidationConfig
from lmforge.core.workspace import Workspace
from lmforge.data.packing import IGNORE_INDEX
from lmforge.data.tokenized import PHASES, latest_manifest, load_tokenized


def load_frame(ws: Workspace) -> tuple[Any, dict]:
    import pandas as pd

    manifest = latest_manifest(ws)
    parts = []
    for phase, splits in PHASES.items():
        if not (ws.tokenized_dir / manifest["digest"] / phase).exists():
            continue
        tables = {split: {k: v.numpy() for k, v in load_tokenized(ws, phase, split).items()} for split in splits}
        hashes = {split: [xxhash.xxh64_intdigest(row.tobytes()) for row in t["input_ids"]]
                  for split, t in tables.items()}
        for split, cols in tables.items():
            others = {h for s, hs in hashes.items() if s != split for h in hs}
            parts.append(_rows(phase, split, cols, hashes[split], others, manifest))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    frame["row"] = [f"{p}/{s}/{i}" for p, s, i in zip(frame["dataset"], frame["split"], frame["index"])]
    return frame, manifest


def _rows(phase: str, split: str, cols: dict, hashes: list[int], others: set[int], manifest: dict) -> Any:
    import pandas as pd

    ids, labels, mask = cols["input_ids"], cols["labels"], cols["attention_mask"]
    seq_len = manifest["seq_len"][phase]
    lengths = mask.sum(axis=1)
    unk = manifest.get("unk_token_id")
    unknown = (ids == unk).sum(axis=1) if unk is not None else np.zeros(len(ids), dtype=np.int64)
    set_labels = labels != IGNORE_INDEX
    consistent = ((labels == ids) | ~set_labels).all(axis=1) & ~(set_labels & (mask == 0)).any(axis=1)
    if phase == "finetune":
        consistent &= ~set_labels[:, 0] if ids.shape[1] else True
    return pd.DataFrame({
        "dataset": phase, "split": split, "index": np.arange(len(ids)),
        "length_fraction": lengths / seq_len,
        "unknown_fraction": unknown / np.maximum(lengths, 1),
        "supervised": set_labels.sum(axis=1),
        "labels_sane": consistent.astype(int),
        "max_token_id": ids.max(axis=1) if ids.size else np.zeros(len(ids), dtype=np.int64),
        "in_other_split": [int(h in others) for h in hashes],
    })


def expectations(cfg: ValidationConfig, manifest: dict) -> list[tuple[str, Any]]:
    import great_expectations.expectations as gxe

    checks = cfg.tokenized
    return [
        ("row_count", gxe.ExpectTableRowCountToBeBetween(min_value=checks.min_rows)),
        ("sequence_length", gxe.ExpectColumnValuesToBeBetween(column="length_fraction", min_value=0,
                                                               max_value=1, strict_min=True)),
        ("mean_sequence_length", gxe.ExpectColumnMeanToBeBetween(column="length_fraction",
                                                                 min_value=checks.min_mean_length_fraction)),
        ("unknown_token_rate", gxe.ExpectColumnMeanToBeBetween(column="unknown_fraction", min_value=0,
                                                               max_value=checks.max_unknown_rate)),
        ("token_ids_in_vocab", gxe.ExpectColumnValuesToBeBetween(column="max_token_id", min_value=0,
                                                                 max_value=manifest["vocab_size"] - 1)),
        ("supervised_tokens", gxe.ExpectColumnValuesToBeBetween(column="supervised",
                                                                min_value=checks.min_supervised_tokens)),
        ("label_masking", gxe.ExpectColumnValuesToBeInSet(column="labels_sane", value_set=[1])),
        ("splits_disjoint", gxe.ExpectColumnValuesToBeInSet(column="in_other_split", value_set=[0])),
    ]
