"""The scheduler: which sequences the engine runs each step, and what becomes of them after.

One engine step (``engine/engine.py``) is two rounds of schedule -> execute -> update:

1. Prefill. :meth:`Scheduler.schedule_prefill` admits waiting requests while the running batch has
   a free row and the backend can reserve the request's worst case (prompt plus ``max_tokens``),
   first come first served (with prefix caching, a request's prefill starts after the prompt tokens
   the backend found cached or being written by an admitted request: ``Backend.cached_tokens``; it
   runs only in a forward that writes them, ``Backend.prefill_waits``); drops requests whose client went away,
   freeing their rows and cache at once; and picks up to ``serving.scheduler.max_prefill_tokens``
   prompt tokens to prefill (a long prompt is split into chunks over several steps, so it never
   stalls the running streams for long). The
   engine runs the chunks; :meth:`Scheduler.prefilled` counts them in and returns the sequences
   whose prompt is now whole: they get their first token (:meth:`Scheduler.update`) and join the
   running batch, in time for the decode round of the same step.
2. Decode. :meth:`Scheduler.schedule_decode` returns the running sequences, each with cache room
   for its next token; the engine decodes one token for each; :meth:`Scheduler.update` applies the
   tokens (text, stop and length rules: ``sequence.emit``) and finishes the done sequences, which
   leave the batch and release their cache.

Preemption: when the backend cannot grow a sequence's cache (``Backend.grow``), the most recently
admitted sequence gives its cache back and waits ahead of every new request; readmitted, it
prefills its prompt plus the tokens it had generated (recompute) and goes on where it stopped, its
output unchanged. The backends lmforge ships reserve each request's worst case at admission
(``reserves_worst_case``), so their running sequences never run short and the scheduler never asks
them to grow (a request that does not fit waits in the queue instead, ``model/kv_cache.py``);
preemption serves a backend that allocates as sequences grow, and is tested with such a fake one
(``tests/unit/test_serving_scheduler.py``).

The scheduler sees token ids, never tensors, so it runs without a model.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from lmforge.core.errors import ServingError
from lmforge.serving.backends.base import Backend, PrefillItem
from lmforge.serving.engine.metrics import EngineMetrics, NullMetrics
from lmforge.serving.engine.requests import Request, send
from lmforge.serving.engine.sampling import TextTracker, TokenLogprob, make_rng
from lmforge.serving.engine.sequence import Sequence, emit, send_delta

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class Scheduler:
    """The waiting, preempted, prefilling and running sequences of one engine, and the rules that move
    them. Owned by the engine thread, except :attr:`waiting`, which other threads append to through
    :meth:`add` while holding :attr:`lock`."""

    def __init__(self, backend: Backend, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int], *, max_batch_size: int,
                 max_prefill_tokens: int, metrics: EngineMetrics | NullMetrics | None = None,
                 lock: threading.Condition | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer  # for each sequence's text tracker
        self.eos_ids = eos_ids
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics or NullMetrics()
        self.lock = lock or threading.Condition()
        self.waiting: deque[Request] = deque()
        self.preempted: deque[Sequence] = deque()  # waiting too, ahead of every new request
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._admissions = 0
        # row -> prompt tokens looked up in the prefix cache, for rows admitted but not yet given a prefill chunk:
        # their cached start is final (and counted) only then (``Backend.cached_tokens``).
        self._unstarted: dict[int, int] = {}

    # ------------------------------------------------------------ queue

    @property
    def queue_depth(self) -> int:
        return len(self.waiting) + len(self.preempted)

    @property
    def active(self) -> int:
        return len(self.prefilling) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.preempted or self.prefilling or self.running)

    def add(self, request: Request) -> None:
        """Queue ``request`` (hold :attr:`lock`)."""
        self.waiting.append(request)

    def forget_cancelled(self) -> None:
        """Drop the queued requests whose client went away (hold :attr:`lock`)."""
        self.waiting = deque(r for r in self.waiting if not r.cancelled.is_set())

    # ------------------------------------------------------------ prefill round

    def schedule_prefill(self) -> list[tuple[Sequence, PrefillItem]]:
        """Admit, drop the cancelled, and pick this step's prefill chunks (empty: no prefill this step)."""
        self._admit()
        self._drop_cancelled()
        return self._prefill_chunks()

    def prefilled(self, chunks: list[tuple[Sequence, PrefillItem]]) -> list[Sequence]:
        """Count ``chunks`` as cached; the sequences whose prefill is whole join the running batch and
        are returned: they need their next token (a scoring-only request, ``max_tokens`` 0, is finished
        here instead)."""
        whole: list[Sequence] = []
        for seq, item in chunks:
            seq.prefilled += len(item.ids)
            if seq.prefilled == len(seq.prefill_ids):
                self.prefilling.remove(seq)
                whole.append(seq)
        for seq in [s for s in whole if s.params.max_tokens == 0]:
            send_delta(seq, "", "length")
            self.finish(seq, "length")
        joined = [s for s in whole if s.params.max_tokens > 0]
        self.running.extend(joined)
        return joined

    def _admit(self) -> None:
        with self.lock:
            while (self.preempted or self.waiting) and self.active < self.max_batch_size:
                resumed = self.preempted[0] if self.preempted else None
                request = resumed.request if resumed is not None else self.waiting[0]
                if resumed is None and request.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                need = len(request.prompt_ids) + request.params.max_tokens
                reuse = self._reusable(request, resumed)
                if not self.backend.can_reserve(need, reuse, request.adapter):
                    break  # first come, first served: later requests wait behind this one
                row = self.backend.reserve(need, reuse, request.adapter)
                cached = self.backend.cached_tokens(row)
                if self.backend.adapter_slots:  # the row may have served another adapter before
                    self.backend.set_adapter(row, request.adapter)
                if resumed is not None:
                    seq = self.preempted.popleft()
                    seq.row = row
                else:
                    self.waiting.popleft()
                    seq = Sequence(request, row, TextTracker(self.tokenizer, request.params.stop),
                                   make_rng(request.params.seed),
                                   grammar=request.grammar)
                seq.admitted, self._admissions = self._admissions, self._admissions + 1
                seq.prefilled = cached  # prefix cache hits: the prefill starts after them
                self._unstarted[row] = len(reuse) if resumed is None else 0
                self.prefilling.append(seq)

    @staticmethod
    def _reusable(request: Request, resumed: Sequence | None) -> list[int]:
        """The tokens whose cached prefix a newly admitted sequence may reuse (prefix caching): its
        prompt (and, resumed, the tokens it had generated); none when its echo scores the prompt,
        which needs the logits of every prompt token."""
        if resumed is not None:
            return [] if resumed.params.prompt_logprobs is not None and not resumed.token_ids else resumed.prefill_ids
        return [] if request.params.prompt_logprobs is not None else request.prompt_ids

    def _drop_cancelled(self) -> None:
        for group in (self.prefilling, self.running):
            for seq in [s for s in group if s.request.cancelled.is_set()]:
                group.remove(seq)
                self.finish(seq, "cancelled")
        for seq in [s for s in self.preempted if s.request.cancelled.is_set()]:
            self.preempted.remove(seq)
            self.finish(seq, "cancelled")

    def _prefill_chunks(self) -> list[tuple[Sequence, PrefillItem]]:
        budget = self.max_prefill_tokens if self.backend.chunked_prefill else None
        chunks: list[tuple[Sequence, PrefillItem]] = []
        # Prompt tokens each row seen so far will have prefilled after this step's forward. A row that
        # shares blocks another is writing comes after it (it was admitted later), so its writer is here.
        through: dict[int, int] = {}
        for seq in list(self.prefilling):
            if seq.row < 0:
                continue  # preempted just now, to make room for an earlier sequence
            if seq.row in self._unstarted:  # less than at admission if a row writing its shared blocks went away
                seq.prefilled = self.backend.cached_tokens(seq.row)
            through[seq.row] = seq.prefilled
            if any(through.get(row, 0) < n for row, n in self.backend.prefill_waits(seq.row)):
                continue  # its shared blocks are not all written by the end of this forward: wait for them
            ids = seq.prefill_ids
            left = len(ids) - seq.prefilled
            take = left if budget is None else min(left, budget)
            if take <= 0 or not self._make_room(seq, seq.prefilled + take):
                break
            echo = seq.params.prompt_logprobs is not None and not seq.token_ids  # a resumed one has its entries
            chunks.append((seq, PrefillItem(seq.row, seq.prefilled, ids[seq.prefilled : seq.prefilled + take], echo)))
            through[seq.row] = seq.prefilled + take
            if queried := self._unstarted.pop(seq.row, 0):  # a new request: its prefix-cache hits are final now
                seq.cached_tokens = seq.prefilled
                self.metrics.prefix_cache(queried, seq.prefilled)
            if budget is not None:
                budget -= take
        return chunks

    # ------------------------------------------------------------ decode round

    def schedule_decode(self) -> list[Sequence]:
        """The running sequences to decode this step, each with cache room for its next token (while
        the cache is short, the most recently admitted sequences are preempted)."""
        if not self.backend.reserves_worst_case:
            for seq in list(self.running):
                if seq.row >= 0:
                    self._make_room(seq, seq.position + 1)
        return self.running

    def update(self, seqs: list[Sequence], tokens: list[int], entries: dict[int, TokenLogprob] | None = None) -> None:
        """Apply ``tokens[i]`` to running sequence ``seqs[i]`` (``entries``: logprobs by index): send its
        text, and finish the done sequences, which leave the running batch."""
        first_latencies, gaps = self._stamp(seqs)
        eos_ids = self.eos_ids
        done: set[int] = set()
        for i, seq in enumerate(seqs):
            if emit(seq, tokens[i], entries.get(i) if entries else None, eos_ids):
                self._finished(seq, done)
        self.metrics.tokens(first_latencies, gaps, len(seqs))
        if done:
            self.running = [s for s in self.running if id(s) not in done]

    def update_runs(self, seqs: list[Sequence], runs: list[list[int]],
                    entries: list[list[TokenLogprob] | None] | None = None) -> None:
        """Like :meth:`update` with several tokens per sequence (speculative decoding's accepted run):
        ``runs[i]`` is applied token by token until ``seqs[i]`` finishes (stop, EOS, max_tokens); the
        tokens after that are dropped."""
        first_latencies, gaps = self._stamp(seqs)
        count = 0
        done: set[int] = set()
        for i, seq in enumerate(seqs):
            found = entries[i] if entries is not None else None
            for j, token in enumerate(runs[i]):
                count += 1
                if emit(seq, token, found[j] if found is not None else None, self.eos_ids):
                    self._finished(seq, done)
                    break
        self.metrics.tokens(first_latencies, gaps, count)
        if done:
            self.running = [s for s in self.running if id(s) not in done]

    @staticmethod
    def _stamp(seqs: list[Sequence]) -> tuple[list[float], list[float]]:
        """Stamp ``seqs``' token times; return the first-token latencies and the gaps since their last token."""
        now = time.perf_counter()
        first_latencies: list[float] = []
        gaps: list[float] = []
        for seq in seqs:
            if seq.first_token_at is None:
                seq.first_token_at = now
                first_latencies.append(now - seq.request.arrived)
            else:
                gaps.append(now - seq.last_token_at)
            seq.last_token_at = now
        return first_latencies, gaps

    def _finished(self, seq: Sequence, done: set[int]) -> None:
        self.finish(seq, "cancelled" if seq.request.cancelled.is_set() else "finished")
        done.add(id(seq))

    # ------------------------------------------------------------ cache room

    def _make_room(self, seq: Sequence, tokens: int) -> bool:
        """Grow ``seq``'s cache to ``tokens``, preempting while the cache is short; False if ``seq``
        itself had to go."""
        if self.backend.reserves_worst_case:
            return True
        while not self.backend.grow(seq.row, tokens):
            victim = max(self.prefilling + self.running, key=lambda s: s.admitted)
            if victim is seq and self.active == 1:
                raise ServingError(f"the KV cache cannot hold {tokens} tokens of one sequence even alone",
                                   "raise serving.kv_cache.memory_mb, or ask for fewer tokens")
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Take ``seq``'s cache back; it waits ahead of every new request and recomputes when readmitted."""
        (self.prefilling if seq in self.prefilling else self.running).remove(seq)
        self.backend.release(seq.row)
        seq.row, seq.prefilled = -1, 0
        seq.preemptions += 1
        self.preemptions += 1
        if not seq.token_ids:  # the echo's prompt logprobs are computed again with the prompt
            seq.prompt_entries, seq.pending_logits = None, None
        # Preempted latest-admitted first, so appending at the left keeps them in admission order.
        self.preempted.appendleft(seq)

    # ------------------------------------------------------------ endings

    def finish(self, seq: Sequence, outcome: str) -> None:
        """Release ``seq``'s cache and count it; ``outcome`` "finished" becomes "stop" or "length"."""
        if seq.row >= 0:
            self.backend.release(seq.row)
            self._unstarted.pop(seq.row, None)
        if outcome == "finished":
            outcome = "stop" if seq.tracker.stopped or (seq.token_ids and seq.token_ids[-1] in self.eos_ids) else "length"
        self.metrics.finished(outcome, len(seq.prompt), len(seq.token_ids), time.perf_counter() - seq.request.arrived)

    def fail_active(self, exc: BaseException) -> None:
        """Hand ``exc`` to every admitted sequence (their step failed) and release their cache."""
        for seq in self.prefilling + self.running:
            self.backend.release(seq.row)
            send(seq.request, exc)
        self.prefilling, self.running = [], []

    def close(self, exc: BaseException) -> None:
        """Hand ``exc`` to every sequence and queued request: the engine is shutting down."""
        for seq in self.prefilling + self.running + list(self.preempted):
            send(seq.request, exc)
        with self.lock:
            for request in self.waiting:
                send(request, exc)
            self.waiting.clear()
