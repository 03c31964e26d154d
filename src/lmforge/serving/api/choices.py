"""Several choices per request: OpenAI's ``n`` (completions and chat) and ``best_of`` (completions).

A request of ``n`` choices becomes ``n`` engine requests of the same prompt, queued together (under
:meth:`Engine.admission_held`, in order) so they are admitted together. They share the prompt's KV
through the prefix cache (``model/block_pool.py``): the first sibling prefills the prompt, and the
others borrow its full blocks while it writes them (``model/kv_cache.py``), prefilling only the
prompt's last, partial block, in the same forward. The queue bound
(``serving.scheduler.max_queue``) counts requests, not choices: only the first sibling is bounded,
so one request's choices are refused or queued as a whole.

Each choice samples on its own: choice 0 uses the request's ``seed`` (so ``n: 1`` is unchanged) and
choice ``i`` a seed derived from it (:func:`choice_seed`), so a seeded request is reproducible and
its choices still differ. Unseeded choices draw from their own unseeded sources.

``best_of`` generates that many candidates (with the sampled token's logprob recorded even when the
client asked for none) and returns the ``n`` whose tokens have the highest mean log-probability
("the highest log probability per token", as OpenAI's API defines it), best first. The candidates
are ranked only once all have finished, so ``best_of`` > ``n`` cannot be streamed.

Usage counts the prompt once and the completion tokens of every sequence generated (every
candidate of ``best_of``, as OpenAI bills them); ``cached_tokens`` is the fewest any sibling found
cached: what that one prompt counted would have cost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from lmforge.serving.api.errors import ApiError
from lmforge.serving.api.protocol import Usage
from lmforge.serving.engine.requests import Completion, Delta, GenerationStream
from lmforge.serving.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from lmforge.serving.engine.engine import Engine


def choice_seed(seed: int, index: int) -> int:
    """Choice ``index``'s seed: the request's own for choice 0, else a 63-bit number derived from both
    (a hash, so choice 1 of seed 7 does not replay choice 0 of seed 8)."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"lmforge-choice:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def candidates(n: int, best_of: int | None, stream: bool) -> int:
    """How many sequences to generate for ``n`` choices among ``best_of``; 400 when a ranking would be streamed.
    The caps (``serving.limits.max_n``) are checked by ``limits.py`` first."""
    count = best_of if best_of is not None else n
    if count > n and stream:
        raise ApiError(400, f"best_of ({count}) > n ({n}) cannot be streamed: the candidates are ranked once all have "
                       "finished; drop stream, or best_of", param="best_of", code="invalid_value")
    return count


class Choices:
    """The engine requests of one API request's choices, streamed or awaited together."""

    def __init__(self, streams: list[GenerationStream]) -> None:
        self.streams = streams
        # merged()'s reads in progress, by choice index: cancel() ends them too, so a stream whose client
        # left leaves no task waiting for deltas that will never come (a cancelled request sends none).
        self._reads: dict[asyncio.Future[Delta], int] = {}

    @classmethod
    def submit(cls, engine: Engine, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
               count: int = 1, ends_output: list[Callable[[str], bool] | None] | None = None,
               streamed: bool = True) -> Choices:
        """Queue ``count`` requests of ``prompt_ids`` (seeds per :func:`choice_seed`), admitted together;
        if one is refused, those already queued are cancelled and the refusal raised. ``ends_output[i]``:
        choice ``i``'s ``Request.ends_output`` hook. ``streamed`` False: only :meth:`results` will be read
        (the engine then sends no per-token deltas)."""
        streams: list[GenerationStream] = []
        try:
            with engine.admission_held():
                for i in range(count):
                    own = params if params.seed is None else dataclasses.replace(params, seed=choice_seed(params.seed, i))
                    submit = functools.partial(engine.submit, adapter=adapter, bounded=i == 0)
                    streams.append(GenerationStream(submit, prompt_ids, own, ends_output[i] if ends_output else None,
                                                    streamed))
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return cls(streams)

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()
        for read in self._reads:
            read.cancel()

    async def results(self) -> list[Completion]:
        """Every choice's completion, in index order (cancelling them all if waiting is interrupted)."""
        try:
            return list(await asyncio.gather(*(stream.result() for stream in self.streams)))
        finally:
            self.cancel()

    async def merged(self) -> AsyncIterator[tuple[int, Delta]]:
        """Every choice's deltas as they come, each with its choice's index; a choice's error is raised."""
        if len(self.streams) == 1:  # the common case, without a task per delta
            async for delta in self.streams[0]:
                yield 0, delta
            return
        pending = self._reads
        pending.update({asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(self.streams)})
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: pending[t]):
                    i = pending.pop(task)
                    delta = task.result()
                    yield i, delta
                    if delta.completion is None:
                        pending[asyncio.ensure_future(anext(self.streams[i]))] = i
        finally:
            for task in pending:
                task.cancel()
            pending.clear()


def mean_logprob(completion: Completion) -> float:
    """The mean log-probability of ``completion``'s tokens (0 for none); it must have been decoded with logprobs."""
    entries = completion.logprobs or ()
    return sum(e.logprob or 0.0 for e in entries) / len(entries) if entries else 0.0


def best(completions: list[Completion], n: int) -> list[Completion]:
    """The ``n`` completions of highest mean token log-probability, best first (ties keep generation order)."""
    return sorted(completions, key=mean_logprob, reverse=True)[:n]


def usage_of(completions: list[Completion]) -> Usage:
    """The prompt once, the completion tokens of every sequence, the prompt's cached tokens (fewest of any sibling)."""
    first = completions[0]
    return Usage.of(first.prompt_tokens, sum(c.completion_tokens for c in completions),
                    min(c.cached_tokens for c in completions))
