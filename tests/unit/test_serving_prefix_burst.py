"""Prefix caching for a burst: requests admitted together share a prefix that is new to the cache.

The first request of the burst writes the prefix's blocks; the others borrow those blocks while
they are being written (``model/kv_cache.py``) and prefill only their own suffixes, in the very
forward that writes the prefix when the step's token budget holds it all, else as soon as the
writer has passed the blocks they share (a chunked writer). A writer cancelled before writing them
hands them to its earliest borrower, which computes them itself. In every case the greedy tokens
equal those of an engine with caching off (float32 on CPU, a tiny random Llama), and every block
is given back. Also here: ``n`` choices (``api/choices.py``) are such a burst. The cache's own
bookkeeping is checked without a model, first by hand, last under random bursts, chunks and
cancellations (a check that fails if the hand-over or the wait rule is taken out).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model_dir

from lmforge.config.serving import ServingConfig
from lmforge.serving.api.choices import Choices
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.metrics import NullMetrics
from lmforge.serving.engine.requests import CompletionCollector
from lmforge.serving.model.block_pool import chain_hashes, root_hash
from lmforge.serving.model.kv_cache import CacheShape, PagedKVCache

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
BLOCK = 4
SYSTEM = list(range(40, 40 + 23))  # 23 shared tokens: 5 full blocks and a part
PROMPTS = [SYSTEM + q for q in ([7, 8, 9], [100, 3], [55, 56, 57, 58, 59, 60], [9], [1, 2])]
LONG = SYSTEM * 2 + [5]  # 47 tokens: 11 full blocks before its last token


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-prefix-burst"))


class PrefixCounts(NullMetrics):
    """The engine's prefix-cache counts, per request as it gets its first prefill chunk (engine thread);
    ``on_first`` runs at the first one."""

    def __init__(self, on_first=None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.on_first = on_first

    def prefix_cache(self, queried: int, cached: int) -> None:
        if not self.calls and self.on_first is not None:
            self.on_first()
        self.calls.append((queried, cached))


def _engine(model_dir: Path, caching: bool = True, metrics: NullMetrics | None = None, **scheduler) -> Engine:
    cfg = ServingConfig(kv_cache={"block_size": BLOCK, "prefix_caching": caching}, scheduler=scheduler)
    return Engine.load(model_dir, device="cpu", cfg=cfg, metrics=metrics)


def _burst(engine: Engine, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list:
    """``prompts`` submitted together (admitted at the same step), their completions in order."""
    collector = CompletionCollector(len(prompts))
    with engine.admission_held():
        for i, prompt in enumerate(prompts):
            engine.submit(prompt, params, collector.sink(i), bounded=False)
    return collector.wait(timeout_s=60)


def _plain(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    engine = _engine(model_dir, caching=False)
    try:
        return [list(c.token_ids) for c in engine.generate(prompts, GREEDY)]
    finally:
        engine.close()


def _no_leak(engine: Engine) -> None:
    deadline = time.monotonic() + 5
    while (engine.active or engine.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.backend.cache.pool.refs, f"blocks still held: {engine.backend.cache.pool.refs}"


# ---------------------------------------------------------------- the cache alone


def test_borrowed_blocks_wait_for_their_writer_and_pass_to_the_earliest_borrower() -> None:
    cache = PagedKVCache(CacheShape(1, 1, 2, BLOCK, torch.float32), 40, 4, 64, torch.device("cpu"))
    hashes = chain_hashes(root_hash("kv"), list(range(24)), BLOCK, BLOCK)  # 6 full blocks
    writer = cache.reserve(26, hashes=hashes)
    available = cache.pool.available
    first = cache.reserve(18, hashes=hashes[:4])  # shares 4 blocks being written, takes 1 of its own (as does second)
    second = cache.reserve(26, hashes=hashes)
    assert cache.pool.available == available - 2 and cache.hits(first) == 4 and cache.hits(second) == 6
    assert cache.table[first, :4].tolist() == cache.table[writer, :4].tolist()
    assert cache.waits(writer) == [] and cache.waits(first) == [(writer, 16)] and cache.waits(second) == [(writer, 24)]
    cache.commit(writer, 9)  # two blocks written: published, no longer waited for
    assert cache.pool.lookup(hashes) == cache.table[writer, :2].tolist() and cache.waits(first) == [(writer, 16)]
    cache.release(writer)  # leaves before writing blocks 2..5
    # first computes blocks 2 and 3 itself; second borrows them from first, and computes 4 and 5.
    assert cache.hits(first) == 2 and cache.waits(first) == []
    assert cache.hits(second) == 4 and cache.waits(second) == [(first, 16)]
    cache.commit(first, 17)
    assert cache.waits(second) == [] and len(cache.pool.lookup(hashes)) == 4
    cache.commit(second, 25)
    assert len(cache.pool.lookup(hashes)) == 6
    cache.release(first)
    cache.release(second)
    assert not cache.pool.refs and cache.pool.available == 39


# ---------------------------------------------------------------- the engine


def test_a_burst_sharing_a_new_prefix_prefills_it_once_in_one_forward(model_dir: Path) -> None:
    want = _plain(model_dir, PROMPTS)
    counts = PrefixCounts()
    engine = _engine(model_dir, metrics=counts)
    try:
        results = _burst(engine, PROMPTS)
        assert [list(r.token_ids) for r in results] == want
        # All but the first found the prefix's 5 full blocks (in usage and in the metrics), and the
        # suffixes ran in the forward that wrote them: one prefill for the whole burst.
        assert [r.cached_tokens for r in results] == [0, 20, 20, 20, 20]
        assert counts.calls == [(len(p), c) for p, c in zip(PROMPTS, [0, 20, 20, 20, 20])]
        assert engine.stats["prefills"] == 1
        _no_leak(engine)
    finally:
        engine.close()


def test_borrowers_of_a_chunked_writer_run_once_it_has_passed_their_blocks(model_dir: Path) -> None:
    prompts = [LONG, SYSTEM * 2 + [6], SYSTEM * 2 + [7]]
    want = _plain(model_dir, prompts)
    engine = _engine(model_dir, max_prefill_tokens=16)
    try:
        results = _burst(engine, prompts)
        assert [list(r.token_ids) for r in results] == want
        assert [r.cached_tokens for r in results] == [0, 44, 44]
        # 47 tokens in chunks of 16, 16 and 15; the borrowers' 3 own tokens each fill the last
        # forward's one free token, then the next forward.
        assert engine.stats["prefills"] == 4
        _no_leak(engine)
    finally:
        engine.close()


def test_a_writer_cancelled_mid_prefill_hands_its_blocks_to_a_borrower(model_dir: Path) -> None:
    readers = [[*LONG[:40], 1, 2, 3], [*LONG[:44], 9]]  # borrow 10 and 11 of the writer's blocks
    want = _plain(model_dir, readers)
    holder: list = []
    # Cancelled as its first chunk (16 tokens: 4 blocks) is picked: it leaves at the next step, its
    # later blocks unwritten.
    engine = _engine(model_dir, metrics=PrefixCounts(on_first=lambda: holder[0].cancelled.set()),
                     max_prefill_tokens=16)
    try:
        collector = CompletionCollector(len(readers))
        with engine.admission_held():
            holder.append(engine.submit(LONG, GREEDY, lambda item: None, bounded=False))
            for i, prompt in enumerate(readers):
                engine.submit(prompt, GREEDY, collector.sink(i), bounded=False)
        results = collector.wait(timeout_s=60)
        assert [list(r.token_ids) for r in results] == want  # nobody read an unwritten block
        # The first reader recomputed from the writer's 5th block; the second borrowed those from it.
        assert [r.cached_tokens for r in results] == [16, 40]
        _no_leak(engine)
        (again,) = engine.generate([LONG], GREEDY)
        assert again.cached_tokens == 44  # every block ended up written and published once
    finally:
        engine.close()


@pytest.mark.parametrize("best_of", [None, 4])
def test_choices_share_the_prompt_blocks_as_a_burst(model_dir: Path, best_of: int | None) -> None:
    engine = _engine(model_dir)
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=5, logprobs=0 if best_of else None)

    async def choices() -> list:
        return await Choices.submit(engine, LONG, params, None, count=best_of or 3).results()

    try:
        results = asyncio.run(choices())
        # The first computed the prompt; its siblings shared all 11 of its full blocks in the same forward.
        assert [r.cached_tokens for r in results] == [0] + [44] * (len(results) - 1)
        assert engine.stats["prefills"] == 1
        assert len({tuple(r.token_ids) for r in results}) > 1  # each choice sampled on its own
        _no_leak(engine)
    finally:
        engine.close()


def test_random_bursts_read_only_written_blocks_and_leave_nothing_behind() -> None:
    """Admissions, chunked prefills and cancellations at random, under the scheduler's rule (a row runs
    only in a forward that brings its writers past what it shares): every block a chunk reads holds its
    own chain's content by then, and once all rows have left, nothing is held or pending."""
    import random

    rng = random.Random(0)
    cache = PagedKVCache(CacheShape(1, 1, 2, BLOCK, torch.float32), 200, 8, 64, torch.device("cpu"))
    content: dict[int, bytes] = {}  # block -> the hash of what was written into it
    rows: dict[int, tuple[list[int], list[bytes]]] = {}  # live row -> (prompt, its block hashes)
    done: dict[int, int] = {}  # row -> prompt tokens prefilled (absent: not started)
    for _ in range(300):
        prefix = [rng.randrange(300) for _ in range(30)]  # new to the cache
        for _ in range(rng.choice([0, 0, 1, 3, 5])):  # a burst sharing it, up to some point
            prompt = prefix[: rng.randrange(5, 31)] + [rng.randrange(300) for _ in range(rng.randrange(1, 6))]
            hashes = chain_hashes(root_hash("kv"), prompt[:-1], BLOCK, BLOCK)
            if cache.can_reserve(len(prompt) + 2, hashes=hashes):
                rows[cache.reserve(len(prompt) + 2, hashes=hashes)] = (prompt, hashes)
        if rows and rng.random() < 0.3:  # a client leaves, started or not
            gone = rng.choice(list(rows))
            cache.release(gone)
            del rows[gone]
            done.pop(gone, None)
        through: dict[int, int] = {}
        chunks: list[tuple[int, int, int]] = []
        for row in list(rows):  # reservation order, as the scheduler keeps it
            start = done.get(row, cache.hits(row) * BLOCK)
            through[row] = start
            if start == len(rows[row][0]) or any(through.get(w, 0) < n for w, n in cache.waits(row)):
                continue
            end = min(len(rows[row][0]), start + rng.randrange(1, 10))
            chunks.append((row, start, end))
            through[row] = end
        table = cache.table.tolist()
        for row, start, end in chunks:  # the forward's writes (full blocks only carry a hash)
            for index in range(start // BLOCK, end // BLOCK):
                if index < len(rows[row][1]):
                    content[table[row][index]] = rows[row][1][index]
        for row, start, end in chunks:  # then its reads: every earlier full block holds this chain's content
            for index in range(start // BLOCK):
                assert content.get(table[row][index]) == rows[row][1][index], (row, index)
            cache.commit(row, end)
            done[row] = end
        for row in [r for r in rows if done.get(r) == len(rows[r][0])]:  # prefilled: decode, then finish
            cache.release(row)
            del rows[row]
            del done[row]
    for row in list(rows):
        cache.release(row)
    assert not cache.pool.refs and cache.pool.available == 199
    assert all(not cache.waits(row) and not cache.hits(row) for row in range(8))
