"""Request and response shapes of the OpenAI-compatible HTTP API (completions and chat).

Requests validate their ranges here, at the edge, so the engine only ever sees sane values.
Fields OpenAI defines but this server cannot honor (penalties) are accepted only at
their neutral value and refused otherwise, and unknown fields are refused, so a client never
silently gets something other than what it asked for. Types are strict, as in OpenAI's API
(``"stream": "yes"`` or ``"max_tokens": "5"`` is refused, not coerced), and text must be Unicode:
JSON can spell a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer or UTF-8 encoder takes,
so it is refused here by name. The limits the server's config sets (``serving.limits``: stop
strings, logprobs, prompt length) are checked by ``limits.py``. ``echo`` (completions) returns the prompt
before the completion and, with ``logprobs``, the prompt's log-probabilities (the first token's is
null, as in OpenAI's API); ``max_tokens: 0`` with ``echo`` scores a prompt without generating.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmforge.serving.api.response_format import ResponseFormatRequest
from lmforge.serving.api.text import Text
from lmforge.serving.api.tool_protocol import MAX_TOOLS, FunctionTool, ToolCall, ToolCallDelta, ToolChoice
from lmforge.serving.engine.sampling import SamplingParams, TokenLogprob

# ---------------------------------------------------------------- requests

# No list in a request may hold more: validating each item costs time on the event loop before any
# limit of serving.limits can be checked (an 8 MiB body can hold millions of empty messages).
MAX_ITEMS = 2048
MAX_STOP = 64  # serving.limits.max_stop's own bound

# OpenAI's API refuses "5" for an integer and "yes" for a boolean; so do we (no coercion).
_STRICT = ConfigDict(extra="forbid", strict=True)


MAX_KEYS = 64  # in one request object: a few dozen fields exist


def few_keys(data: Any) -> Any:
    """``data`` unless it is an object of more than MAX_KEYS keys, which is refused as a whole: one
    "extra inputs" error per unknown key of a 700,000-key object took seconds to build."""
    if isinstance(data, dict) and len(data) > MAX_KEYS:
        raise ValueError(f"the object has {len(data)} keys; a request object has at most {MAX_KEYS}")
    return data


class StreamOptions(BaseModel):
    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _few_keys(cls, data: Any) -> Any:
        return few_keys(data)
    include_usage: bool = Field(False, description="Send a last chunk with token usage before [DONE].")


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = _STRICT

    @model_validator(mode="before")
    @classmethod
    def _few_keys(cls, data: Any) -> Any:
        return few_keys(data)

    model: Text | None = Field(None, description="Must name the served model when given.")
    max_tokens: int | None = Field(None, ge=0, description="Tokens to generate; default serving.max_new_tokens.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="Keep only the k most likely tokens; 0 or -1 is off.")
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = Field(
        None, description="Strings that end the completion (serving.limits.max_stop).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    n: int = Field(1, ge=1, description="Choices to return, each sampled on its own (serving.limits.max_n).")
    presence_penalty: float = Field(0.0, ge=0, le=0, description="Not supported; must be 0.")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="Not supported; must be 0.")
    user: Text | None = None
    ignore_eos: bool = Field(False, description="lmforge (and vLLM) extension: generate max_tokens even past EOS.")
    response_format: ResponseFormatRequest | None = Field(
        None, description="Constrain the output to JSON: {type: json_object} or {type: json_schema, json_schema: "
        "{name, schema, strict}}.")

    @model_validator(mode="after")
    def _format_alone(self) -> _SamplingRequest:
        if self.response_format is not None and self.response_format.type != "text":
            # A stop string could cut the JSON short; the grammar itself ends the output.
            if self.stop:
                raise ValueError("stop: cannot be combined with response_format (the grammar ends the output)")
            if self.ignore_eos:
                raise ValueError("ignore_eos: cannot be combined with response_format (the grammar ends the output)")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            stop=tuple(self.stop or ()),
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=self.ignore_eos,
            response_format=self.response_format.spec() if self.response_format is not None else None,
        )

    @property
    def stops(self) -> list[str]:
        """The ``stop`` strings as a list (the validator already made it one; the field's type cannot say so)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: Text | Annotated[list[Text], Field(max_length=MAX_ITEMS)] = Field(
        ..., description="One prompt (a list of exactly one is accepted).")
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives reported per token.")
    echo: bool = Field(False, description="Return the prompt (and its logprobs) before the completion.")
    best_of: int | None = Field(None, ge=1, description="Candidates to generate; the n of highest mean token "
                                "logprob are returned (api/choices.py; serving.limits.max_n; not with stream).")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got {len(value)}")
        return value

    @model_validator(mode="after")
    def _zero_tokens_only_to_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: must be at least 1 (0 is allowed only with echo, to score the prompt)")
        return self

    @property
    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    @property
    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"] = "text"
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    # None only in an assistant turn that holds tool_calls (the validator checks).
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_ITEMS)] | None = None
    name: Text | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_ITEMS)] | None = None  # assistant turns
    tool_call_id: Text | None = None  # tool turns: the call this result answers

    @model_validator(mode="after")
    def _fields_of_role(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: is required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls: only an assistant message holds tool_calls, not a {self.role} message")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("tool_call_id: a tool message needs one (the id of the call it answers), no other has one")
        return self

    @property
    def chars(self) -> int:
        """Characters the message puts in the prompt (its name, text and calls; the template adds a few more)."""
        calls = sum(len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or ())
        return len(self.name or "") + len(self.text) + calls

    @property
    def text(self) -> str:
        content = self.content or ""
        return content if isinstance(content, str) else "".join(p.text for p in content)

    def as_template_input(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.text}
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_ITEMS)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens.")
    logprobs: bool = Field(False, description="Report the log-probability of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token (needs logprobs).")
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="Functions the model may call (api/tools.py checks them against tool_choice and messages).")
    tool_choice: ToolChoice | None = Field(None, description="none, auto (the default with tools), required, or "
                                           "{type: function, function: {name}}: a forced call follows its schema.")
    parallel_tool_calls: bool = Field(True, description="Allow several calls in one answer; false keeps the first.")

    @model_validator(mode="after")
    def _merge_names(self) -> ChatCompletionRequest:
        if self.max_tokens == 0:
            raise ValueError("max_tokens: must be at least 1")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send only one")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def logprobs_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's field)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    @classmethod
    def of(cls, entries: tuple[TokenLogprob, ...], start_offset: int = 0) -> CompletionLogprobs:
        out = cls()
        offset = start_offset
        for e in entries:
            out.tokens.append(e.token)
            out.token_logprobs.append(e.logprob)
            out.top_logprobs.append(dict(e.top) if e.logprob is not None else None)
            out.text_offset.append(offset)
            offset += len(e.token)
        return out


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]

    @classmethod
    def of(cls, entries: tuple[TokenLogprob, ...]) -> ChatLogprobs:
        # A chat reports generated tokens only, whose logprob is set (a prompt's first token has
        # none); the models below validate it.
        def one(token: str, logprob: float | None) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return cls(
            content=[
                ChatTokenLogprob(**one(e.token, e.logprob), top_logprobs=[TopLogprob(**one(t, lp)) for t, lp in e.top])
                for e in entries
            ]
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's base model (serving.adapters)
    # What the deploy stage serves (registered_name, version, alias, run_id, model_ref); None when unknown.
    metadata: dict[str, str] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
