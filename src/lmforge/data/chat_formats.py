"""Instruction and chat records in the formats people have, normalized to the one canonical SFT record.

Formats read (one per file, detected from its first records by :func:`detect_format`, or named in
the config's ``format``):

==================  =======================================================================
``openai``          ``{"messages": [{"role", "content", "tool_calls"?, "tool_call_id"?, "name"?}], "tools"?}``
                    (``content`` a string or a list of text parts; legacy ``function_call`` and
                    ``function`` role read as tool calls and tool results)
``sharegpt``        ``{"conversations": [{"from", "value"}], "system"?, "tools"?}``; ``from`` is
                    human/user, gpt/assistant, system, function_call (``value`` the JSON call),
                    observation/tool/function (a tool result)
``alpaca``          ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant]]}``;
                    the user turn is ``instruction``, then a blank line and ``input`` when it has one
``prompt_completion``  ``{"prompt", "completion"}``, each a string or a list of messages
==================  =======================================================================

The canonical SFT record (what ``sft/{train,test}.jsonl`` holds for these sources; later stages
build on it)::

    {"id": str,
     "messages": [{"role": "system" | "user" | "assistant" | "tool",
                   "content": str,                       # "" only on an assistant turn that calls tools
                   "tool_calls"?: [{"id"?: str, "type": "function",
                                    "function": {"name": str, "arguments": str}}],   # JSON text
                   "tool_call_id"?: str,                 # on a tool turn: the call it answers
                   "name"?: str}],
     "tools"?: [...]}                                    # the OpenAI tool definitions, as given

It is the OpenAI chat format. Every record has at least one assistant turn and ends with one (turns
after the last assistant turn are dropped: nothing in the record answers them). ``id`` is the
source's own ``id`` when it has one, else the SHA-256 of the canonical content, so an unchanged
record keeps its id, and its train/test side, from run to run. Preference records are in
:mod:`lmforge.data.preference_formats`; legacy ``{"instruction", "response"}`` pairs (the built-in
stdlib set) are read by :mod:`lmforge.data.sft`, and :func:`pair_messages` gives their canonical form.

A record that cannot be normalized raises :class:`RecordProblem` with a short reason (counted in the
collect report) and a detail that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
DETECT_RECORDS = 20  # objects looked at to detect a file's format

# ShareGPT speaker names (lower-cased) -> canonical role; function_call is an assistant tool call.
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool",
    "function_response": "tool", "ipython": "tool",
}

# Keys that tell a record's format, in the order they are tried (preference first: its records
# may also carry `prompt` or `messages`).
SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("preference", ("chosen", "rejected")),
    ("openai", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
)


class RecordProblem(ValueError):
    """Why one record was skipped: ``reason`` is the key counted in the report, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------- detection


def guess_format(record: Any) -> str | None:
    """The format whose keys ``record`` has, or None."""
    if isinstance(record, dict):
        for name, keys in SIGNATURES:
            if all(k in record for k in keys):
                return name
    return None


def detect_format(records: Iterable[Any]) -> str | None:
    """The most common format among the first :data:`DETECT_RECORDS` objects (ties: the first seen)."""
    votes: Counter[str] = Counter()
    seen = 0
    for record in records:
        if not isinstance(record, dict):
            continue
        seen += 1
        guess = guess_format(record)
        if guess is not None:
            votes[guess] += 1
        if seen >= DETECT_RECORDS:
            break
    return votes.most_common(1)[0][0] if votes else None


# ---------------------------------------------------------------- messages


def content_text(value: Any, role: str) -> str:
    """A message's content as text: a string, None (no text), or a list of text parts joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict):
                raise RecordProblem("unsupported_content",
                                    f"a {role} turn has a content part of type {part.get('type')!r}; only text is read")
            else:
                raise RecordProblem("wrong_type", f"a {role} turn's content part is a {type(part).__name__}")
        return "".join(texts)
    raise RecordProblem("wrong_type", f"a {role} turn's content is a {type(value).__name__}, not a string")


def tool_call(raw: Any) -> dict:
    """One canonical tool call from ``{"type", "function": {"name", "arguments"}, "id"?}`` or ``{"name", "arguments"}``."""
    if not isinstance(raw, dict):
        raise RecordProblem("bad_tool_call", f"a tool call is a {type(raw).__name__}, not an object")
    function = raw.get("function", raw)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise RecordProblem("bad_tool_call", "a tool call has no function name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if not isinstance(arguments, str):
        # Many datasets store arguments as an object; OpenAI's format carries them as JSON text.
        arguments = json.dumps(arguments, ensure_ascii=False)
    call: dict = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(raw.get("id"), str | int):
        call = {"id": str(raw["id"]), **call}
    return call


def message(role: str, content: Any, *, tool_calls: Any = None, tool_call_id: Any = None, name: Any = None) -> dict:
    """One canonical message, checked: text content, well-formed tool calls, no empty turn."""
    msg: dict = {"role": role, "content": content_text(content, role)}
    if tool_calls:
        if role != "assistant":
            raise RecordProblem("bad_tool_call", f"a {role} turn carries tool_calls; only assistant turns call tools")
        calls = tool_calls if isinstance(tool_calls, list) else [tool_calls]
        msg["tool_calls"] = [tool_call(c) for c in calls]
    if tool_call_id is not None and role == "tool":
        msg["tool_call_id"] = str(tool_call_id)
    if isinstance(name, str) and name:
        msg["name"] = name
    # A tool may legitimately return nothing; every other turn needs text (or, for the assistant, a call).
    if not msg["content"].strip() and role != "tool" and "tool_calls" not in msg:
        raise RecordProblem("empty_turn", f"a {role} turn has no text")
    return msg


def openai_message(raw: Any) -> dict:
    if not isinstance(raw, dict):
        raise RecordProblem("wrong_type", f"a message is a {type(raw).__name__}, not an object")
    role = raw.get("role")
    if role is None:
        raise RecordProblem("missing_role", "a message has no `role`")
    if role == "function":  # OpenAI's legacy name for a tool result
        role = "tool"
    if role not in ROLES:
        raise RecordProblem("unknown_role", f"role {role!r} is not one of {', '.join(ROLES)}")
    calls = raw.get("tool_calls") or raw.get("function_call")
    return message(role, raw.get("content"), tool_calls=calls, tool_call_id=raw.get("tool_call_id"),
                   name=raw.get("name"))


def message_list(value: Any, field: str) -> list[dict]:
    """A list of OpenAI-style messages (``field`` names it in problems)."""
    if not isinstance(value, list):
        raise RecordProblem("wrong_type", f"`{field}` is a {type(value).__name__}, not a list of messages")
    if not value:
        raise RecordProblem("empty_turn", f"`{field}` is an empty list")
    return [openai_message(m) for m in value]


def tools_list(value: Any) -> list | None:
    """Top-level tool definitions: a list, or a JSON string of one (ShareGPT stores them so)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordProblem("wrong_type", f"`tools` is a string but not JSON ({exc.msg})") from None
    if not isinstance(value, list):
        raise RecordProblem("wrong_type", f"`tools` is a {type(value).__name__}, not a list")
    return value


