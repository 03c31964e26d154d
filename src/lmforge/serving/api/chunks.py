"""The server-sent chunks of a streamed completion or chat: every choice's deltas, each with its index.

Chunks of the ``n`` choices interleave as their tokens come (``api/choices.py`` merges the engine
streams); each choice ends with its own chunk holding its ``finish_reason``. With
``stream_options.include_usage``, one chunk after every choice has finished carries the usage (no
choices), as OpenAI sends it. A chat opens each choice with a ``role`` delta; its tool calls are
parsed per choice (one :class:`ToolOutput` each).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pydantic import BaseModel

from lmforge.serving.api.choices import Choices, usage_of
from lmforge.serving.api.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
)
from lmforge.serving.api.tools import ToolOutput
from lmforge.serving.engine.requests import Completion


async def completion_chunks(choices: Choices, rid: str, model: str, logprobs: bool,
                            include_usage: bool, echo: str) -> AsyncIterator[BaseModel]:
    created = int(time.time())
    offsets = [0] * len(choices.streams)
    echoed: set[int] = set()  # the choices whose first chunk (which carries the echoed prompt) went out
    finished: list[Completion] = []
    async for index, delta in choices.merged():
        entries = (delta.prompt_logprobs or ()) + delta.logprobs
        lp = CompletionLogprobs.of(entries, offsets[index]) if logprobs else None
        offsets[index] += sum(len(e.token) for e in entries)
        prefix = echo if index not in echoed else ""
        echoed.add(index)
        choice = CompletionChoice(index=index, text=prefix + delta.text, finish_reason=delta.finish_reason, logprobs=lp)
        yield CompletionResponse(id=rid, created=created, model=model, choices=[choice])
        if delta.completion is not None:
            finished.append(delta.completion)
    if include_usage and finished:
        yield CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage_of(finished))


async def chat_chunks(choices: Choices, rid: str, model: str, logprobs: bool,
                      include_usage: bool, calls: list[ToolOutput | None]) -> AsyncIterator[BaseModel]:
    created = int(time.time())
    for index in range(len(choices.streams)):
        first = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
        yield ChatCompletionChunk(id=rid, created=created, model=model, choices=[first])
    finished: list[Completion] = []
    async for index, delta in choices.merged():
        lp = ChatLogprobs.of(delta.logprobs) if logprobs else None
        output = calls[index]
        if output is None:
            pieces, finish = [ChatDelta(content=delta.text)], delta.finish_reason
        else:  # content and tool-call deltas (api/tools.py); text that may open a call waits
            pieces = output.deltas(delta.text, done=delta.completion is not None)
            finish = output.finish_reason(delta.finish_reason)
            if not pieces and (lp is not None or finish is not None):
                pieces = [ChatDelta(content="")]
        for i, piece in enumerate(pieces):  # logprobs ride on the first chunk, the finish on the last
            last = i == len(pieces) - 1
            choice = ChatChunkChoice(index=index, delta=piece, finish_reason=finish if last else None,
                                     logprobs=lp if i == 0 else None)
            yield ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice])
        if delta.completion is not None:
            finished.append(delta.completion)
    if include_usage and finished:
        yield ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage_of(finished))
