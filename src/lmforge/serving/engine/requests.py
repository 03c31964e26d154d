"""What a request is, what it returns, and how results travel from the engine thread to callers.

The engine thread calls a request's ``sink`` for every :class:`Delta`; :class:`GenerationStream`
is the sink that forwards them into an asyncio queue, so HTTP handlers can ``async for`` them, and
:class:`CompletionCollector` the one that blocking callers (``Engine.generate``, benchmarks) wait on.
A sink wrapped in :class:`FinalOnly` (the collector's, a stream that is not streamed) receives only
the final delta: the engine then skips the per-token deltas and, without stop strings, the per-token text.
:func:`token_budget` and :func:`slot_of` check what a request asks for (its length, its adapter).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from lmforge.core.errors import ServingError
from lmforge.serving.engine.errors import RequestError
from lmforge.serving.engine.sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from lmforge.serving.engine.structured import GrammarState


@dataclass(frozen=True)
class Completion:
    """A finished request. ``token_ids`` include a final EOS token when the model produced one."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS or stop string) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # one per prompt token (echo)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)


@dataclass(frozen=True)
class Delta:
    """New text of a streamed request; the last delta carries the whole :class:`Completion`.
    The first delta of a request that asked for prompt logprobs carries them."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    completion: Completion | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.completion.finish_reason if self.completion else None


class FinalOnly:
    """Marks a sink that reads only a request's final delta (the one with its :class:`Completion`) or
    its error. The engine sends it nothing else, and decodes the text of such a request once, when it
    finishes, unless a stop string or ``Request.ends_output`` needs the text token by token: the
    :class:`Completion` is the same either way."""

    __slots__ = ("deliver",)

    def __init__(self, deliver: Callable[[Delta | BaseException], None]) -> None:
        self.deliver = deliver

    def __call__(self, item: Delta | BaseException) -> None:
        self.deliver(item)


@dataclass
class Request:
    """One queued request as the engine thread sees it."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Delta | BaseException], None]  # called from the engine thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # set once the final delta or an error was sent; later sends are dropped
    arrived: float = field(default_factory=time.perf_counter)  # for time-to-first-token
    adapter: int = 0  # LoRA adapter slot (adapters/lora_slots.py); 0 is the plain base
    # params.response_format's matcher, its first mask filled on the submitting thread (engine/structured.py)
    grammar: GrammarState | None = None
    # Fed each piece of output text on the engine thread; True ends the output there, finish "stop"
    # (a tool call with parallel_tool_calls false: api/tools.py). Set before the request can be admitted.
    ends_output: Callable[[str], bool] | None = None
    streamed: bool = field(init=False)  # False: the sink is FinalOnly (no per-token deltas)

    def __post_init__(self) -> None:
        self.streamed = not isinstance(self.sink, FinalOnly)


class GenerationStream:
    """Async iterator over one request's deltas; the request is queued on creation. ``streamed``
    False: only :meth:`result` is read, so only the final delta comes (:class:`FinalOnly`)."""

    def __init__(self, submit: Callable[..., Request], prompt_ids: list[int], params: SamplingParams,
                 ends_output: Callable[[str], bool] | None = None, streamed: bool = True) -> None:
        self._inbox = _inbox(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._done = False
        self.prompt_tokens = len(prompt_ids)
        self._request = submit(prompt_ids, params, self._deliver if streamed else FinalOnly(self._deliver))
        # Race-free when submitted under Engine.admission_held (as Choices.submit does): not yet admitted.
        self._request.ends_output = ends_output

    def _deliver(self, item: Delta | BaseException) -> None:
        # Runs on the engine thread: hand over to the event loop that owns the queue.
        self._inbox.put(self._queue, item)

    def __aiter__(self) -> GenerationStream:
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


class CompletionCollector:
    """The blocking counterpart of :class:`GenerationStream`: the final results of ``n`` requests.

    ``sink(i)`` is request ``i``'s sink; :meth:`wait` blocks until every request has finished and
    returns their completions in order, raising the first request's error if any failed."""

    def __init__(self, n: int) -> None:
        self.results: list[Completion | BaseException | None] = [None] * n
        self._finished = threading.Semaphore(0)

    def sink(self, i: int) -> FinalOnly:
        def deliver(item: Delta | BaseException) -> None:
            if isinstance(item, BaseException) or item.completion is not None:
                self.results[i] = item if isinstance(item, BaseException) else item.completion
                self._finished.release()

        return FinalOnly(deliver)

    def wait(self, timeout_s: float | None = None) -> list[Completion]:
        for _ in self.results:
            if not self._finished.acquire(timeout=timeout_s):
                raise TimeoutError(f"the engine did not finish the requests within {timeout_s} s")
        for result in self.results:
            if isinstance(result, BaseException):
                raise result
        return cast(list[Completion], self.results)  # every request finished, none with an error


class _Inbox:
    """Deltas from the engine thread for the queues of one event loop, handed over in batches.

    ``call_soon_threadsafe`` per delta costs the engine thread a handle and a write to the loop's
    wake-up pipe, and the loop a wake-up, per token of every stream (64 each step at 64 streams). Here
    the first delta of a batch schedules one hand-over and the deltas after it, until that runs, join
    it: each queue still gets its deltas in order, and none later than it would have."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Delta | BaseException], Delta | BaseException]] = []
        self._scheduled = False

    def put(self, queue: asyncio.Queue[Delta | BaseException], item: Delta | BaseException) -> None:
        """Called on the engine thread; RuntimeError when the loop is closed (``send`` cancels then)."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:
            with self._lock:  # the loop is gone: nothing will read these, and the next put raises too
                self._items.clear()
                self._scheduled = False
            raise

    def _hand_over(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


# One inbox per event loop (an HTTP server has one; tests may run several at once), dropped with its loop.
_INBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()
_INBOXES_LOCK = threading.Lock()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    with _INBOXES_LOCK:
        inbox = _INBOXES.get(loop)
        if inbox is None:
            inbox = _INBOXES[loop] = _Inbox(loop)
        return inbox


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


def token_budget(context_window: int, prompt_tokens: int, max_tokens: int | None, default: int,
                 virtual_tokens: int = 0) -> int:
    """The max_tokens to use: the request's, checked against the context window, or ``default``
    shrunk to fit. Raises :class:`RequestError` naming the numbers when they cannot fit.
    ``virtual_tokens``: a prompt-learning adapter's, which take room before every prompt."""
    room = context_window - virtual_tokens - prompt_tokens
    if max_tokens is None and room >= 1:
        return min(default, room)
    if max_tokens is None or max_tokens > room:
        asked = default if max_tokens is None else max_tokens
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens{_virtual(virtual_tokens)} and max_tokens is {asked}: "
            f"{virtual_tokens + prompt_tokens + asked} exceeds the model's context window of {context_window} tokens",
            "shorten the prompt or lower max_tokens",
            param="max_tokens" if max_tokens is not None else "prompt",
            code="context_length_exceeded",
        )
    return max_tokens


def slot_of(slots: Mapping[str, int], name: str | None) -> int:
    """The slot of served adapter ``name`` (None: 0, the base); :class:`RequestError` if not served."""
    if name is None:
        return 0
    if name not in slots:
        raise RequestError(f"no adapter named {name!r} is served here (adapters: {sorted(slots) or 'none'})",
                           "send the name of a served adapter, or none for the base model", param="model",
                           code="model_not_found")
    return slots[name]


def _virtual(virtual_tokens: int) -> str:
    return f", the model's adapter adds {virtual_tokens} virtual tokens before it," if virtual_tokens else ""
