"""The instruction/chat and preference suites: one row per record of both splits, with the derived
columns Great Expectations checks.

Columns: ``record`` (``split/id``, the index the report names), ``role_order`` (``ok`` or the first
problem: ``system_not_first``, ``user_after_user``, ``tool_without_call``, ``tool_call_without_result``
...), ``empty_turns``, ``assistant_turns`` (the fewest of a record's conversations: a preference
record's chosen and rejected answers each need one), ``turns``, ``chars`` (of every turn's text),
``duplicate`` (1 when an earlier row renders to the same conversation, across train and test),
``has_pii`` and, for preferences, ``chosen_differs``. The files are the ones later stages read
(:func:`lmforge.data.sft.sft_file`): the curated sets when curate made them from the collected files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.config.validation import RecordChecks
from lmforge.core.workspace import Workspace
from lmforge.curation.pii import find_pii
from lmforge.curation.records import content_chars, conversations, record_text, turn_text, turns
from lmforge.curation.text import text_key
from lmforge.data.preferences import read_preferences
from lmforge.data.sft import preference_file, read_sft, sft_file

SUITES = {"instructions": "instruction_records", "preferences": "preference_records"}

# Which role may follow which: a system turn only opens a conversation, user and assistant
# alternate, tool results follow an assistant turn that called tools (or another tool result).
_NEXT = {"start": {"system", "user"}, "system": {"user"}, "user": {"assistant"},
         "assistant": {"user"}, "tool": {"tool", "assistant"}}


def role_order(messages: list[dict]) -> str:
    """``ok``, or the first problem of a conversation's role order."""
    previous, calls = "start", False
    for turn in messages:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role == "system" and previous != "start":
            return "system_not_first"
        if previous == "assistant" and calls and role != "tool":
            return "tool_call_without_result"
        allowed = _NEXT.get(previous, set()) | ({"tool"} if previous == "assistant" and calls else set())
        if role not in allowed:
            return "tool_without_call" if role == "tool" else f"{role}_after_{previous}"
        calls = bool(turn.get("tool_calls")) if role == "assistant" else calls and role == "tool"
        previous = role
    return "ok" if previous == "assistant" else f"ends_with_{previous}"


def empty_turns(record: dict) -> int:
    """Turns with no text; a tool result may be empty, and an assistant turn that calls tools needs no text."""
    return sum(1 for t in turns(record) if isinstance(t, dict) and t.get("role") != "tool"
               and not turn_text(t))


def features(record: dict, split: str, preference: bool) -> dict:
    chats = conversations(record)
    problems = [p for p in (role_order(c) for c in chats) if p != "ok"]
    row: dict[str, Any] = {
        "record": f"{split}/{record.get('id')}", "split": split, "id": str(record.get("id")),
        "role_order": problems[0] if problems else "ok",
        "empty_turns": empty_turns(record),
        "assistant_turns": min(sum(1 for t in c if isinstance(t, dict) and t.get("role") == "assistant") for c in chats),
        "turns": max(len(c) for c in chats),
        "chars": content_chars(record),
        "has_pii": int(bool(find_pii(record_text(record)))),
    }
    if preference:
        row["chosen_differs"] = int(record.get("chosen") != record.get("rejected"))
    return row


def load_frame(ws: Workspace, name: str) -> Any | None:
    """The frame of the set ``name`` (``instructions`` or ``preferences``), or None when it has no train file."""
    import pandas as pd

    preference = name == "preferences"
    paths = {split: (preference_file if preference else sft_file)(ws, split) for split in ("train", "test")}
    if not paths["train"].exists():
        return None
    rows, seen = [], set()
    for split, path in paths.items():
        for record in _read(path, preference):
            row = features(record, split, preference)
            key = text_key(record_text(record))
            row["duplicate"] = int(key in seen)
            seen.add(key)
            rows.append(row)
    return pd.DataFrame(rows, columns=[*_COLUMNS, "duplicate", *(["chosen_differs"] if preference else [])])


_COLUMNS = ["record", "split", "id", "role_order", "empty_turns", "assistant_turns", "turns", "chars", "has_pii"]


def _read(path: Path, preference: bool) -> list[dict]:
    if not path.exists():
        return []
    return read_preferences(path) if preference else read_sft(path)


def expectations(checks: RecordChecks, rows: int, preference: bool) -> list[tuple[str, Any]]:
    """(our name, GX expectation) pairs of a record suite."""
    import great_expectations.expectations as gxe  # seconds to import: only when a suite is built

    def mostly(allowed: float) -> float:
        return max(0.0, 1.0 - allowed / rows) if rows else 1.0

    named: list[tuple[str, Any]] = [
        ("row_count", gxe.ExpectTableRowCountToBeBetween(min_value=checks.min_records)),
        ("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id")),
        ("role_order", gxe.ExpectColumnValuesToBeInSet(column="role_order", value_set=["ok"])),
        ("no_empty_turns", gxe.ExpectColumnValuesToBeInSet(column="empty_turns", value_set=[0])),
        ("assistant_turn", gxe.ExpectColumnValuesToBeBetween(column="assistant_turns", min_value=1)),
        ("record_length", gxe.ExpectColumnValuesToBeBetween(column="chars", min_value=checks.min_chars,
                                                            max_value=checks.max_chars)),
        ("turn_count", gxe.ExpectColumnValuesToBeBetween(column="turns", min_value=1, max_value=checks.max_turns)),
        # A row is a duplicate when an earlier row renders the same; `mostly` allows the configured share.
        ("duplicate_share", gxe.ExpectColumnValuesToBeInSet(
            column="duplicate", value_set=[0], mostly=1.0 - checks.max_duplicate_fraction)),
        ("no_pii", gxe.ExpectColumnValuesToBeInSet(column="has_pii", value_set=[0],
                                                    mostly=mostly(checks.max_pii_records))),
    ]
    if preference:
        named.append(("chosen_differs", gxe.ExpectColumnValuesToBeInSet(column="chosen_differs", value_set=[1])))
    return named
