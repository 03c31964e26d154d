"""Automatic prefix caching in the paged KV cache, on CPU with a tiny random Llama.

The block pool's rules (chained hashes, reference counts, LRU eviction) are checked alone; the
engine with caching on must give the same greedy tokens as with it off for requests sharing a
system prompt (in several orders, one at a time and batched, with chunked prefill, a small cache
that must evict, an fp8 cache, LoRA adapters and a prompt-learning prefix), report the reused
tokens in ``Completion.cached_tokens``, and give every block back when requests finish or are
cancelled. The HTTP side (``usage``, ``/metrics``) is in tests/integration/test_serving_prefix_cache_http.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model_dir

from lmforge.config.serving import ServingConfig
from lmforge.serving.adapters.virtual_tokens import VirtualPrefix
from lmforge.serving.engine import Engine, SamplingParams
from lmforge.serving.engine.requests import CompletionCollector
from lmforge.serving.model.block_pool import BlockPool, chain_hashes, root_hash
from lmforge.serving.model.kv_cache import CacheShape

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
BLOCK = 4
SYSTEM = list(range(40, 40 + 23))  # a 23-token shared "system prompt": 5 full blocks and a part
QUESTIONS = [[7, 8, 9], [100, 3], [55, 56, 57, 58, 59, 60], [9]]
PROMPTS = [SYSTEM + q for q in QUESTIONS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-prefix"))


def _engine(model_dir: Path, caching: bool = True, **cfg) -> Engine:
    kv = {"block_size": BLOCK, "prefix_caching": caching, **cfg.pop("kv_cache", {})}
    return Engine.load(model_dir, device="cpu", cfg=ServingConfig(kv_cache=kv, **cfg))


def _no_leak(engine: Engine) -> None:
    pool = engine.backend.cache.pool
    deadline = time.monotonic() + 5
    while (engine.active or engine.queue_depth) and time.monotonic() < deadline:  # a cancelled request leaves at the next step
        time.sleep(0.01)
    assert not pool.refs, f"blocks still held: {pool.refs}"
    assert engine.cache_usage == 0.0


# ---------------------------------------------------------------- the pool alone


def test_chain_hashes_cover_the_whole_prefix_and_only_full_blocks() -> None:
    root = root_hash("kv", "base")
    a = chain_hashes(root, list(range(10)), 4, 4)
    assert len(a) == 2  # 10 tokens: two full blocks of 4
    b = chain_hashes(root, [99, *range(1, 10)], 4, 4)
    assert a[0] != b[0] and a[1] != b[1]  # a different first block changes every later hash
    assert chain_hashes(root_hash("kv", "lora-a"), list(range(10)), 4, 4)[0] != a[0]  # another adapter's root
    assert len(chain_hashes(root, list(range(10)), 2, 4)) == 3  # 2 + 4 + 4: a partial first block (virtual tokens)


def test_pool_shares_refcounts_and_evicts_least_recently_released_first() -> None:
    pool = BlockPool(6)  # blocks 1..5
    one, two = pool.take(2), pool.take(2)
    for block, h in zip(one + two, [b"a", b"b", b"c", b"d"]):
        pool.publish(block, h)
    pool.share(pool.lookup([b"a", b"b", b"x"]))  # a second sequence holds a and b
    assert pool.refs[one[0]] == 2
    pool.release(one)
    assert pool.refs[one[0]] == 1 and pool.available == 1  # still held once
    pool.release(one)
    pool.release(two)
    assert not pool.refs and pool.available == 5 and pool.cached_blocks == 4
    # The free block, then the least recently released cached one: b (released before c and d, and a
    # chain's tail before its head).
    pool.take(2)
    assert pool.evictions == 1 and pool.lookup([b"a", b"b"]) == [one[0]] and pool.lookup([b"c", b"d"]) == two
    pool.reset()
    assert pool.lookup([b"a"]) == [] and pool.available == 3 and pool.cached_blocks == 0


# ---------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> list[list[int]]:
    engine = _engine(model_dir, caching=False)
    try:
        return [list(c.token_ids) for c in engine.generate(PROMPTS, GREEDY)]
    finally:
        engine.close()


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2]])
def test_sequential_requests_reuse_the_system_prompt_with_unchanged_output(model_dir: Path, expected, order) -> None:
    engine = _engine(model_dir)
    try:
        for n, i in enumerate(order):
            (result,) = engine.generate([PROMPTS[i]], GREEDY)
            assert list(result.token_ids) == expected[i]
            # The first request finds nothing; later ones the 5 full blocks of the shared system prompt.
            assert result.cached_tokens == (0 if n == 0 else 20), (n, i)
            assert result.cached_tokens < result.prompt_tokens
        _no_leak(engine)
    finally:
        engine.close()


def test_concurrent_chunked_and_repeated_prompts_match_without_caching(model_dir: Path, expected) -> None:
    engine = _engine(model_dir, scheduler={"max_prefill_tokens": 16, "max_batch_size": 3})
    try:
        results = engine.generate(PROMPTS + PROMPTS[::-1], GREEDY)  # 8 requests, 3 rows: later ones hit
        assert [list(r.token_ids) for r in results] == expected + expected[::-1]
        # The first computes the system prompt; the others, admitted with it, borrow its blocks as it writes them.
        assert results[0].cached_tokens == 0 and all(r.cached_tokens >= 20 for r in results[1:])
        # The same prompt again: everything but its last token's block is cached (24 of 26 tokens here).
        (again,) = engine.generate([PROMPTS[0]], GREEDY)
        assert again.cached_tokens == 24 and list(again.token_ids) == expected[0]
        _no_leak(engine)
    finally:
        engine.close()


def test_a_request_whose_prefix_is_being_prefilled_waits_for_it(model_dir: Path) -> None:
    engine = _engine(model_dir, scheduler={"max_prefill_tokens": 16, "max_batch_size": 3})
    plain = _engine(model_dir, caching=False)
    try:
        first = SYSTEM * 2 + [5]
        # short, first and the third take rows at step 1, which prefills short and 13 tokens of first (3 full
        # blocks). The third borrows first's first 4 blocks, the 4th still unwritten: its prefill waits until
        # first has written it (model/kv_cache.py); the fourth, admitted when short leaves, reuses the 3 it shares.
        prompts = [[1, 2, 3], first, [*first[:16], 7, 8, 9, 10, 11], [*first[:14], 6, 6, 6]]
        params = [SamplingParams(max_tokens=1, temperature=0), GREEDY, GREEDY, GREEDY]
        collector = CompletionCollector(len(prompts))
        with engine.admission_held():
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                engine.submit(prompt, p, collector.sink(i), bounded=False)
        results = collector.wait()
        assert [r.cached_tokens for r in results] == [0, 0, 16, 12]
        assert [list(r.token_ids) for r in results] == [list(r.token_ids) for r in plain.generate(prompts, params)]
        _no_leak(engine)
    finally:
        engine.close()
        plain.close()


def test_a_small_cache_evicts_and_stays_correct(model_dir: Path) -> None:
    shape = CacheShape(2, 2, 8, BLOCK, torch.float32)
    budget = 14 * shape.bytes_per_block() / 2**20  # 13 usable blocks: two requests of 9 blocks never fit together
    prompts = [[10 + k] * 4 + SYSTEM[:18] + [k] for k in range(6)]  # 6 distinct 23-token prompts, 5 full blocks each
    plain = _engine(model_dir, caching=False, kv_cache={"memory_mb": budget})
    cached = _engine(model_dir, kv_cache={"memory_mb": budget})
    try:
        want = [list(c.token_ids) for c in plain.generate(prompts, GREEDY)]
        for _ in range(2):  # the second round finds some prefixes evicted, others not
            got = [cached.generate([p], GREEDY)[0] for p in prompts]
            assert [list(c.token_ids) for c in got] == want
        assert cached.backend.cache.pool.evictions > 0
        _no_leak(cached)
    finally:
        plain.close()
        cached.close()


def test_fp8_cache_reuses_blocks_with_unchanged_output(model_dir: Path) -> None:
    plain = _engine(model_dir, caching=False, kv_cache={"dtype": "fp8"})
    cached = _engine(model_dir, kv_cache={"dtype": "fp8"})
    try:
        want = [list(c.token_ids) for c in plain.generate(PROMPTS, GREEDY)]
        got = [cached.generate([p], GREEDY)[0] for p in PROMPTS]
        assert [list(c.token_ids) for c in got] == want and got[-1].cached_tokens == 20
    finally:
        plain.close()
        cached.close()


def test_echo_scores_every_prompt_token_even_when_cached(model_dir: Path) -> None:
    engine = _engine(model_dir)
    try:
        engine.generate([PROMPTS[0]], GREEDY)
        scored = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0)
        (echo,) = engine.generate([PROMPTS[0]], scored)
        assert echo.cached_tokens == 0 and len(echo.prompt_logprobs or ()) == len(PROMPTS[0])
        _no_leak(engine)
    finally:
        engine.close()


def test_cancelled_requests_give_their_blocks_back(model_dir: Path) -> None:
    engine = _engine(model_dir, scheduler={"max_prefill_tokens": 16})
    try:
        engine.generate([PROMPTS[0]], GREEDY)
        sinks: list[object] = []
        long = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
        requests = [engine.submit(p, long, sinks.append) for p in PROMPTS]
        deadline = time.monotonic() + 10
        while len(sinks) < 8 and time.monotonic() < deadline:  # decoding: their blocks are held
            time.sleep(0.005)
        assert engine.backend.cache.pool.refs
        for request in requests:
            request.cancelled.set()
        _no_leak(engine)
        (after,) = engine.generate([PROMPTS[1]], GREEDY)
        assert after.cached_tokens == 24  # the cancelled request's prefill left its prompt's blocks cached
    finally:
        engine.close()


def _random_lora(base: Path, out: Path, seed: int) -> Path:
    """An untrained peft LoRA adapter with random (nonzero) B: it changes the model without training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


