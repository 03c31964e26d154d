"""Tool calls in a model's output text: the formats the chat endpoint parses, one class per format.

A parser reads generated text piece by piece (:meth:`ToolParser.feed`, then :meth:`ToolParser.finish`)
and hands back, in order, plain content and whole :class:`ParsedCall` s; the non-streamed answer
feeds the whole text at once, so a streamed answer and a whole one always agree. A parser also
writes the grammar (an xgrammar structural tag, plain JSON here) that forces its format when a
request forces a call (``tool_choice: required`` or a named function).

One format today, the default, ``hermes``: the Hermes / Qwen convention that many open models and
every template of :mod:`lmforge.model.prompt` use::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block whose body is not a JSON object with a known ``name`` and an object of ``arguments`` is
not a call: its text stays content, so nothing a model writes is lost. The tags are found as text:
a ``</tool_call>`` inside an argument string would end the block early (no model of this format
writes one). Another format is a class with the same methods, added to :data:`PARSERS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ParsedCall:
    """One function call: its name and its arguments as JSON text (OpenAI's ``function.arguments``)."""

    name: str
    arguments: str


Piece = str | ParsedCall
"""What a parser hands back: content text, or a whole call."""


class ToolParser(Protocol):
    """Splits generated text into content and calls; one instance per response."""

    def feed(self, text: str) -> list[Piece]:
        """The content and calls that ``text`` (the next piece of output) completes; text that may
        still turn out to open a call is held back."""
        ...

    def finish(self) -> list[Piece]:
        """Whatever was held back, at the end of the output."""
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
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        out: list[Piece] = []
        while True:
            if self._in_call:
                end = self._buffer.find(self.CLOSE)
                if end < 0:
                    return out  # the block is not finished: a call is handed out whole or not at all
                out.append(self._block(self._buffer[:end], closed=True))
                self._buffer, self._in_call = self._buffer[end + len(self.CLOSE):], False
                continue
            start = self._buffer.find(self.OPEN)
            if start < 0:
                # Hold back a tail that could be the start of an opening tag cut between two pieces.
                keep = _partial_suffix(self._buffer, self.OPEN)
                content, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                return out + ([content] if content else [])
            if start:
                out.append(self._buffer[:start])
            self._buffer, self._in_call = self._buffer[start + len(self.OPEN):], True

    def finish(self) -> list[Piece]:
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            # A model may end its last block with end-of-turn instead of the closing tag.
            return [self._block(rest, closed=False)]
        return [rest] if rest else []

    def _block(self, body: str, closed: bool) -> Piece:
        call = self.call_of(body)
        if call is not None:
            return call
        return self.OPEN + body + (self.CLOSE if closed else "")

    def call_of(self, body: str) -> ParsedCall | None:
        """The call a block's body holds, or None when it holds none this request offers."""
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
        return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))

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


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


PARSERS: dict[str, Callable[[Collection[str]], ToolParser]] = {"hermes": HermesParser}
"""Tool-call formats by name; ``hermes`` is the default (the format of lmforge's templates)."""
DEFAULT_PARSER = "hermes"
