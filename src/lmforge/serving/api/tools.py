"""Tool calling in chat completions: a request's tools checked, rendered, forced and parsed.

:meth:`ToolPlan.of` checks what the request's tool fields must agree on and answers a 400 naming the
field otherwise: ``tool_choice`` without ``tools``, a named tool that is not among them, a
malformed ``parameters`` schema (or, for a forced call, one the grammar cannot enforce), a
``tool`` message whose ``tool_call_id`` answers no earlier call, and a forced call with ``stop``,
``ignore_eos`` or a ``response_format`` (the call's grammar ends the output).

Rendering: tools and the history's calls and results go through the tokenizer's chat template
(transformers' ``apply_chat_template(tools=...)``) when the template renders them, which
:func:`renders_tools` finds out once per template by rendering a probe. Otherwise, the documented
fallback: the tools become a system message (joined after a first system message's text) written
by the parser's format, an assistant turn's calls are written into its content as the model would
write them, and a ``tool`` turn becomes a user turn holding ``<tool_response>...</tool_response>``.

Decoding: with ``tool_choice`` ``required`` or a named function the output is constrained by
xgrammar to call blocks of the parser's format whose arguments follow each function's schema (a
structural tag; one call, or with ``parallel_tool_calls`` one or more), so a forced call always
parses. ``auto`` leaves the model free and parses the calls it writes; ``none`` renders the tools
but never parses. :class:`ToolOutput` turns the text into ``message.tool_calls`` (and
``finish_reason: tool_calls``), or into stream deltas: a call's id and name go out as soon as the
model has written its name, then its arguments as fragments while the model writes them (each a
valid continuation of the JSON object so far, ``tool_parsers.py``); their concatenation is the
whole answer's ``arguments``. With ``parallel_tool_calls: false`` the first call is the answer: the
engine stops the output once it is whole (:meth:`ToolOutput.ends_output`, the request's
``ends_output`` hook), and nothing after it is sent.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

from lmforge.serving.api.errors import ApiError
from lmforge.serving.api.protocol import AssistantMessage, ChatCompletionRequest, ChatDelta, ChatMessage
from lmforge.serving.api.tool_parsers import DEFAULT_PARSER, PARSERS, CallArguments, CallEnd, CallStart, ToolParser
from lmforge.serving.api.tool_protocol import (
    FunctionCall,
    FunctionCallDelta,
    FunctionTool,
    ToolCall,
    ToolCallDelta,
    call_id,
)
from lmforge.serving.engine.sampling import ResponseFormat, SamplingParams
from lmforge.serving.engine.structured import unenforced

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmforge.serving.engine.engine import Engine


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request does with tools: render them, force a call, parse calls."""

    tools: list[dict[str, Any]]  # OpenAI's shape, as the template receives them; empty without tools
    parser: ToolParser | None  # None: calls are never parsed (no tools, or tool_choice none)
    forced: ResponseFormat | None  # the grammar of a forced call
    parallel: bool

    @classmethod
    def of(cls, body: ChatCompletionRequest, parser_name: str = DEFAULT_PARSER) -> ToolPlan:
        """The request's plan; :class:`ApiError` (400, naming the field) when its tool fields disagree."""
        _check_history(body.messages)
        tools = body.tools or []
        if body.tool_choice is not None and not tools:
            raise ApiError(400, "tool_choice is set but the request has no tools; send tools, or drop tool_choice",
                           param="tool_choice", code="invalid_value")
        names = _check_tools(tools)
        choice = body.tool_choice or ("auto" if tools else "none")
        if not isinstance(choice, str) and choice.function.name not in names:
            raise ApiError(400, f"tool_choice names function {choice.function.name!r}, which is not among the tools "
                           f"({', '.join(names)}); name one of them", param="tool_choice", code="invalid_value")
        parser = PARSERS[parser_name](names) if choice != "none" else None
        forced = None
        if parser is not None and choice != "auto":
            _check_forceable(body, tools)
            called = [choice.function.name] if not isinstance(choice, str) else names
            schemas = {t.function.name: t.function.arguments_schema for t in tools if t.function.name in called}
            tag = parser.forced_format(schemas, parallel=body.parallel_tool_calls)
            forced = ResponseFormat("structural_tag", json.dumps(tag))
        dumped = [t.model_dump(exclude_none=True) for t in tools]
        return cls(dumped, parser, forced, body.parallel_tool_calls)

    @property
    def chars(self) -> int:
        """Characters the tool list adds to the prompt (checked against the prompt's bound)."""
        return len(json.dumps(self.tools)) if self.tools else 0

    def render(self, engine: Engine, messages: list[dict[str, Any]]) -> str:
        """The chat's prompt text with the tools, through the template or, where it renders none, the fallback."""
        uses_tools = bool(self.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if not uses_tools or renders_tools(engine.tokenizer):
            return engine.render_chat(messages, self.tools or None)
        parser = self.parser or PARSERS[DEFAULT_PARSER](())
        return engine.render_chat(fallback_messages(parser, messages, self.tools))

    def constrain(self, params: SamplingParams) -> SamplingParams:
        return dataclasses.replace(params, response_format=self.forced) if self.forced is not None else params

    def output(self) -> ToolOutput | None:
        """A new response's calls. A parser keeps state as it reads, so each response (each of ``n``
        choices) reads with its own copy; the plan's own parser is never fed."""
        return ToolOutput(copy.deepcopy(self.parser), self.parallel) if self.parser is not None else None


def _check_history(messages: list[ChatMessage]) -> None:
    """Every tool result answers a call of an earlier assistant turn; every call's arguments are JSON."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        for j, call in enumerate(message.tool_calls or ()):
            try:
                json.loads(call.function.arguments)
            except ValueError:
                raise ApiError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not JSON text; send the "
                               "arguments as a JSON string, as the call returned them",
                               param=f"messages[{i}].tool_calls[{j}].function.arguments",
                               code="invalid_value") from None
            called.add(call.id)
        if message.role == "tool" and message.tool_call_id not in called:
            raise ApiError(400, f"messages[{i}] is a tool result for tool_call_id {message.tool_call_id!r}, which no "
                           "earlier assistant message's tool_calls holds; answer a call the conversation made",
                           param=f"messages[{i}].tool_call_id", code="invalid_value")


def _check_tools(tools: list[FunctionTool]) -> list[str]:
    """The tools' names, each once; each ``parameters`` a valid JSON Schema of an object."""
    import jsonschema

    names: list[str] = []
    for i, tool in enumerate(tools):
        function, where = tool.function, f"tools[{i}].function"
        if function.name in names:
            raise ApiError(400, f"{where}.name {function.name!r} is given twice; give each tool a distinct name",
                           param=f"{where}.name", code="invalid_value")
        names.append(function.name)
        schema = function.arguments_schema
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            at = "/".join(str(p) for p in exc.path)
            raise ApiError(400, f"{where}.parameters is not a valid JSON Schema at #/{at}: {exc.message}; send a "
                           "valid JSON Schema (draft 2020-12)", param=f"{where}.parameters",
                           code="invalid_value") from None
        if schema.get("type") != "object":
            raise ApiError(400, f"{where}.parameters must be a JSON Schema of type object (the arguments are an "
                           f"object), got type {schema.get('type')!r}", param=f"{where}.parameters",
                           code="invalid_value")
    return names


def _check_forceable(body: ChatCompletionRequest, tools: list[FunctionTool]) -> None:
    """A forced call's grammar ends the output and must enforce each schema: refuse what would break it."""
    for field, given in (("stop", body.stops), ("ignore_eos", body.ignore_eos),
                         ("response_format", body.response_format is not None and body.response_format.type != "text")):
        if given:
            raise ApiError(400, f"{field} cannot be combined with a forced tool call (tool_choice required or a named "
                           f"function): the call's grammar ends the output; drop {field}, or use tool_choice auto",
                           param=field, code="invalid_value")
    for i, tool in enumerate(tools):
        faults = unenforced(tool.function.arguments_schema)
        if faults:
            raise ApiError(400, f"tools[{i}].function.parameters uses features a forced call cannot enforce: "
                           f"{'; '.join(faults[:5])}; remove them, or use tool_choice auto",
                           param=f"tools[{i}].function.parameters", code="unsupported_schema")


_PROBE = "lmforgeprobe"
_SUPPORT: dict[str, bool] = {}  # by template source: whether it renders tools, calls and results


def renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders a tool list, an assistant's calls and a tool's result."""
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str) or not source:
        return False  # no template at all: Engine.render_chat refuses the chat with a 400
    if source not in _SUPPORT:  # a race renders the probe twice, harmlessly
        from lmforge.model.chat import render_chat

        call = {"id": "call_0", "type": "function",
                "function": {"name": f"{_PROBE}fn", "arguments": json.dumps({f"{_PROBE}arg": 1})}}
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_0", "content": f"{_PROBE}result"}]
        tools = [{"type": "function", "function": {"name": f"{_PROBE}fn", "description": f"{_PROBE}doc",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        try:
            text = render_chat(tokenizer, messages, tools)
        except (TemplateError, TypeError, ValueError, KeyError):  # a template that refuses the tool role or calls
            text = ""
        _SUPPORT[source] = all(f"{_PROBE}{part}" in text for part in ("doc", "arg", "result"))
    return _SUPPORT[source]


def fallback_messages(parser: ToolParser, messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with tools, calls and results written as plain text, for a template that renders none."""
    out = [dict(m) for m in messages]
    for m in out:
        calls = m.pop("tool_calls", None) or []
        written = [parser.render_call(c["function"]["name"], c["function"]["arguments"]) for c in calls]
        m["content"] = "\n".join(([m["content"]] if m["content"] else []) + written)
        if m["role"] == "tool":
            m.pop("tool_call_id", None)
            m.update(role="user", content=parser.render_result(m["content"]))
    if tools:
        prompt = parser.render_tools(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


class ToolOutput:
    """One response's generated text as content and calls, whole or as stream deltas."""

    def __init__(self, parser: ToolParser, parallel: bool) -> None:
        self._parser, self._parallel = parser, parallel
        # The engine's copy reads the same text on the engine thread (ends_output), before any is fed here.
        self._engine_parser = copy.deepcopy(parser) if not parallel else None
        self.calls: list[ToolCall] = []
        self._over = False  # parallel_tool_calls false and the first call is whole: the rest is not the answer

    def ends_output(self) -> Callable[[str], bool] | None:
        """With ``parallel_tool_calls`` false, the engine's hook that ends the output once its first call is
        whole (``Request.ends_output``: fed each piece of text on the engine thread); None otherwise."""
        parser = self._engine_parser
        if parser is None:
            return None
        return lambda text: any(isinstance(piece, CallEnd) for piece in parser.feed(text))

    def pieces(self, text: str, done: bool) -> list[str | ToolCallDelta]:
        """Content and call deltas that ``text`` adds (all that is left, when ``done``); ``calls`` grows with them."""
        found = self._parser.feed(text) + (self._parser.finish() if done else [])
        out: list[str | ToolCallDelta] = []
        for piece in found:
            if self._over:
                break
            if isinstance(piece, CallStart):
                call = ToolCall(id=call_id(), function=FunctionCall(name=piece.name, arguments=""))
                self.calls.append(call)
                out.append(ToolCallDelta(index=len(self.calls) - 1, id=call.id, type="function",
                                         function=FunctionCallDelta(name=piece.name, arguments="")))
            elif isinstance(piece, CallArguments):
                self.calls[-1].function.arguments += piece.text
                if out and isinstance(out[-1], ToolCallDelta) and out[-1].id is None:  # one delta per feed
                    out[-1].function.arguments = (out[-1].function.arguments or "") + piece.text
                else:
                    out.append(ToolCallDelta(index=len(self.calls) - 1, function=FunctionCallDelta(arguments=piece.text)))
            elif isinstance(piece, CallEnd):
                self._over = not self._parallel
            elif not (self.calls and piece.isspace()):  # the newlines between call blocks are the format's
                out.append(piece)
        return out

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.calls else reason

    def message(self, text: str) -> AssistantMessage:
        content = "".join(p for p in self.pieces(text, done=True) if isinstance(p, str))
        if not self.calls:
            return AssistantMessage(content=content)
        return AssistantMessage(content=content.strip() or None, tool_calls=self.calls)

    def deltas(self, text: str, done: bool) -> list[ChatDelta]:
        """Stream deltas for ``text``: content as it is known not to open a call, a call's id and name
        once written, its arguments as they come."""
        return [ChatDelta(content=p) if isinstance(p, str) else ChatDelta(tool_calls=[p])
                for p in self.pieces(text, done)]
