"""Preference records (a prompt, a chosen and a rejected answer) normalized to one canonical form.

Read (format ``preference``): ``{"prompt", "chosen", "rejected", "system"?, "id"?}`` where ``prompt``
is a string or a list of messages and ``chosen``/``rejected`` are strings, lists of assistant
messages, or whole conversations that start with the prompt. Without ``prompt``, ``chosen`` and
``rejected`` must be conversations; their shared opening turns are the prompt.

The canonical preference record (``preferences/{train,test}.jsonl``)::

    {"id": str,
     "prompt":   [message, ...],          # canonical messages (lmforge.data.chat_formats), not empty
     "chosen":   [assistant message, ...],
     "rejected": [assistant message, ...]}

``id`` is the source's ``id`` when it has one, else the SHA-256 of the canonical content. A record
whose chosen and rejected answers are the same teaches nothing and is skipped.
"""

from __future__ import annotations

from typing import Any

from lmforge.data.chat_formats import (
    RecordProblem,
    content_hash,
    message,
    message_list,
    required,
    source_id,
)


def _answer(value: Any, field: str) -> list[dict]:
    return [message("assistant", value)] if isinstance(value, str) else message_list(value, field)


def _shared_prefix(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _completion(messages: list[dict], field: str) -> list[dict]:
    if not messages:
        raise RecordProblem("empty_turn", f"`{field}` has no turn after the prompt")
    for msg in messages:
        if msg["role"] != "assistant":
            raise RecordProblem("bad_completion", f"`{field}` has a {msg['role']} turn after the prompt; chosen "
                                "and rejected hold assistant turns (or whole conversations that share the prompt)")
    return messages


def from_preference(raw: dict) -> dict:
    """The canonical preference record of ``raw``; RecordProblem when it has none."""
    chosen = _answer(required(raw, "chosen", "preference"), "chosen")
    rejected = _answer(required(raw, "rejected", "preference"), "rejected")
    if raw.get("prompt") is None:
        # Implicit prompt: two conversations that share their opening turns.
        if isinstance(raw["chosen"], str) or isinstance(raw["rejected"], str):
            raise RecordProblem("missing_field", "no `prompt`, and string chosen/rejected answers carry none")
        shared = _shared_prefix(chosen, rejected)
        while shared and chosen[shared - 1]["role"] == "assistant":
            shared -= 1  # the prompt ends before the answers start
        prompt = chosen[:shared]
    else:
        value = raw["prompt"]
        prompt = [message("user", value)] if isinstance(value, str) else message_list(value, "prompt")
        system = raw.get("system")
        if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
            prompt = [message("system", system), *prompt]
    if not prompt:
        raise RecordProblem("no_prompt", "chosen and rejected share no opening turns to use as the prompt")
    for answer in (chosen, rejected):
        if answer[: len(prompt)] == prompt and len(answer) > len(prompt):
            answer[:] = answer[len(prompt):]  # a whole conversation: keep what follows the prompt
    chosen, rejected = _completion(chosen, "chosen"), _completion(rejected, "rejected")
    if chosen == rejected:
        raise RecordProblem("identical_choices", "chosen and rejected are the same answer")
    body = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {"id": source_id(raw) or content_hash(body), **body}
