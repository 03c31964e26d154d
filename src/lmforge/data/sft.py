"""SFT records: reading the JSONL files collect writes, and the fine-tuning validation split.

A record is either an instruction/response pair (``{"id", "instruction": str, "response": str}``,
the built-in stdlib pairs, in the format of :mod:`lmforge.model.prompt`) or a chat in the canonical
form of :mod:`lmforge.data.chat_formats` (``{"id", "messages": [...], "tools"?}``, ending with an
assistant turn), which every user source is normalized to. ``sft/train.jsonl`` feeds fine-tuning, less the validation records
:func:`split_finetune` holds out; ``sft/test.jsonl`` is never trained on. The tokenize stage, training
on the fly and evaluation all read through :func:`read_sft`, so they accept and reject the same lines.
They find the file through :func:`sft_file`: the curate stage's set (``ws.curated_sft_dir``) when it was
curated from the collected file now in ``ws.sft_dir``, else the collected file itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from lmforge.core.errors import DataError
from lmforge.core.hashing import sha256_file
from lmforge.core.workspace import Workspace
from lmforge.data.jsonl import json_lines
from lmforge.data.splits import split_by_key

# Makes the validation cut independent of collect's unsalted train/test cut (see split_finetune).
FINETUNE_VALIDATION_SALT = "finetune-validation"


CURATED_INPUTS = "inputs"  # key of a curated set's report.json: collected file name -> its SHA-256


def sft_file(ws: Workspace, split: str) -> Path:
    """The SFT file of ``split`` (``train`` or ``test``) that later stages read."""
    return record_file(ws.sft_dir, ws.curated_sft_dir, split)


def preference_file(ws: Workspace, split: str) -> Path:
    """The preference file of ``split`` that later stages read."""
    return record_file(ws.preferences_dir, ws.curated_preferences_dir, split)


def record_file(collected: Path, curated: Path, split: str) -> Path:
    """``curated/<split>.jsonl`` when curate made it from the file now at ``collected/<split>.jsonl``,
    else the collected file: a collect run after curate makes the curated set stale, and a stale
    set must not be trained on in place of the data just collected (rerun curate to curate it)."""
    name = f"{split}.jsonl"
    source, report = collected / name, curated / "report.json"
    fresh = (source.exists() and (curated / name).exists() and report.exists()
             and json.loads(report.read_text(encoding="utf-8")).get(CURATED_INPUTS, {}).get(name) == sha256_file(source))
    return curated / name if fresh else source


def read_sft(path: Path, limit: int | None = None) -> list[dict]:
    """The records of an SFT JSONL file (the first ``limit`` of them when set), checked line by line.

    Errors name the file and line. Evaluation answers each record at its last assistant turn
    (:func:`lmforge.evaluation.scoring.answer_prompt`), so chats of any length are scored.
    """
    if not path.exists():
        raise DataError(f"no SFT examples at {path}", "run the collect stage first (`lmforge collect`)")
    fix = "regenerate the SFT set with `lmforge collect`"
    records: list[dict] = []
    for number, record in json_lines(path, fix):
        if limit is not None and len(records) >= limit:
            break
        if not _well_formed(record):
            raise DataError(f"{path}:{number} is not a JSON object with `messages` or string `instruction` and "
                            "`response`", fix)
        records.append(cast(dict, record))
    return records


def _well_formed(record: object) -> bool:
    if not isinstance(record, dict):
        return False
    messages = record.get("messages")
    if isinstance(messages, list) and messages:  # role order and assistant turns: the validate stage's suite
        return True
    return isinstance(record.get("instruction"), str) and isinstance(record.get("response"), str)


def record_key(record: dict) -> str:
    """What a record is split by: its ``id``, else its text (so an unchanged record keeps its side)."""
    return str(record.get("id") or record.get("instruction", "") + record.get("response", "")
               or json.dumps(record.get("messages"), sort_keys=True))


def split_finetune(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation) records of SFT train: ``fraction`` held out by a salted hash of each key.

    ``fraction`` is ``tokenize.finetune_heldout_fraction``; prebuilt tokenized datasets and training
    on the fly both cut here, so they validate on the same records. The salt matters: collect
    already split train from test by the unsalted hash of the same ids, so every train record's
    unsalted bucket is >= the test fraction and an unsalted cut below it would hold out nothing.
    """
    return split_by_key(records, fraction, record_key, salt=FINETUNE_VALIDATION_SALT)
