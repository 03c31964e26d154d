"""Instruction/chat and preference records as text: the turns of a record, its rendered conversation,
its evaluation texts, and the per-record steps (PII scrubbing, length).

Three record shapes reach curation and validation (see :mod:`lmforge.data.chat_formats` and
:mod:`lmforge.data.preference_formats`): a chat ``{"id", "messages", "tools"?}``, a legacy pair
``{"id", "instruction", "response"}`` (the built-in stdlib set) and a preference record
``{"id", "prompt", "chosen", "rejected"}``. Everything here takes any of them, so the dedup key,
the length and the decontamination of a record do not depend on how it was written.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from lmforge.config.curation import PiiConfig, RecordCurationConfig
from lmforge.curation.pii import ScrubPii
from lmforge.data.chat_formats import pair_messages


def conversations(record: dict) -> list[list[dict]]:
    """The conversations a record holds: one for an SFT record, prompt + chosen and prompt + rejected
    for a preference record. A legacy pair is its user turn and its assistant turn."""
    if "chosen" in record and "rejected" in record:
        prompt = list(record.get("prompt") or [])
        return [prompt + list(record["chosen"] or []), prompt + list(record["rejected"] or [])]
    if isinstance(record.get("messages"), list):
        return [list(record["messages"])]
    return [pair_messages(str(record.get("instruction") or ""), str(record.get("response") or ""))]


def turns(record: dict) -> list[dict]:
    """Every turn of a record once (a preference record's prompt is not repeated)."""
    if "chosen" in record and "rejected" in record:
        return [*(record.get("prompt") or []), *(record["chosen"] or []), *(record["rejected"] or [])]
    return conversations(record)[0]


def turn_text(turn: dict) -> str:
    """A turn's content, then its tool calls (name and JSON arguments), one per line."""
    calls = [f"{c.get('function', {}).get('name', '')}({c.get('function', {}).get('arguments', '')})"
             for c in turn.get("tool_calls") or [] if isinstance(c, dict)]
    content = turn.get("content")
    return "\n".join([content if isinstance(content, str) else "", *calls]).strip()


def record_text(record: dict) -> str:
    """The rendered record, ``role: text`` per turn (a preference record: prompt, then chosen, then
    rejected, marked). Dedup keys, MinHash signatures and lengths are computed on this text."""
    if "chosen" in record and "rejected" in record:
        parts = [_render(record.get("prompt") or []), "chosen:", _render(record["chosen"] or []),
                 "rejected:", _render(record["rejected"] or [])]
        return "\n".join(parts)
    return _render(turns(record))


def _render(messages: list[dict]) -> str:
    return "\n".join(f"{m.get('role')}: {turn_text(m)}" for m in messages if isinstance(m, dict))


def content_chars(record: dict) -> int:
    """Characters of every turn's text: what the length bounds count (role labels excluded)."""
    return sum(len(turn_text(t)) for t in turns(record) if isinstance(t, dict))


def eval_texts_of(record: dict, fields: list[str]) -> list[str]:
    """What of an evaluation record training text must not contain: the configured ``fields`` of a
    legacy pair, the user, assistant and tool turns of a chat or preference record. System turns
    are left out: one system prompt shared by every record would make every record contaminated."""
    if "messages" in record or "chosen" in record:
        return [text for t in turns(record) if isinstance(t, dict) and t.get("role") != "system"
                if (text := turn_text(t))]
    return [str(record[f]) for f in fields if isinstance(record.get(f), str)]


def match_texts(record: dict) -> list[str]:
    """The texts of a training record that decontamination looks into: every turn, system included."""
    if "messages" in record or "chosen" in record:
        return [text for t in turns(record) if isinstance(t, dict) if (text := turn_text(t))]
    return [str(record.get("instruction") or ""), str(record.get("response") or "")]


class RecordStep(Protocol):
    """A per-record step: rewrites the record in place, or returns why it removes it."""

    name: str
    counts: Counter

    def __call__(self, record: dict) -> str | None: ...


class ScrubRecord:
    """PII scrubbing of a record's texts (turn contents, tool-call arguments, a pair's two fields)
    with the document step's detectors; ``counts`` is by PII kind, like the document step's."""

    name = "pii"

    def __init__(self, cfg: PiiConfig) -> None:
        self.scrub = ScrubPii(cfg)
        self.counts: Counter = self.scrub.counts

    def __call__(self, record: dict) -> str | None:
        for holder, key in _text_slots(record):
            doc = {"text": holder[key], "meta": {}}
            self.scrub(doc)
            holder[key] = doc["text"]
        return None


def _text_slots(record: dict) -> Iterator[tuple[dict, str]]:
    """(dict, key) of every string a record's turns are made of, to rewrite in place."""
    if "messages" not in record and "chosen" not in record:
        yield from ((record, k) for k in ("instruction", "response") if isinstance(record.get(k), str))
        return
    for turn in turns(record):
        if not isinstance(turn, dict):
            continue
        if isinstance(turn.get("content"), str):
            yield turn, "content"
        for call in turn.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                yield function, "arguments"


class RecordLength:
    """Records whose turns hold too few or too many characters, or that have too many turns."""

    name = "length"

    def __init__(self, cfg: RecordCurationConfig) -> None:
        self.cfg = cfg
        self.counts: Counter = Counter()

    def __call__(self, record: dict) -> str | None:
        if max(len(c) for c in conversations(record)) > self.cfg.max_turns:
            return "too_many_turns"
        chars = content_chars(record)
        if chars < self.cfg.min_chars:
            return "too_short"
        return "too_long" if chars > self.cfg.max_chars else None


def dump_records(records: list[dict]) -> str:
    """JSON lines as collect writes them (sorted keys, UTF-8 kept), so a set keeps its byte form."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