def test_lora_adapters_never_share_blocks_with_the_base_or_each_other(model_dir: Path, tmp_path: Path) -> None:
    adapters = {name: str(_random_lora(model_dir, tmp_path / name, seed)) for seed, name in enumerate(["a", "b"])}
    plain = _engine(model_dir, caching=False, adapters=adapters)
    cached = _engine(model_dir, adapters=adapters)
    try:
        names = [None, "a", "b"]
        want = [list(c.token_ids) for c in plain.generate([PROMPTS[0]] * 3, GREEDY, adapters=names)]
        assert len({tuple(w) for w in want}) == 3  # the adapters really change the output
        for name, tokens in zip(names, want):  # the same prompt under each adapter in turn: no cross hits
            (result,) = cached.generate([PROMPTS[0]], GREEDY, adapters=[name])
            assert result.cached_tokens == 0 and list(result.token_ids) == tokens
        for name, tokens in zip(names, want):  # each adapter's own blocks are found again
            (result,) = cached.generate([PROMPTS[0]], GREEDY, adapters=[name])
            assert result.cached_tokens == 24 and list(result.token_ids) == tokens
        _no_leak(cached)
    finally:
        plain.close()
        cached.close()


@pytest.mark.parametrize("virtual", [6, 8])  # a partial last prefix block (copied per sequence), and whole ones
def test_prompt_learning_prefix_with_prefix_caching(model_dir: Path, virtual: int) -> None:
    engines = []
    try:
        for caching in (False, True):
            engine = _engine(model_dir, caching=caching)
            engine.close()  # rebuilt below with the prefix attached to its model
            generator = torch.Generator().manual_seed(virtual)
            keys, values = (torch.randn(2, virtual, 2, 8, generator=generator) for _ in range(2))
            engine.model.lmforge_virtual_prefix = VirtualPrefix("PREFIX_TUNING", keys, values)
            engines.append(Engine(engine.model, engine.tokenizer, engine.cfg))
        plain, cached = engines
        assert cached.backend.virtual_tokens == virtual
        want = [list(c.token_ids) for c in plain.generate(PROMPTS, GREEDY)]
        got = [cached.generate([p], GREEDY)[0] for p in PROMPTS]
        assert [list(c.token_ids) for c in got] == want
        # With the prefix first, the prompt's blocks start after it: a block holds the prefix's tail.
        assert got[-1].cached_tokens == (24 - virtual % BLOCK if virtual % BLOCK else 20)
        _no_leak(cached)
    finally:
        for engine in engines:
            engine.close()
