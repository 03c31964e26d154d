"""The shapes of tool calling in chat completions, as OpenAI's API defines them.

In a request: ``tools`` (function tools, each with a JSON-schema ``parameters``), ``tool_choice``
(``none``, ``auto``, ``required`` or ``{"type": "function", "function": {"name": ...}}``), and in
``messages`` an assistant turn's ``tool_calls`` and ``tool`` turns answering them by
``tool_call_id``. In a response: ``message.tool_calls``, and in a stream ``delta.tool_calls``, each
entry with its ``index`` (the name comes first, the arguments after). What these fields must agree
on across the request (a named tool that exists, a result that answers an earlier call, a schema
that is one) is checked by ``tools.py``, which names the field at fault.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.serving.api.text import Text

_STRICT = ConfigDict(extra="forbid", strict=True)
MAX_TOOLS = 128  # OpenAI's own bound on tools per request

# OpenAI's rule for a function's name: a-z, A-Z, 0-9, underscores and dashes, at most 64 characters.
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class FunctionDefinition(BaseModel):
    """``tools[i].function``."""

    model_config = _STRICT

    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="JSON Schema of the arguments object; none means the function takes no arguments.")
    strict: bool | None = None  # a forced call always follows the schema; an auto one is parsed as written

    @property
    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class FunctionTool(BaseModel):
    """One entry of ``tools``."""

    model_config = _STRICT

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT

    name: FunctionName


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call exactly this function."""

    model_config = _STRICT

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as JSON text."""

    name: Text
    arguments: Text


class ToolCall(BaseModel):
    """An entry of an assistant message's ``tool_calls`` (in a request's history or a response)."""

    model_config = ConfigDict(strict=True)

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A piece of a streamed call: the first for a call holds its ``id``, ``type`` and name, the next its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


def call_id() -> str:
    """A new call's id, in OpenAI's form."""
    return f"call_{uuid.uuid4().hex[:24]}"
