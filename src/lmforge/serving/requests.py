"""What a request is, what it returns, and how results travel from the engine thread to callers.

The engine thread calls a request's ``sink`` for every :class:`Delta`; :class:`GenerationStream`
is the sink that forwards them into an asyncio queue, so HTTP handlers can ``async for`` them.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Callable

from lmforge.errors import ServingError
from lmforge.serving.sampling import SamplingParams, TokenLogprob


class RequestError(ServingError):
    """A request the engine cannot serve as asked; ``param`` names the request field at fault."""

    def __init__(self, cause: str, fix: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(cause, fix)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Completion:
    """A finished request. ``token_ids`` include a final EOS token when the model produced one."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class Delta:
    """New text of a streamed request; the last delta carries the whole :class:`Completion`."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    completion: Completion | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.completion.finish_reason if self.completion else None


@dataclass
class Request:
    """One queued request as the engine thread sees it."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Delta | BaseException], None]  # called from the engine thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # set once the final delta or an error was sent; later sends are dropped


class GenerationStream:
    """Async iterator over one request's deltas; the request is queued on creation."""

    def __init__(self, submit: Callable[..., Request], prompt_ids: list[int], params: SamplingParams) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._done = False
        self.prompt_tokens = len(prompt_ids)
        self._request = submit(prompt_ids, params, self._deliver)

    def _deliver(self, item: Delta | BaseException) -> None:
        # Runs on the engine thread: hand over to the event loop that owns the queue.
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> "GenerationStream":
        return self

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.completion is not None
        return item

    def cancel(self) -> None:
        """Stop decoding this request (e.g. the client disconnected); safe to call after it finished."""
        self._request.cancelled.set()

    async def result(self) -> Completion:
        try:
            async for delta in self:
                if delta.completion is not None:
                    return delta.completion
        finally:
            self.cancel()
        raise ServingError("the request ended without a result", "retry the request")  # unreachable by design


def send(request: Request, item: Delta | BaseException) -> None:
    """Hand ``item`` to the request's consumer, at most once after the final delta or an error."""
    if request.finished:
        return
    request.finished = isinstance(item, BaseException) or item.completion is not None
    try:
        request.sink(item)
    except RuntimeError:
        # The consumer's event loop is gone (client or server shut down): stop decoding for it.
        request.cancelled.set()
