"""The scheduler without a model: admission, preemption when the KV cache runs short, finishing.

A fake backend stands in for the model. Its "model" reads the tokens a row really holds in its
cache and predicts the next one from them, so a sequence ends with the right tokens only if the
scheduler fed every token at the right position, also after being preempted and recomputed. The
loop in :func:`run` is the engine's step (``engine/engine.py``): a prefill round and a decode round,
each schedule -> execute -> update.
"""

from __future__ import annotations

import math

import pytest

from lmforge.core.errors import ServingError
from lmforge.serving.backends.base import PrefillItem
from lmforge.serving.engine.requests import Completion, Delta, Request
from lmforge.serving.engine.sampling import SamplingParams
from lmforge.serving.engine.scheduler import Scheduler

BLOCK = 4
EOS = 1


def predict(tokens: list[int]) -> int:
    """The fake model: the next token of a context (never EOS unless the context ends in 13)."""
    if tokens and tokens[-1] == 13:
        return EOS
    return 2 + (sum(tokens) * 7 + len(tokens)) % 40


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    """The tokens a request ends with when decoded alone, one token at a time."""
    context, out = list(prompt), []
    while len(out) < max_tokens:
        out.append(predict(context))
        context.append(out[-1])
        if out[-1] == EOS:
            break
    return out


class FakeBackend:
    """A KV cache of ``blocks`` blocks of ``BLOCK`` tokens and ``rows`` rows, without a model.

    ``upfront``: reserve a sequence's worst case at admission (as the paged backend does), else take
    one block at admission and more as the sequence grows (then the cache can run short)."""

    name = "fake"
    chunked_prefill = True
    overlap = False
    virtual_tokens = 0

    def __init__(self, blocks: int, rows: int, upfront: bool = False) -> None:
        self.blocks, self.free = blocks, blocks
        self.free_rows = list(range(rows))
        self.upfront = self.reserves_worst_case = upfront
        self.owned: dict[int, int] = {}  # row -> blocks
        self.cached: dict[int, list[int]] = {}  # row -> the tokens its cache holds, in position order
        self.adapter_slots: dict[str, int] = {}

    def fits_ever(self, tokens: int) -> bool:
        return math.ceil(tokens / BLOCK) <= self.blocks

    def can_reserve(self, tokens: int, prompt: object = (), adapter: int = 0) -> bool:
        return bool(self.free_rows) and self.free >= (math.ceil(tokens / BLOCK) if self.upfront else 1)

    def reserve(self, tokens: int, prompt: object = (), adapter: int = 0) -> int:
        row = self.free_rows.pop(0)
        take = math.ceil(tokens / BLOCK) if self.upfront else 1
        self.free -= take
        self.owned[row], self.cached[row] = take, []
        return row

    def grow(self, row: int, tokens: int) -> bool:
        need = math.ceil(tokens / BLOCK) - self.owned[row]
        if need > self.free:
            return False
        if need > 0:
            self.free -= need
            self.owned[row] += need
        return True

    def release(self, row: int) -> None:
        self.free += self.owned.pop(row)
        del self.cached[row]
        self.free_rows.append(row)

    def set_adapter(self, row: int, slot: int) -> None:
        assert slot == 0

    def cached_tokens(self, row: int) -> int:
        return 0

    def prefill_waits(self, row: int) -> list[tuple[int, int]]:
        return []

    @property
    def cache_usage(self) -> float:
        return 1 - self.free / self.blocks

    def _write(self, row: int, start: int, ids: list[int]) -> int:
        cache = self.cached[row]
        assert len(cache) == start, f"row {row}: a token at position {start} but {len(cache)} are cached"
        assert start + len(ids) <= self.owned[row] * BLOCK, f"row {row} writes past its blocks"
        cache.extend(ids)
        return predict(cache)

    def prefill(self, items: list[PrefillItem]) -> list[int]:
        return [self._write(item.row, item.start, item.ids) for item in items]

    def decode(self, rows: list[int], positions: list[int], tokens: list[int]) -> list[int]:
        return [self._write(row, pos, [token]) for row, pos, token in zip(rows, positions, tokens)]


class Letters:
    """A tokenizer whose token ``i`` is one letter."""

    eos_token_id = EOS

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def make(backend: FakeBackend, max_batch_size: int = 8, max_prefill_tokens: int = 64) -> Scheduler:
    return Scheduler(backend, Letters(), {EOS}, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens)


def submit(scheduler: Scheduler, prompt: list[int], max_tokens: int) -> tuple[Request, list[Completion]]:
    results: list[Completion] = []

    def sink(item: Delta | BaseException) -> None:
        assert not isinstance(item, BaseException), item
        if item.completion is not None:
            results.append(item.completion)

    request = Request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), sink)
    scheduler.add(request)
    return request, results


