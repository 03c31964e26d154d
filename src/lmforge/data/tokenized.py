"""Tokenized datasets on disk: how the tokenize stage stores them and how training and validation load them.

Layout under ``ws.tokenized_dir``: one folder per content digest holding ``manifest.json`` and one
``datasets`` (Arrow) dataset per ``<phase>/<split>`` (see :data:`PHASES`), and ``latest.json``
naming the newest digest. The rows are those of :mod:`lmforge.data.packing`; the tokenize stage
(:mod:`lmforge.stages.tokenize`) builds them, :func:`load_tokenized` gives them back as tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmforge.core.errors import DataError
from lmforge.core.hashing import sha256_file
from lmforge.core.storage import open_store
from lmforge.core.workspace import Workspace, atomic_write_json

PHASES = {"pretrain": ("train", "validation"), "finetune": ("train", "validation", "test")}


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, or "" when it does not exist."""
    return sha256_file(path) if path.exists() else ""


def save_tokenized(ws: Workspace, digest: str, tables: dict[str, dict[str, dict]], manifest: dict) -> Path:
    """Store ``tables`` (phase -> split -> column -> rows) as the dataset ``digest``, once, and mark it latest.

    Through the workspace's store: on an object store the version is a committed directory and
    ``latest.json`` an object, written after it (a reader never sees a name without its data)."""
    import datasets  # only the tokenize stage writes datasets; a training worker may not have the library

    store = open_store(ws)
    target = ws.tokenized_dir / digest
    if not store.exists(target / "manifest.json"):
        datasets.disable_progress_bars()
        with store.atomic_dir(target) as tmp:
            for phase, splits in tables.items():
                for split, cols in splits.items():
                    data = {name: array.tolist() for name, array in cols.items()}
                    datasets.Dataset.from_dict(data).save_to_disk(str(tmp / phase / split))
            atomic_write_json(tmp / "manifest.json", manifest)
    store.atomic_write_json(ws.tokenized_dir / "latest.json", {"digest": digest})
    return target


def stored_inputs(ws: Workspace) -> list[Path]:
    """What a reader of the latest tokenized datasets needs from the store: ``latest.json`` and its version."""
    store = open_store(ws)
    latest = ws.tokenized_dir / "latest.json"
    if not store.exists(latest):
        return []
    return [latest, ws.tokenized_dir / store.read_json(latest)["digest"]]


def latest_manifest(ws: Workspace) -> dict:
    """The manifest of the newest tokenized datasets (digest, rows, seq_len, token ids, config)."""
    latest = ws.tokenized_dir / "latest.json"
    if not latest.exists():
        raise DataError(f"no tokenized datasets in {ws.tokenized_dir}", "run `lmforge tokenize CONFIG` first")
    digest = json.loads(latest.read_text())["digest"]
    return json.loads((ws.tokenized_dir / digest / "manifest.json").read_text())


def load_tokenized(ws: Workspace, phase: str, split: str) -> dict[str, torch.Tensor]:
    """The latest tokenized ``phase``/``split`` as long tensors: input_ids, labels, attention_mask
    (+ position_ids when built without cross-document attention), shaped (rows, seq_len)."""
    import datasets  # see save_tokenized

    if split not in PHASES.get(phase, ()):
        raise DataError(f"no tokenized split {phase}/{split}", f"use one of {PHASES}")
    manifest = latest_manifest(ws)
    if manifest["tokenizer_sha256"] != file_sha256(ws.tokenizer_dir / "tokenizer.json"):
        raise DataError(f"the tokenized datasets {manifest['digest'][:12]} were built with another tokenizer "
                        f"than {ws.tokenizer_dir}", "rerun `lmforge tokenize CONFIG`")
    path = ws.tokenized_dir / manifest["digest"] / phase / split
    if not path.exists():
        raise DataError(f"no tokenized {phase}/{split} in {path.parent.parent}",
                        "collect an SFT set (data.instructions) and rerun `lmforge tokenize CONFIG`")
    table = datasets.load_from_disk(str(path)).with_format("numpy")
    seq_len = manifest["seq_len"][phase]
    columns = table[:] if len(table) else {name: np.zeros((0, seq_len), np.int64) for name in table.column_names}
    return {name: torch.from_numpy(np.asarray(values)).long() for name, values in columns.items()}
