"""Preference records: reading the JSONL files collect (and curate) write, checked line by line.

A record is the canonical form of :mod:`lmforge.data.preference_formats`::

    {"id": str, "prompt": [message, ...], "chosen": [assistant message, ...], "rejected": [...]}

``preferences/train.jsonl`` feeds preference tuning (``training.preference.loss``), less the pairs
:func:`lmforge.data.sft.split_finetune` holds out for validation (the same salted cut as SFT, by
``id``); ``test.jsonl`` is never trained on. Find the file with :func:`lmforge.data.sft.preference_file`.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from lmforge.core.errors import DataError
from lmforge.data.jsonl import json_lines

_FIX = "regenerate the preference set with `lmforge collect` (data.preferences.sources)"


def read_preferences(path: Path) -> list[dict]:
    """The records of a preference JSONL file; an error names the file and line of a bad one."""
    if not path.exists():
        raise DataError(f"no preference pairs at {path}", "list your preference data under data.preferences.sources "
                        "and run `lmforge collect`")
    records: list[dict] = []
    for number, record in json_lines(path, _FIX):
        problem = _problem(record)
        if problem:
            raise DataError(f"{path}:{number} is not a preference record: {problem}", _FIX)
        records.append(cast(dict, record))
    return records


def _problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    for field in ("prompt", "chosen", "rejected"):
        turns = record.get(field)
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) and "role" in t for t in turns):
            return f"`{field}` is not a non-empty list of messages"
    for field in ("chosen", "rejected"):
        if any(turn["role"] != "assistant" for turn in record[field]):
            return f"`{field}` holds a turn that is not the assistant's"
    return None