def run(scheduler: Scheduler, backend: FakeBackend, names: dict[int, str], max_steps: int = 100) -> list[str]:
    """Step until no work is left; per step, the names of the requests that got a token (sorted)."""
    stepped: list[str] = []
    for _ in range(max_steps):
        if not scheduler.has_work():
            return stepped
        got: set[str] = set()
        chunks = scheduler.schedule_prefill()
        if chunks:
            nxt = dict(zip([id(seq) for seq, _ in chunks], backend.prefill([item for _, item in chunks])))
            whole = scheduler.prefilled(chunks)
            got |= {names[id(seq.request)] for seq in whole}
            scheduler.update(whole, [nxt[id(seq)] for seq in whole])
        seqs = scheduler.schedule_decode()
        if seqs:
            got |= {names[id(seq.request)] for seq in seqs}
            scheduler.update(seqs, backend.decode([s.row for s in seqs], [s.position for s in seqs],
                                                  [s.next_token for s in seqs]))
        stepped.append("".join(sorted(got)))
    raise AssertionError("the scheduler did not finish its work")


PROMPTS = {"a": [3, 4, 5, 6], "b": [7, 8, 9, 10], "c": [11, 12, 14, 15]}


def test_preempts_the_latest_admitted_when_blocks_run_out_and_resumes_it() -> None:
    # 6 blocks of 4 tokens; each request may reach 4 + 6 = 10 tokens (3 blocks): all three are
    # admitted, and as they grow past 8 tokens the cache is short by one block.
    backend = FakeBackend(blocks=6, rows=4)
    scheduler = make(backend)
    submitted = {name: submit(scheduler, prompt, max_tokens=6) for name, prompt in PROMPTS.items()}
    names = {id(request): name for name, (request, _) in submitted.items()}

    stepped = run(scheduler, backend, names)

    assert stepped[0] == "abc"  # all admitted, prefilled and decoded together
    assert scheduler.preemptions == 1
    # c, admitted last, gave its blocks back when a and b outgrew 8 tokens; they went on to the end,
    # then c was readmitted, recomputed its 9 tokens and finished.
    assert stepped == ["abc"] * 4 + ["ab", "c"]
    for name, (_request, results) in submitted.items():
        (completion,) = results
        expected = reference(PROMPTS[name], 6)
        assert list(completion.token_ids) == expected, name  # recompute changed nothing
        assert completion.text == Letters().decode(expected) and completion.finish_reason == "length"
    assert backend.free == 6 and sorted(backend.free_rows) == [0, 1, 2, 3]  # every block and row came back


def test_with_worst_case_reservation_a_request_waits_instead_of_being_preempted() -> None:
    backend = FakeBackend(blocks=6, rows=4, upfront=True)  # as the paged backend: 3 blocks each at admission
    scheduler = make(backend)
    submitted = {name: submit(scheduler, prompt, max_tokens=6) for name, prompt in PROMPTS.items()}
    names = {id(request): name for name, (request, _) in submitted.items()}

    stepped = run(scheduler, backend, names)

    assert scheduler.preemptions == 0
    assert stepped == ["ab"] * 5 + ["c"] * 5  # c waited in the queue for a's and b's blocks
    for name, (_request, results) in submitted.items():
        assert list(results[0].token_ids) == reference(PROMPTS[name], 6)
    assert backend.free == 6


def test_admits_up_to_the_batch_size_and_finishes_on_eos_length_or_cancel() -> None:
    backend = FakeBackend(blocks=40, rows=8)
    scheduler = make(backend, max_batch_size=2, max_prefill_tokens=3)
    eos_request, eos_results = submit(scheduler, [2, 13], max_tokens=5)  # the model answers 13 with EOS
    long_request, long_results = submit(scheduler, [5, 6, 7, 8, 9], max_tokens=4)  # prefilled in chunks of 3
    cancelled, cancelled_results = submit(scheduler, [4, 4], max_tokens=3)
    names = {id(eos_request): "e", id(long_request): "l", id(cancelled): "x"}

    chunks = scheduler.schedule_prefill()
    assert [len(item.ids) for _, item in chunks] == [2, 1]  # two rows (max_batch_size), 3 prompt tokens
    assert scheduler.queue_depth == 1 and scheduler.active == 2
    cancelled.cancelled.set()  # its client goes away while it waits
    nxt = dict(zip([id(seq) for seq, _ in chunks], backend.prefill([item for _, item in chunks])))
    whole = scheduler.prefilled(chunks)
    scheduler.update(whole, [nxt[id(seq)] for seq in whole])
    stepped = run(scheduler, backend, names)

    assert "x" not in "".join(stepped) and cancelled_results == []  # dropped, never admitted
    (done,) = eos_results
    assert done.finish_reason == "stop" and list(done.token_ids) == [EOS] == reference([2, 13], 5)
    (done,) = long_results
    assert done.finish_reason == "length" and list(done.token_ids) == reference([5, 6, 7, 8, 9], 4)
    assert scheduler.active == 0 and scheduler.queue_depth == 0 and backend.free == 40


def test_a_sequence_that_cannot_fit_even_alone_is_an_error() -> None:
    backend = FakeBackend(blocks=2, rows=1)
    backend.fits_ever = lambda tokens: True  # a backend that promised too much
    scheduler = make(backend)
    request, _ = submit(scheduler, [3, 4, 5, 6, 7, 8, 9, 10], max_tokens=4)  # 8 prompt tokens fill both blocks
    with pytest.raises(ServingError, match="cannot hold 9 tokens"):  # its next token has no block
        run(scheduler, backend, {id(request): "a"})