def content_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def chat_record(raw: dict, messages: list[dict], tools: list | None = None) -> dict:
    """The canonical SFT record: at least one assistant turn, ending with it; the source's id or a content hash."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RecordProblem("no_assistant_turn", "no assistant turn to learn from")
    body: dict = {"messages": messages[: last + 1]}
    if tools:
        body["tools"] = tools
    return {"id": source_id(raw) or content_hash(body), **body}


def source_id(raw: dict) -> str | None:
    value = raw.get("id")
    return str(value) if isinstance(value, str | int) and str(value).strip() else None


def required(raw: dict, key: str, fmt: str) -> Any:
    if key not in raw or raw[key] is None:
        raise RecordProblem("missing_field", f"no `{key}` (format {fmt})")
    return raw[key]


def text_field(raw: dict, key: str, fmt: str) -> str:
    value = required(raw, key, fmt)
    if not isinstance(value, str):
        raise RecordProblem("wrong_type", f"`{key}` is a {type(value).__name__}, not a string")
    return value


# ---------------------------------------------------------------- formats


def from_openai(raw: dict) -> dict:
    messages = message_list(required(raw, "messages", "openai"), "messages")
    return chat_record(raw, messages, tools_list(raw.get("tools")))


def from_sharegpt(raw: dict) -> dict:
    turns = required(raw, "conversations", "sharegpt")
    if not isinstance(turns, list):
        raise RecordProblem("wrong_type", f"`conversations` is a {type(turns).__name__}, not a list")
    messages = []
    system = raw.get("system")
    if isinstance(system, str) and system.strip():
        messages.append(message("system", system))
    for turn in turns:
        if not isinstance(turn, dict):
            raise RecordProblem("wrong_type", f"a turn is a {type(turn).__name__}, not an object")
        speaker = turn.get("from")
        if speaker is None:
            raise RecordProblem("missing_role", "a turn has no `from`")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise RecordProblem("unknown_role", f"`from: {speaker}` is not a ShareGPT speaker "
                                f"({', '.join(sorted(SHAREGPT_ROLES))})")
        value = turn.get("value")
        if str(speaker).lower() == "function_call":
            messages.append(message("assistant", "", tool_calls=_parsed_call(value)))
        else:
            messages.append(message(role, value))
    return chat_record(raw, messages, tools_list(raw.get("tools")))


def _parsed_call(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordProblem("bad_tool_call", f"a function_call value is not JSON ({exc.msg})") from None
    return value


def from_alpaca(raw: dict) -> dict:
    instruction = text_field(raw, "instruction", "alpaca")
    output = text_field(raw, "output", "alpaca")
    extra = raw.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordProblem("wrong_type", f"`input` is a {type(extra).__name__}, not a string")
    messages = []
    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordProblem("wrong_type", f"`system` is a {type(system).__name__}, not a string")
    if system and system.strip():
        messages.append(message("system", system))
    for pair in raw.get("history") or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordProblem("wrong_type", "`history` holds something other than [user, assistant] pairs")
        messages += [message("user", pair[0]), message("assistant", pair[1])]
    if not instruction.strip():
        raise RecordProblem("empty_turn", "`instruction` is empty")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages += [message("user", user), message("assistant", output)]
    return chat_record(raw, messages)


def from_prompt_completion(raw: dict) -> dict:
    prompt, completion = required(raw, "prompt", "prompt_completion"), required(raw, "completion", "prompt_completion")
    head = [message("user", prompt)] if isinstance(prompt, str) else message_list(prompt, "prompt")
    tail = [message("assistant", completion)] if isinstance(completion, str) else message_list(completion, "completion")
    return chat_record(raw, head + tail)


SFT_READERS: dict[str, Callable[[dict], dict]] = {
    "openai": from_openai, "sharegpt": from_sharegpt, "alpaca": from_alpaca, "prompt_completion": from_prompt_completion,
}


def pair_messages(instruction: str, response: str) -> list[dict]:
    """The canonical messages of a legacy instruction/response pair."""
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
