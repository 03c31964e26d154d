"""Tool calls in a model's output text: the formats the chat endpoint parses, one class per format.

A parser reads generated text piece by piece (:meth:`ToolParser.feed`, then :meth:`ToolParser.finish`)
and hands back, in order, plain content and the events of each call: :class:`CallStart` (its name),
:class:`CallArguments` (fragments of its arguments' JSON text) and :class:`CallEnd`. The
non-streamed answer feeds the whole text at once, so a streamed answer and a whole one always agree.
A parser also writes the grammar (an xgrammar structural tag, plain JSON here) that forces its
format when a request forces a call (``tool_choice: required`` or a named function).

One format today, the default, ``hermes``: the Hermes / Qwen convention that many open models and
every template of :mod:`lmforge.model.prompt` use::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Streaming: a block that opens as above, ``{"name": <a function of the request>, "arguments": {``,
starts its call as soon as that much is written, and its arguments then go out as the model writes
them, each fragment checked to continue a valid JSON object (``json_prefix.py``): the arguments are
the model's own text, byte for byte. The call ends at the arguments' closing brace; what the block
holds after it (normally ``}`` and the closing tag) is not content. Should the model break the JSON
or stop mid-object, the arguments end where the valid text ended (OpenAI's calls can be cut the same
way; the finish reason says ``length``).

Any other block (keys in another order, arguments written as a JSON string) is read whole at its
closing tag: it is a call if its body is a JSON object with a known ``name`` and an object of
``arguments`` (whose JSON is then re-written compactly), and otherwise stays content, so nothing a
model writes is lost. The tags are found as text outside a streamed call's arguments: a
``</tool_call>`` inside such a block's argument string would end it early (no model of this format
writes one). Another format is a class with the same methods, added to :data:`PARSERS`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lmforge.serving.api.json_prefix import JsonPrefix


@dataclass(frozen=True)
class CallStart:
    """A call begins: the function it calls."""

    name: str


@dataclass(frozen=True)
class CallArguments:
    """A fragment of the current call's arguments (JSON text; the fragments concatenate to OpenAI's ``arguments``)."""

    text: str


@dataclass(frozen=True)
class CallEnd:
    """The current call is whole."""


Piece = str | CallStart | CallArguments | CallEnd
"""What a parser hands back: content text, or an event of a call."""


class ToolParser(Protocol):
    """Splits generated text into content and calls; one instance per response."""

    def feed(self, text: str) -> list[Piece]:
        """The content and call events that ``text`` (the next piece of output) completes; text that
        may still turn out to open a call is held back."""
        ...

    def finish(self) -> list[Piece]:
        """Whatever was held back, at the end of the output (a call left open is ended)."""
        ...

    def forced_format(self, schemas: Mapping[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
        """The structural tag (xgrammar's JSON form) that lets a model write only calls in this format."""
        ...

    def render_tools(self, tools: list[dict[str, Any]]) -> str:
        """The tools and how to call them, as a system prompt (for chat templates that render no tools)."""
        ...

    def render_call(self, name: str, arguments: str) -> str:
        """An earlier call as the model wrote it (for chat templates that render no tool calls)."""
        ...

    def render_result(self, content: str) -> str:
        """A tool's result as a user turn's text (for chat templates that have no tool role)."""
        ...


class HermesParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, anywhere in the output."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, names: Collection[str]) -> None:
        self._names = set(names)
        self._buffer = ""  # text not yet handed out (in "args": not yet read by the JSON scanner)
        # Where the reading stands: "text" (content), "head" (a block's opening, before we know
        # whether it streams), "args" (a streamed call's arguments), "tail" (the rest of a streamed
        # block), "whole" (a block read whole at its closing tag).
        self._mode = "text"
        self._args = JsonPrefix()
        self._args_text = ""
        self._sent = 0  # characters of _args_text handed out

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        out: list[Piece] = []
        while getattr(self, f"_read_{self._mode}")(out):
            pass
        return out

    def finish(self) -> list[Piece]:
        rest, self._buffer = self._buffer, ""
        mode, self._mode = self._mode, "text"
        if mode == "text":
            return [rest] if rest else []
        if mode == "head":  # the output ended before the block could be a call: its text is content
            return [self.OPEN + rest]
        if mode == "whole":  # a model may end its last block with end-of-turn instead of the closing tag
            return self._block(rest, closed=False)
        if mode == "args":
            return [CallEnd()]  # what was read is out already
        return []  # tail

    def _read_text(self, out: list[Piece]) -> bool:
        start = self._buffer.find(self.OPEN)
        if start < 0:
            # Hold back a tail that could be the start of an opening tag cut between two pieces.
            keep = _partial_suffix(self._buffer, self.OPEN)
            content, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
            out.extend([content] if content else [])
            return False
        if start:
            out.append(self._buffer[:start])
        self._buffer, self._mode = self._buffer[start + len(self.OPEN):], "head"
        return True

    def _read_head(self, out: list[Piece]) -> bool:
        found = _streamed_head(self._buffer, self._names)
        if found is None:
            self._mode = "whole"
            return True
        if not found:
            return False  # not decided yet
        name, end = found
        out.append(CallStart(name))
        self._mode, self._buffer = "args", self._buffer[end:]
        self._args, self._args_text, self._sent = JsonPrefix(), "", 0
        return True

    def _read_args(self, out: list[Piece]) -> bool:
        used = self._args.feed(self._buffer)
        self._args_text += self._buffer[:used]
        self._buffer = self._buffer[used:]
        out.extend(self._more_arguments())
        if not (self._args.done or self._args.failed):
            return False
        out.append(CallEnd())
        self._mode = "tail"
        return True

    def _more_arguments(self) -> list[Piece]:
        fragment, self._sent = self._args_text[self._sent:], len(self._args_text)
        return [CallArguments(fragment)] if fragment else []

    def _read_tail(self, out: list[Piece]) -> bool:
        end = self._buffer.find(self.CLOSE)
        if end < 0:  # keep only what could begin the closing tag
            keep = _partial_suffix(self._buffer, self.CLOSE)
            self._buffer = self._buffer[len(self._buffer) - keep:] if keep else ""
            return False
        self._buffer, self._mode = self._buffer[end + len(self.CLOSE):], "text"
        return True

    def _read_whole(self, out: list[Piece]) -> bool:
        end = self._buffer.find(self.CLOSE)
        if end < 0:
            return False  # the block is not finished: it is handed out whole or not at all
        out.extend(self._block(self._buffer[:end], closed=True))
        self._buffer, self._mode = self._buffer[end + len(self.CLOSE):], "text"
        return True

    def _block(self, body: str, closed: bool) -> list[Piece]:
        call = self.call_of(body)
        if call is not None:
            return [CallStart(call[0]), CallArguments(call[1]), CallEnd()]
        return [self.OPEN + body + (self.CLOSE if closed else "")]

    def call_of(self, body: str) -> tuple[str, str] | None:
        """The call (name, arguments' JSON text) a whole block's body holds, or None when it holds
        none this request offers."""
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self._names:
            return None
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return obj["name"], json.dumps(arguments, ensure_ascii=False)

    def forced_format(self, schemas: Mapping[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
        """The structural tag (xgrammar's JSON form) that lets the model write only calls of this
        format: one block per call, each of a function of ``schemas`` (name -> JSON schema of its
        arguments) with arguments that follow its schema; with ``parallel``, one or more blocks
        separated by a newline, else exactly one. The text matches what the templates render."""
        tags = [{"type": "tag", "begin": f'{self.OPEN}\n{{"name": {json.dumps(name)}, "arguments": ',
                 "content": {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}, "end": f"}}\n{self.CLOSE}"}
                for name, schema in schemas.items()]
        return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                                                     "at_least_one": True, "stop_after_first": not parallel}}

    def render_tools(self, tools: list[dict[str, Any]]) -> str:
        listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        return (f"# Tools\n\nYou may call one or more functions. Their signatures:\n<tools>\n{listed}\n</tools>\n\n"
                f"To call a function, answer with {{\"name\": ..., \"arguments\": ...}} inside "
                f"{self.OPEN}{self.CLOSE} tags.")

    def render_call(self, name: str, arguments: str) -> str:
        return f'{self.OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{self.CLOSE}'

    def render_result(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"


_NAME = re.compile(r'"([A-Za-z0-9_-]*)')  # OpenAI's function names: no escapes to decode
_HEAD = ("{", '"name"', ":", _NAME, ",", '"arguments"', ":")


def _streamed_head(text: str, names: set[str]) -> tuple[str, int] | tuple[()] | None:
    """Whether a block's ``text`` opens a streamed call, ``{"name": NAME, "arguments": {``, with NAME
    one of ``names``: (NAME, where the arguments begin) if so, ``()`` while ``text`` could still
    become that opening, None once it cannot."""
    i, name = 0, ""
    for part in _HEAD:
        i = _skip_space(text, i)
        if i == len(text):
            return ()
        if isinstance(part, str):
            if not text.startswith(part, i):
                return () if part.startswith(text[i:]) else None
            i += len(part)
            continue
        match = part.match(text, i)
        if match is None:
            return None
        if match.end() == len(text):
            return ()
        if text[match.end()] != '"' or match.group(1) not in names:
            return None
        name, i = match.group(1), match.end() + 1
    i = _skip_space(text, i)
    if i == len(text):
        return ()
    return (name, i) if text[i] == "{" else None  # the arguments' opening brace: they start here


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


PARSERS: dict[str, Callable[[Collection[str]], ToolParser]] = {"hermes": HermesParser}
"""Tool-call formats by name; ``hermes`` is the default (the format of lmforge's templates)."""
DEFAULT_PARSER = "hermes"
